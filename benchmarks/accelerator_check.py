"""One-shot accelerator check: speed, FLOPs, memory and a short bottle run.

  python benchmarks/accelerator_check.py --out OUT \
      --peer .devicecheck/cavga_torch.py \
      --data_root .devicecheck/mvtec_bottle_256
  python benchmarks/accelerator_check.py --smoke --out /tmp/check  # CPU, s

Meant to run once, unattended, on a lent GPU (docs/benchmarks.md has the
recipe) and to finish in at most 8 minutes. It writes
``OUT/accelerator_check.json`` and ``OUT/accelerator_check.md`` after every
part, so a run killed at its time limit still leaves what it measured. The
parts, in this order (the later ones are the first to go when the budget
runs out):

1. ``torch_peer``: images/s of the PyTorch peer (``--peer``, i.e.
   ../shared/peer/cavga_torch.py) for R and D, train and eval, float32,
   channels-last, on the same device, in a subprocess of ``--torch_python``.
   It runs first, before this process initialises JAX, because JAX takes
   75 % of the GPU's memory when it starts. The peer's own CLI always runs
   on the CPU and times without synchronising, so the subprocess imports the
   peer's models and steps and times them itself (``_torch_worker``).
2. ``jax_steps`` float32, then 4. ``jax_steps`` bfloat16: for R and D, train
   and eval, ``benchmark.py``'s step at ``--image_size`` and ``--batch``,
   compiled ahead of time so that lowering and compilation are timed apart
   from the steps; images/s (median step), model FLOPs per image (XLA's cost
   analysis of the lowered program, i.e. the model as written, and of the
   compiled one), the resulting fraction of the device's peak FLOP/s,
   the program's memory (``memory_analysis``) and the device's peak memory
   so far (``memory_stats``; null on the CPU).
3. ``bottle``: CAVGA-R_u on MVTec bottle (``--data_root``) at 256 px with
   configs/mvtec.py, ``--bottle_steps`` steps via ``train_lib.train``, then
   ``eval_lib.evaluate`` with every map: steps/s and each map's pixel AUROC,
   AU-PRO and image AUROC (CAVGA-D_u under ``--smoke``).

A part whose input is missing (no ``--peer``, no torch, no data) or that
would start after ``--budget_s`` seconds is recorded as skipped with the
reason; a part that raises is recorded as failed with the error, and the
others still run. ``--smoke`` runs everything at tiny sizes on generated data
(no ``--data_root`` needed) in seconds on a CPU, with the same JSON keys
(``TOP_KEYS``, ``JAX_ROW_KEYS``, ``TORCH_ROW_KEYS``, ``BOTTLE_KEYS``).
"""

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

# The JAX side (jax, benchmark.py, cavga_jax) is imported inside the
# functions that use it: the torch worker subprocess must start fast and
# never touch the GPU through JAX.

JSON_FILE = 'accelerator_check.json'
MARKDOWN_FILE = 'accelerator_check.md'

# The key sets of the JSON file, the same for a full and a --smoke run.
TOP_KEYS = ('schema', 'smoke', 'argv', 'started_utc', 'elapsed_s', 'budget_s',
            'environment', 'settings', 'torch_peer', 'jax_steps', 'bottle',
            'comparison', 'peak_device_bytes', 'skipped', 'errors')
ENVIRONMENT_KEYS = ('platform', 'device_kind', 'device_count', 'jax', 'jaxlib',
                    'flax', 'python', 'cpu_threads',
                    'jax_default_matmul_precision', 'peak_flops_per_s')
SETTINGS_KEYS = ('image_size', 'batch', 'steps', 'warmup', 'latent_channels',
                 'widths', 'bottle_image_size', 'bottle_steps', 'bottle_batch')
TORCH_PEER_KEYS = ('status', 'reason', 'python', 'torch', 'device',
                   'cudnn_benchmark', 'tf32', 'rows')
TORCH_ROW_KEYS = ('variant', 'mode', 'dtype', 'status', 'reason',
                  'images_per_s', 'step_ms_median', 'step_ms_all',
                  'first_call_s', 'peak_device_bytes')
JAX_ROW_KEYS = ('variant', 'mode', 'dtype', 'status', 'reason', 'images_per_s',
                'step_ms_median', 'step_ms_all', 'lower_s', 'compile_s',
                'first_call_s', 'flops_per_step_lowered',
                'flops_per_step_compiled', 'flops_per_image',
                'bytes_accessed_per_step', 'achieved_flops_per_s',
                'peak_flops_per_s', 'fraction_of_peak', 'fraction_of_tf32_peak',
                'program_bytes', 'peak_device_bytes_so_far')
