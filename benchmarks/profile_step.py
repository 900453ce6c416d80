"""Where the time of a CAVGA step goes: per-op totals from an XLA trace.

  python benchmarks/profile_step.py --variant R --image-size 256 --batch 8 --mode train

Runs ``benchmark.py``'s step (same model, inputs and flags) ``--steps``
times under ``jax.profiler.trace`` and prints one JSON line: the median
step time and the device ops of the optimised HLO grouped by kind
(convolutions producing activations -- forward passes and input
gradients -- and kernel gradients, matmuls, elementwise fusions, copies and
transposes, reductions, other), each with
its ms per step and share, and the ``--top`` most expensive single ops
with the JAX operation they come from (HLO ``metadata.op_name``). Kernels
that XLA:CPU hands to a library (``ynn_fusion``, ``xnn_fusion``,
``onednn``) are classified by the ops they contain. XLA's own (Eigen)
convolutions, which ``layers.compiler_options`` selects on the CPU, mostly
leave no trace event: their time is in ``unattributed_ms`` (step time minus
the traced ops), so ``--xla-defaults`` (YNNPACK) profiles attribute better.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([\w\-]+)\(')
_CALLS = re.compile(r'(?:calls|to_apply)=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r'^\s*\w+\[(\d+),')


def _parse_hlo(text: str):
  """(instruction -> (line, called computation), computation -> its lines)."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    calls = _CALLS.search(line)
    instructions[match.group(1)] = (line, calls.group(1) if calls else None)
    computations[current].append(line)
  return instructions, computations


def _opcode(line: str) -> str:
  return _INSTRUCTION.match(line).group(2)


def _kind(lines: list[str], batch: int) -> str:
  """The category of one executed op (its line plus a fusion's body).

  XLA:CPU canonicalises every convolution to the forward NHWC form
  (``b01f_01io->b01f``), so the kernel gradient is recognised by its
  "batch" dimension: the channels it reduces over, not the image batch.
  """
  opcodes = {_opcode(line) for line in lines}
  for line in lines:
    if _opcode(line) == 'convolution':
      shape = _SHAPE.search(line.split('=', 1)[1])
      leading = int(shape.group(1)) if shape else batch
      return 'conv_activations' if leading == batch else 'conv_kernel_grad'
  if 'dot' in opcodes:
    return 'matmul'
  if opcodes & {'reduce', 'reduce-window', 'select-and-scatter'}:
    return 'reduction'
  if opcodes <= {
      'copy', 'transpose', 'pad', 'slice', 'concatenate', 'dynamic-slice',
      'dynamic-update-slice', 'reshape', 'bitcast', 'broadcast', 'gather',
      'parameter', 'constant', 'tuple', 'get-tuple-element'
  }:
    return 'copy_transpose_pad'
  return 'elementwise_fusion' if len(opcodes) > 1 else 'other'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  benchmark.add_step_arguments(parser)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=15)
  args = parser.parse_args()

  out = tempfile.mkdtemp(prefix='cavga_profile_')
  # The optimised HLO names the ops the trace shows.
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_dump_to={out}/hlo --xla_dump_hlo_as_text'
      ' --xla_dump_hlo_pass_re=^$')
  run = benchmark.build_step(args)
  jax.block_until_ready(run())
  jax.block_until_ready(run())
  times = []
  with jax.profiler.trace(f'{out}/trace', create_perfetto_trace=True):
    for _ in range(args.steps):
      tic = time.perf_counter()
      jax.block_until_ready(run())
      times.append(time.perf_counter() - tic)

  step_name = 'train_step' if args.mode == 'train' else 'eval_step'
  hlo_files = sorted(
      glob.glob(f'{out}/hlo/*jit_{step_name}*after_optimizations.txt'),
      key=os.path.getsize)
  instructions, computations = _parse_hlo(open(hlo_files[-1]).read())
  trace_file = glob.glob(
      f'{out}/trace/plugins/profile/*/perfetto_trace.json.gz')
  events = json.load(gzip.open(trace_file[0]))
  events = events['traceEvents'] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') == 'X' and name in instructions:
      per_op[name] += event.get('dur', 0.0) / 1e3 / args.steps  # ms/step
  by_kind = collections.Counter()
  top = []
  for name, ms in per_op.most_common():
    line, called = instructions[name]
    kind = _kind([line] + computations.get(called, []), args.batch)
    by_kind[kind] += ms
    if len(top) < args.top:
      op_names = _OP_NAME.findall(' '.join([line]
                                           + computations.get(called, [])))
      top.append(
          dict(
              op=name,
              kind=kind,
              ms=round(ms, 1),
              jax_op=(op_names[-1] if op_names else '')[-120:]))
  step_ms = 1000 * statistics.median(times)
  total = sum(by_kind.values())
  print(
      json.dumps(
          dict(
              variant=args.variant,
              mode=args.mode,
              image_size=args.image_size,
              batch=args.batch,
              dtype=args.dtype,
              step_ms_median=round(step_ms, 1),
              op_ms_sum=round(total, 1),
              unattributed_ms=round(step_ms - total, 1),
              by_kind={
                  k: dict(ms=round(v, 1), share=round(v / total, 3))
                  for k, v in by_kind.most_common()
              },
              top=top,
              cpu_threads=len(os.sched_getaffinity(0)),
              jax=jax.__version__)))


if __name__ == '__main__':
  main()
