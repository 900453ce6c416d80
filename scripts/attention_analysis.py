"""Why CAVGA's attention ``1 - A`` misses defects: measurements on a trained run.

  python scripts/attention_analysis.py --config=configs/mvtec.py --workdir=runs/bottle_D_u \
      --config.data.root=... --config.data.category=bottle --config.data.image_size=128 \
      --config.model.variant=D

For the convolutional latent, ``mu = W F + b`` is a 1x1 convolution, so the
Grad-CAM weights of ``s = sum(mu)`` at the last feature map,
``alpha_k = mean_ij ds/dF_ijk = sum_c W_kc``, are the same for every image
and position: ``A = ReLU(F . w) / max`` is a fixed linear read-out of the
features, normalised per image. This prints, on the test set:
* the spread of ``alpha`` across images (0 up to float rounding) and its
  distance to ``sum_c W_kc``;
* the pixel AUROC of ``A`` itself, of ``1 - A``, of the feature norm
  ``|F|`` and of ``F . w`` before the ReLU (all bilinear to image size);
* the mean of ``A`` inside and outside the defects.
"""

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cavga_jax import config_checks
from cavga_jax import data
from cavga_jax.metrics import pixel_metrics
from cavga_jax.models import attention
from cavga_jax.models import layers
from cavga_jax.programs import runtime
from cavga_jax.training import run_setup
from cavga_jax.training import train_state

_CONFIG = runtime.define_config_flag('The run configuration.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config = _CONFIG.value
  made = run_setup.setup(
      config_checks.check_config(config), _WORKDIR.value, restore=True)
  test, generator, state, step = (made.test_ds, made.generator, made.state,
                                  made.step)
  params, stats = state.gen_params, state.gen_batch_stats

  @functools.partial(
      jax.jit, compiler_options=layers.compiler_options(generator.conv_impl))
  def analyse(images):
    x = train_state.images_to_float(images)
    outputs, _ = attention.forward_with_attention(
        generator, params, stats, x, None, train=False)
    features = outputs['features']

    def sum_mu(f):
      mu, _ = generator.apply({'params': params}, f, method='latent_params')
      return mu.sum(axis=(1, 2, 3))

    _, vjp = jax.vjp(sum_mu, features)
    (grads,) = vjp(jnp.ones(features.shape[0]))
    alpha = grads.mean(axis=(1, 2))  # (B, k)
    size = images.shape[1]
    up = lambda m: jax.image.resize(m, (m.shape[0], size, size), 'bilinear')
    return dict(
        alpha=alpha,
        attention=up(outputs['attention']),
        norm=up(jnp.linalg.norm(features, axis=-1)),
        projection=up(jnp.einsum('bhwk,bk->bhw', features, alpha)))

  parts = [
      jax.tree.map(lambda v, n=n: v[:n], jax.device_get(analyse(images)))
      for images, n in data.eval_batches(test, config.eval.batch_size)
  ]
  out = jax.tree.map(lambda *values: np.concatenate(values), *parts)
  kernel = np.asarray(params['mu']['kernel']).reshape(
      -1, config.model.latent_channels)
  masks = test.masks
  result = dict(
      checkpoint_step=step,
      alpha_spread_across_images=float(out['alpha'].std(axis=0).max()),
      alpha_minus_kernel_row_sum=float(
          np.abs(out['alpha'] - kernel.sum(axis=1)).max()),
      pixel_auroc_A=pixel_metrics.pixel_auroc(out['attention'], masks),
      pixel_auroc_1_minus_A=pixel_metrics.pixel_auroc(1 - out['attention'],
                                                      masks),
      pixel_auroc_feature_norm=pixel_metrics.pixel_auroc(out['norm'], masks),
      pixel_auroc_projection=pixel_metrics.pixel_auroc(out['projection'],
                                                       masks),
      mean_A_in_defects=float(out['attention'][masks].mean()),
      mean_A_outside_defects_anomalous=float(
          out['attention'][(test.labels == 1)[:, None, None] & ~masks].mean()),
      mean_A_normal_images=float(out['attention'][test.labels == 0].mean()))
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