BOTTLE_KEYS = ('status', 'reason', 'data', 'variant', 'image_size', 'num_steps',
               'batch', 'train_wall_s', 'images_per_s', 'steps_per_s',
               'eval_wall_s', 'num_test_images', 'headline', 'maps')
COMPARISON_KEYS = ('variant', 'mode', 'jax_dtype', 'jax_images_per_s',
                   'torch_images_per_s', 'jax_over_torch')

VARIANTS = ('R', 'D')
MODES = ('train', 'eval')
DTYPES = ('float32', 'bfloat16')

# Full run and --smoke sizes; a flag left unset takes these.
FULL = dict(
    image_size=256,
    batch=64,
    steps=10,
    warmup=3,
    latent_channels=128,
    bottle_image_size=256,
    bottle_steps=200,
    bottle_batch=32)
SMOKE = dict(
    image_size=64,
    batch=2,
    steps=1,
    warmup=1,
    latent_channels=8,
    bottle_image_size=64,
    bottle_steps=4,
    bottle_batch=2)
# XLA:CPU compiles an R train step in 10-30 s whatever the widths, so
# --smoke measures only these JAX rows (both modes, both dtypes; the others
# are recorded as skipped) and trains CAVGA-D in the bottle part.
SMOKE_JAX_ROWS = (('D', 'train', 'float32'), ('D', 'eval', 'bfloat16'))
SMOKE_BOTTLE_VARIANT = 'D'
# --smoke divides the paper's widths by this (at least SMOKE_MIN_WIDTH), so
# that the R and D programs compile in seconds on a CPU.
SMOKE_WIDTH_DIVISOR = 16
SMOKE_MIN_WIDTH = 4
# The bottle part starts only with this much of --budget_s left: its compile,
# 200 steps and the evaluation of every map take about two minutes on a GPU.
BOTTLE_MIN_LEFT_S = 120.0
# The peer's four rows take well under a minute on a GPU; a hung subprocess
# must not eat the JAX parts' budget.
TORCH_MAX_S = 150.0

# Dense peak FLOP/s from NVIDIA's data sheets (sparsity excluded), matched
# by substrings of ``device_kind``, first match wins. 'tfloat32' is the
# tensor-core rate that float32 convolutions and matmuls get under XLA's and
# cuDNN's default precision, so float32 rows report both fractions.
_HOPPER_SXM = dict(bfloat16=989.4e12, float32=66.9e12, tfloat32=494.7e12)
PEAK_FLOPS = (
    (('H200',), _HOPPER_SXM),
    (('H100', 'PCIe'),
     dict(bfloat16=756.0e12, float32=51.2e12, tfloat32=378.0e12)),
    (('H100',), _HOPPER_SXM),
    (('A100',), dict(bfloat16=312.0e12, float32=19.5e12, tfloat32=156.0e12)),
)


def peak_flops(device_kind: str) -> Optional[dict[str, float]]:
  """Peak FLOP/s by dtype for a known device kind, else None."""
  for substrings, figures in PEAK_FLOPS:
    if all(s in device_kind for s in substrings):
      return dict(figures)
  return None


def _finite(value: Any) -> Any:
  """``value`` with non-finite floats as None (strict JSON has no NaN)."""
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
    return _finite(value.item())  # numpy scalars
  return value


def _row(keys: Sequence[str], **values) -> dict[str, Any]:
  """A dict with exactly ``keys``, None where ``values`` has none."""
  unknown = set(values) - set(keys)
  if unknown:
    raise KeyError(f'not in the key list: {sorted(unknown)}')
  return {k: values.get(k) for k in keys}


class _Budget:
  """Seconds used since the start, against ``--budget_s``."""

  def __init__(self, budget_s: float):
    self.budget_s = budget_s
    self.start = time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()

  def exhausted_reason(self, need_s: float = 0.0) -> Optional[str]:
    """Why a part that needs ``need_s`` seconds may not start, or None."""
    if self.left() > need_s:
      return None
    return (f'budget: {self.elapsed():.0f} s of --budget_s '
            f'{self.budget_s:.0f} used, this part needs {need_s:.0f} s left')


def _progress(budget: _Budget, text: str) -> None:
  # The long parts log little of their own: one line per finished piece.
  print(
      f'[accelerator_check {budget.elapsed():.0f} s] {text}',
      file=sys.stderr,
      flush=True)


def _error_text(error: BaseException) -> str:
  lines = traceback.format_exception_only(type(error), error)
  return ''.join(lines).strip()[-1000:]


# ---------------------------------------------------------------------------
# PyTorch peer
# ---------------------------------------------------------------------------


def _torch_worker(args) -> None:
  """Times the peer's steps; prints one JSON line per row, header first.

  Runs in its own process. Uses the peer's models and steps unchanged and
  its setup (seed 0, inputs uniform in [-1, 1], Adam), on CUDA when
  available, channels-last, synchronising the device around every timed
  step.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(
        json.dumps(
            dict(
                status='skipped',
                reason=(f'torch not importable by {sys.executable}: {e}'))),
        flush=True)
    return
  spec = importlib.util.spec_from_file_location('cavga_torch', args.peer)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':
    # The usual fast setting: cuDNN picks the best algorithm per shape.
    torch.backends.cudnn.benchmark = True
  print(
      json.dumps(
          dict(
              status='ok',
              torch=torch.__version__,
              device=(torch.cuda.get_device_name(0)
                      if device.type == 'cuda' else 'cpu'),
              cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
              tf32=dict(
                  cudnn=bool(torch.backends.cudnn.allow_tf32),
                  matmul=bool(torch.backends.cuda.matmul.allow_tf32)))),
      flush=True)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def measure(variant, mode):
    torch.manual_seed(0)
    gen = peer.Generator(variant, 3, args.latent_channels)
    disc = peer.Discriminator(3, args.image_size)
    gen.to(device=device, memory_format=torch.channels_last)
    disc.to(device=device, memory_format=torch.channels_last)
    x = (torch.rand(args.batch, 3, args.image_size, args.image_size) * 2
         - 1).to(device).contiguous(memory_format=torch.channels_last)
    if mode == 'train':
      opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
      opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
      step = peer.make_train_step(gen, disc, opt_g, opt_d)
    else:
      gen.eval()
      gen.requires_grad_(False)
      step = peer.make_eval_step(gen)
    if device.type == 'cuda':
      torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    step(x)
    sync()
    first = time.perf_counter() - tic
    for _ in range(args.warmup - 1):
      step(x)
    sync()
    times = []
    for _ in range(args.steps):
      tic = time.perf_counter()
      step(x)
      sync()
      times.append(time.perf_counter() - tic)
    median = statistics.median(times)
    return dict(
        status='ok',
        images_per_s=args.batch / median,
        step_ms_median=1000 * median,
        step_ms_all=[round(1000 * t, 2) for t in times],
        first_call_s=first,
        peak_device_bytes=(torch.cuda.max_memory_allocated()
                           if device.type == 'cuda' else None))

  for variant in args.variants.split(','):
    for mode in args.modes.split(','):
      try:
        values = measure(variant, mode)
      except Exception as e:  # pylint: disable=broad-except
        # E.g. out of memory: the other rows still run.
        values = dict(status='failed', reason=_error_text(e))
      print(
          json.dumps(
              _row(
                  TORCH_ROW_KEYS,
                  variant=variant,
                  mode=mode,
                  dtype='float32',
                  **values)),
          flush=True)
      if device.type == 'cuda':
        torch.cuda.empty_cache()


def run_torch_peer(args, budget: _Budget) -> dict[str, Any]:
  """The ``torch_peer`` part: the worker subprocess's rows (TORCH_ROW_KEYS)."""
  result = _row(TORCH_PEER_KEYS, python=args.torch_python, rows=[])
  pending = [(v, m) for v in VARIANTS for m in MODES]

  def finish(status, reason):
    result.update(status=status, reason=reason)
    done = {(r['variant'], r['mode']) for r in result['rows']}
    for variant, mode in pending:
      if (variant, mode) not in done:
        result['rows'].append(
            _row(
                TORCH_ROW_KEYS,
                variant=variant,
                mode=mode,
                dtype='float32',
                status='skipped',
                reason=reason))
    return result

  if not args.peer or not os.path.isfile(args.peer):
    return finish('skipped', f'no peer script (--peer={args.peer!r})')
  reason = budget.exhausted_reason()
  if reason:
    return finish('skipped', reason)
  command = [
      args.torch_python,
      os.path.abspath(__file__), '--torch_worker', '--peer', args.peer,
      '--image_size',
      str(args.image_size), '--batch',
      str(args.batch), '--steps',
      str(args.steps), '--warmup',
      str(args.warmup), '--latent_channels',
      str(args.latent_channels), '--variants', ','.join(VARIANTS), '--modes',
      ','.join(MODES)
  ]
  timed_out = False
  try:
    process = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=max(min(budget.left(), TORCH_MAX_S), 1.0),
        check=False)
    stdout, stderr, code = process.stdout, process.stderr, process.returncode
  except subprocess.TimeoutExpired as e:
    timed_out = True
    stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout
                                                                    or '')
    stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr
                                                                    or '')
    code = None
  lines = [
      json.loads(line) for line in stdout.splitlines() if line.startswith('{')
  ]
  if lines and lines[0].get('status') == 'skipped':
    return finish('skipped', lines[0]['reason'])
  if lines:
    header = lines[0]
    for key in ('torch', 'device', 'cudnn_benchmark', 'tf32'):
      result[key] = header.get(key)
    result['rows'] = lines[1:]
  if timed_out:
    return finish(
        'failed', 'torch worker ran past its time limit; '
        f'stderr: {stderr[-500:]}')
  if code:
    return finish('failed', f'torch worker exited {code}: {stderr[-1000:]}')
  return finish('ok', None)


# ---------------------------------------------------------------------------
# JAX steps
# ---------------------------------------------------------------------------


def _cost(analysis: Any) -> dict[str, float]:
  """XLA's cost analysis as one dict: it may be a dict, a list or None."""
  if analysis is None:
    return {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis)


def _positive(value: Any) -> Optional[float]:
  return float(value) if value is not None and value > 0 else None


def _smoke_widths(variant: str) -> dict[str, tuple[int, ...]]:
  from cavga_jax.models import cavga  # pylint: disable=g-import-not-at-top
  return {
      name:
          tuple(max(SMOKE_MIN_WIDTH, w // SMOKE_WIDTH_DIVISOR) for w in widths)
      for name, widths in cavga.PAPER_WIDTHS[variant].items()
  }


def measure_jax_step(args, variant: str, mode: str, dtype: str,
                     environment: dict[str, Any]) -> dict[str, Any]:
  """One JAX_ROW_KEYS row: ``benchmark.py``'s step, compiled ahead of time.

  Args:
    args: the parsed flags (image_size, batch, steps, warmup,
      latent_channels, smoke).
    variant: 'R' or 'D'.
    mode: 'train' or 'eval'.
    dtype: the compute dtype, 'float32' or 'bfloat16'.
    environment: the ENVIRONMENT_KEYS dict (its peak FLOP/s).
  """
  import benchmark  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  # benchmark.py's own config and timing, so both scripts measure the same.
  config = benchmark.config_from_args(
      argparse.Namespace(
          image_size=args.image_size,
          channels=3,
          variant=variant,
          latent_channels=args.latent_channels,
          dtype=dtype,
          batch=args.batch))
  if args.smoke:
    for name, widths in _smoke_widths(variant).items():
      config.model[name] = widths
  step, inputs = benchmark.make_step(config, mode)
  tic = time.perf_counter()
  lowered = step.lower(*inputs)
  lower_s = time.perf_counter() - tic
  tic = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - tic
  lowered_cost = _cost(lowered.cost_analysis())
  compiled_cost = _cost(compiled.cost_analysis())
  memory = compiled.memory_analysis()
  program_bytes = None
  if memory is not None:
    program_bytes = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  # The compiled executable runs the steps: no second compilation.
  first, times = benchmark.time_calls(
      benchmark.make_runner(compiled, inputs, mode), args.steps, args.warmup)
  median = statistics.median(times)
  # The model as written: backend rewrites (e.g. cuDNN custom calls) can
  # hide FLOPs from the compiled program's analysis.
  flops = _positive(lowered_cost.get('flops')) or _positive(
      compiled_cost.get('flops'))
  achieved = flops / median if flops else None
  peaks = environment['peak_flops_per_s'] or {}
  peak = peaks.get(dtype)
  tf32_peak = peaks.get('tfloat32') if dtype == 'float32' else None
  stats = jax.devices()[0].memory_stats()
  return _row(
      JAX_ROW_KEYS,
      variant=variant,
      mode=mode,
      dtype=dtype,
      status='ok',
      images_per_s=args.batch / median,
      step_ms_median=1000 * median,
      step_ms_all=[round(1000 * t, 2) for t in times],
      lower_s=lower_s,
      compile_s=compile_s,
      first_call_s=first,
      flops_per_step_lowered=_positive(lowered_cost.get('flops')),
      flops_per_step_compiled=_positive(compiled_cost.get('flops')),
      flops_per_image=flops / args.batch if flops else None,
      bytes_accessed_per_step=_positive(lowered_cost.get('bytes accessed')),
      achieved_flops_per_s=achieved,
      peak_flops_per_s=peak,
      fraction_of_peak=achieved / peak if achieved and peak else None,
      fraction_of_tf32_peak=(achieved
                             / tf32_peak if achieved and tf32_peak else None),
      program_bytes=program_bytes,
      peak_device_bytes_so_far=(stats or {}).get('peak_bytes_in_use'))


def run_jax_steps(args, dtype: str, budget: _Budget, environment: dict[str,
                                                                       Any],
                  errors: list[str]) -> list[dict[str, Any]]:
  """The JAX_ROW_KEYS rows of one dtype, R and D, train and eval."""
  rows = []
  for variant in VARIANTS:
    for mode in MODES:
      reason = budget.exhausted_reason()
      if args.smoke and (variant, mode, dtype) not in SMOKE_JAX_ROWS:
        reason = f'--smoke measures only {SMOKE_JAX_ROWS}'
      if reason:
        rows.append(
            _row(
                JAX_ROW_KEYS,
                variant=variant,
                mode=mode,
                dtype=dtype,
                status='skipped',
                reason=reason))
        continue
      try:
        rows.append(measure_jax_step(args, variant, mode, dtype, environment))
      except Exception as e:  # pylint: disable=broad-except
        # One failing program (e.g. out of memory) must not cost the others.
        errors.append(f'jax {variant} {mode} {dtype}: {_error_text(e)}')
        rows.append(
            _row(
                JAX_ROW_KEYS,
                variant=variant,
                mode=mode,
                dtype=dtype,
                status='failed',
                reason=_error_text(e)))
      row = rows[-1]
      detail = row['reason'] if row['status'] != 'ok' else (
          f'{row["images_per_s"]:.1f} img/s, compile {row["compile_s"]:.1f} s')
      _progress(budget, f'jax {variant} {mode} {dtype}: {row["status"]}, '
                f'{detail}')
      gc.collect()  # Frees the previous row's state before the next.
  return rows


# ---------------------------------------------------------------------------
# Short CAVGA-R_u run on bottle
# ---------------------------------------------------------------------------


def bottle_config(args):
  """configs/mvtec.py for the short run (generated data under --smoke)."""
  from configs import mvtec  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top

  # configs/mvtec.py is CAVGA-E; this run times the paper's CAVGA-R.
  config = mvtec.paper_cavga_r(mvtec.get_config())
  config.model.variant = SMOKE_BOTTLE_VARIANT if args.smoke else 'R'
  config.data.image_size = args.bottle_image_size
  config.data.root = args.data_root
  config.train.num_steps = args.bottle_steps
  config.train.batch_size = args.bottle_batch
  # Four logged intervals: the first includes compilation, the rest give
  # the steady rate; one checkpoint, the one evaluated.
  config.train.log_every = max(1, args.bottle_steps // 4)
  config.train.checkpoint_every = args.bottle_steps
  config.eval.num_panels = 2
  if args.smoke:
    config.model.latent_channels = args.latent_channels
    for name, widths in _smoke_widths(config.model.variant).items():
      config.model[name] = widths
    if not args.data_root:
      small = tiny.get_config().data
      config.data.name = 'generated'
      config.data.category = 'textures'
      for name in ('num_train', 'num_test_good', 'num_test_per_defect'):
        config.data[name] = small[name]
    config.eval.batch_size = 8
  return config


def run_bottle(args, budget: _Budget) -> dict[str, Any]:
  """The ``bottle`` part: BOTTLE_KEYS."""
  from cavga_jax.programs import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from cavga_jax.programs import train as train_lib  # pylint: disable=g-import-not-at-top
  config = bottle_config(args)
  result = _row(
      BOTTLE_KEYS,
      variant=config.model.variant,
      image_size=args.bottle_image_size,
      num_steps=args.bottle_steps,
      batch=args.bottle_batch,
      maps={})
  result['data'] = (
      config.data.name if config.data.name == 'generated' else os.path.join(
          config.data.root, config.data.category))
  if config.data.name != 'generated' and not os.path.isdir(result['data']):
    result.update(
        status='skipped',
        reason=(
            f'no bottle data: {result["data"]!r} is not a folder (--data_root='
            f'{args.data_root!r})'))
    return result
  reason = budget.exhausted_reason(0.0 if args.smoke else BOTTLE_MIN_LEFT_S)
  if reason:
    result.update(status='skipped', reason=reason)
    return result
  workdir = args.workdir or tempfile.mkdtemp(prefix='accelerator_check_')
  try:
    tic = time.perf_counter()
    train_lib.train(config, workdir)
    result['train_wall_s'] = time.perf_counter() - tic
    with open(os.path.join(workdir, 'train_metrics.jsonl')) as f:
      speeds = [json.loads(line)['images_per_s'] for line in f if line.strip()]
    # The first interval includes compilation.
    steady = statistics.median(speeds[1:] or speeds)
    result.update(images_per_s=steady, steps_per_s=steady / args.bottle_batch)
    tic = time.perf_counter()
    metrics = eval_lib.evaluate(config, workdir)
    result['eval_wall_s'] = time.perf_counter() - tic
    result.update(
        status='ok',
        num_test_images=metrics['num_test_images'],
        headline=metrics['map'],
        maps={
            name: {
                k: v for k, v in values.items() if isinstance(v, (int, float))
            } for name, values in metrics['maps'].items()
        })
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  return result


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def environment_info() -> dict[str, Any]:
  """ENVIRONMENT_KEYS of this process's first JAX device."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return _row(
      ENVIRONMENT_KEYS,
      platform=device.platform,
      device_kind=device.device_kind,
      device_count=jax.device_count(),
      jax=jax.__version__,
      jaxlib=jaxlib.__version__,
      flax=flax.__version__,
      python=platform.python_version(),
      cpu_threads=len(os.sched_getaffinity(0)),
      jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
      peak_flops_per_s=peak_flops(device.device_kind))


def comparison(report: dict[str, Any]) -> list[dict[str, Any]]:
  """COMPARISON_KEYS rows: every measured JAX row against the peer's.

  Empty under --smoke, where the JAX models are narrower than the peer's.
  """
  if report['smoke']:
    return []
  torch_speed = {(r['variant'], r['mode']): r['images_per_s']
                 for r in report['torch_peer']['rows']
                 if r['status'] == 'ok'}
  rows = []
  for row in report['jax_steps']:
    other = torch_speed.get((row['variant'], row['mode']))
    if row['status'] == 'ok' and other:
      rows.append(
          _row(
              COMPARISON_KEYS,
              variant=row['variant'],
              mode=row['mode'],
              jax_dtype=row['dtype'],
              jax_images_per_s=row['images_per_s'],
              torch_images_per_s=other,
              jax_over_torch=row['images_per_s'] / other))
  return rows


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
  if value is None:
    return '-'
  return f'{value / scale:,.{digits}f}'


def markdown(report: dict[str, Any]) -> str:
  """The report as markdown tables."""
  env, settings = report['environment'], report['settings']
  lines = [
      '# Accelerator check', '',
      f'{report["started_utc"]}, {env.get("device_kind")} '
      f'({env.get("platform")}, {env.get("device_count")} device(s)), JAX '
      f'{env.get("jax")}, flax {env.get("flax")}, '
      f'{report["elapsed_s"]:.0f} s of --budget_s {report["budget_s"]:.0f}' +
      (', **--smoke**' if report['smoke'] else '') + '.', '',
      f'Steps: {settings["image_size"]} px, batch {settings["batch"]}, '
      f'median of {settings["steps"]} steps after {settings["warmup"]} '
      'warm-up steps, random init, synthetic inputs. Peak FLOP/s: '
      f'{env.get("peak_flops_per_s") or "unknown device"}; float32 rows '
      'also against the TF32 tensor-core peak (the default precision of '
      'float32 convolutions on NVIDIA GPUs).', '',
      '## JAX train and eval steps', '',
      '| variant | mode | dtype | img/s | step ms | compile s | GFLOP/img |'
      ' TFLOP/s | % of peak | % of TF32 peak | program MiB | status |',
      '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|'
  ]
  for r in report['jax_steps']:
    fraction = r['fraction_of_peak']
    tf32 = r['fraction_of_tf32_peak']
    lines.append(
        f'| {r["variant"]} | {r["mode"]} | {r["dtype"]} | '
        f'{_fmt(r["images_per_s"])} | {_fmt(r["step_ms_median"])} | '
        f'{_fmt(r["compile_s"])} | {_fmt(r["flops_per_image"], 1e9, 2)} | '
        f'{_fmt(r["achieved_flops_per_s"], 1e12, 2)} | '
        f'{_fmt(fraction and 100 * fraction)} | '
        f'{_fmt(tf32 and 100 * tf32)} | '
        f'{_fmt(r["program_bytes"], 2**20, 0)} | {r["status"]} '
        f'{r["reason"] or ""} |')
  peer = report['torch_peer']
  lines += [
      '', '## PyTorch peer (float32, channels-last)', '',
      f'{peer["status"]}{": " + peer["reason"] if peer["reason"] else ""}'
      f'; torch {peer["torch"]} on {peer["device"]}, cudnn.benchmark '
      f'{peer["cudnn_benchmark"]}, TF32 {peer["tf32"]}.', '',
      '| variant | mode | img/s | step ms | peak MiB | status |',
      '|---|---|---:|---:|---:|---|'
  ]
  for r in peer['rows']:
    lines.append(
        f'| {r["variant"]} | {r["mode"]} | {_fmt(r["images_per_s"])} | '
        f'{_fmt(r["step_ms_median"])} | '
        f'{_fmt(r["peak_device_bytes"], 2**20, 0)} | {r["status"]} |')
  if report['comparison']:
    lines += [
        '', '| variant | mode | JAX dtype | JAX img/s | torch img/s |'
        ' JAX / torch |', '|---|---|---|---:|---:|---:|'
    ]
    for r in report['comparison']:
      lines.append(f'| {r["variant"]} | {r["mode"]} | {r["jax_dtype"]} | '
                   f'{_fmt(r["jax_images_per_s"])} | '
                   f'{_fmt(r["torch_images_per_s"])} | '
                   f'**{_fmt(r["jax_over_torch"], digits=2)}** |')
  bottle = report['bottle']
  lines += [
      '', f'## CAVGA-{bottle["variant"]}_u on bottle, every map', '',
      f'{bottle["status"]}'
      f'{": " + bottle["reason"] if bottle["reason"] else ""}; data '
      f'{bottle["data"]}, {bottle["image_size"]} px, '
      f'{bottle["num_steps"]} steps of batch {bottle["batch"]}: '
      f'{_fmt(bottle["steps_per_s"], digits=2)} steps/s '
      f'({_fmt(bottle["images_per_s"])} img/s after the first '
      f'interval), train {_fmt(bottle["train_wall_s"])} s with '
      f'compilation, evaluation {_fmt(bottle["eval_wall_s"])} s, '
      f'{bottle["num_test_images"]} test images, headline map '
      f'{bottle["headline"]}.', '',
      '| map | pixel AUROC | AU-PRO | image AUROC |', '|---|---:|---:|---:|'
  ]
  for name, values in (bottle['maps'] or {}).items():
    lines.append(f'| {name} | {_fmt(values.get("pixel_auroc"), digits=3)} | '
                 f'{_fmt(values.get("aupro"), digits=3)} | '
                 f'{_fmt(values.get("image_auroc"), digits=3)} |')
  lines += [
      '', f'Peak device memory: '
      f'{_fmt(report["peak_device_bytes"], 2**30, 2)} GiB.'
  ]
  if report['skipped']:
    lines += ['', 'Skipped:', ''] + [f'* {s}' for s in report['skipped']]
  if report['errors']:
    lines += ['', 'Errors:', ''] + [f'* `{e}`' for e in report['errors']]
  return '\n'.join(lines) + '\n'


def write_report(report: dict[str, Any], out: str) -> None:
  """Writes JSON_FILE and MARKDOWN_FILE under ``out`` (atomically each)."""
  report = _finite(report)
  for name, text in ((JSON_FILE, json.dumps(report,
                                            indent=1)), (MARKDOWN_FILE,
                                                         markdown(report))):
    path = os.path.join(out, name)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


def _collect_skips(report: dict[str, Any]) -> list[str]:
  skipped = []
  if report['torch_peer']['status'] == 'skipped':
    skipped.append(f'torch_peer: {report["torch_peer"]["reason"]}')
  for r in report['jax_steps']:
    if r['status'] == 'skipped':
      skipped.append(f'jax {r["variant"]} {r["mode"]} {r["dtype"]}: '
                     f'{r["reason"]}')
  if report['bottle'] and report['bottle']['status'] == 'skipped':
    skipped.append(f'bottle: {report["bottle"]["reason"]}')
  return skipped


def run_check(args, argv: Sequence[str]) -> dict[str, Any]:
  """Runs every part, rewriting the report after each; returns it."""
  budget = _Budget(args.budget_s)
  os.makedirs(args.out, exist_ok=True)
  report = {k: None for k in TOP_KEYS}
  report.update(
      schema=1,
      smoke=args.smoke,
      argv=list(argv),
      budget_s=args.budget_s,
      started_utc=datetime.datetime.now(
          datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      environment=_row(ENVIRONMENT_KEYS),
      jax_steps=[],
      comparison=[],
      skipped=[],
      errors=[],
      bottle=_row(BOTTLE_KEYS, status='pending', reason='not started', maps={}),
      settings=_row(
          SETTINGS_KEYS,
          **{k: getattr(args, k) for k in (set(SETTINGS_KEYS) - {'widths'})},
          widths=('paper / '
                  + str(SMOKE_WIDTH_DIVISOR) if args.smoke else 'paper')))
  report['torch_peer'] = run_torch_peer(args, budget)
  _progress(
      budget, f'torch_peer: {report["torch_peer"]["status"]} '
      f'{report["torch_peer"]["reason"] or ""}')
  if report['torch_peer']['status'] == 'failed':
    report['errors'].append(f'torch_peer: {report["torch_peer"]["reason"]}')
  report['errors'] += [
      f'torch_peer {r["variant"]} {r["mode"]}: {r["reason"]}'
      for r in report['torch_peer']['rows']
      if r['status'] == 'failed'
  ]
  # Only now may JAX initialise its backend (see the module docstring).
  import jax  # pylint: disable=g-import-not-at-top
  report['environment'] = environment_info()

  def checkpoint():
    stats = jax.devices()[0].memory_stats()
    report['peak_device_bytes'] = (stats or {}).get('peak_bytes_in_use')
    report['elapsed_s'] = budget.elapsed()
    report['skipped'] = _collect_skips(report)
    report['comparison'] = comparison(report)
    write_report(report, args.out)

  checkpoint()
  report['jax_steps'] += run_jax_steps(args, 'float32', budget,
                                       report['environment'], report['errors'])
  checkpoint()
  try:
    report['bottle'] = run_bottle(args, budget)
  except Exception as e:  # pylint: disable=broad-except
    report['errors'].append(f'bottle: {_error_text(e)}')
    report['bottle'] = _row(
        BOTTLE_KEYS, status='failed', reason=_error_text(e), maps={})
  _progress(
      budget, f'bottle: {report["bottle"]["status"]} '
      f'{report["bottle"]["reason"] or ""}')
  checkpoint()
  report['jax_steps'] += run_jax_steps(args, 'bfloat16', budget,
                                       report['environment'], report['errors'])
  checkpoint()
  return report


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', help='folder for the JSON and markdown files')
  parser.add_argument(
      '--smoke',
      action='store_true',
      help='tiny sizes, generated data: seconds on a CPU')
  parser.add_argument(
      '--budget_s',
      type=float,
      default=420.0,
      help='parts that would start later are skipped')
  parser.add_argument(
      '--peer', default='', help='path to cavga_torch.py (the PyTorch peer)')
  parser.add_argument(
      '--torch_python',
      default=sys.executable,
      help='python that imports torch, for the peer')
  parser.add_argument(
      '--data_root',
      default='',
      help='folder holding bottle/ (MVTec AD layout)')
  parser.add_argument(
      '--workdir',
      default='',
      help='bottle run folder (default: a temporary one)')
  for name, value in FULL.items():
    parser.add_argument(
        f'--{name}',
        type=int,
        default=None,
        help=f'default {value}, --smoke {SMOKE[name]}')
  # The torch worker subprocess (run_torch_peer) only.
  parser.add_argument(
      '--torch_worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument(
      '--variants', default=','.join(VARIANTS), help=argparse.SUPPRESS)
  parser.add_argument(
      '--modes', default=','.join(MODES), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for name, value in (SMOKE if args.smoke else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if not args.torch_worker and not args.out:
    parser.error('--out is required')
  return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.torch_worker:
    _torch_worker(args)
    return None
  report = run_check(args, argv)
  # Also on stdout: the device tool returns the tail of the output even
  # when the files under --out do not come back.
  print(markdown(_finite(report)), flush=True)
  return report


if __name__ == '__main__':
  main()
