"""What the benchmark scripts share: timing, the load average, which library code was measured,
comma lists on the command line, JSON output, the measured matmul rate of a device and a
profiler's kernel-time breakdown.

  from benchmarks.common import time_interleaved
  times = time_interleaved({'a': run_a, 'b': run_b}, repeats=5)  # {'a': {'median_s': ...}, ...}
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp

from diverse_cfg import model as model_lib


def load_avg() -> list[float] | None:
  """The 1/5/15-minute load averages (None where the OS has none); recorded with every figure."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def time_interleaved(fns: dict, repeats: int) -> dict:
  """Median wall time (s) of each no-argument program, compilation excluded.

  Each program is called once to compile and warm up; then the timed calls
  go round-robin (A B C A B C ...) so that a change in the machine's load hits
  all programs alike and their ratio stays meaningful. Every call ends with
  `block_until_ready`.
  """
  out = {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    out[name] = {'first_call_s': time.perf_counter() - t0, 'times_s': []}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      out[name]['times_s'].append(time.perf_counter() - t0)
  for r in out.values():
    r.update(median_s=statistics.median(r['times_s']), min_s=min(r['times_s']),
             max_s=max(r['times_s']), repeats=repeats)
  return out


def library_info() -> dict:
  """Which library code was measured: its path, git HEAD, local edits, file hashes."""
  lib_dir = os.path.dirname(os.path.abspath(model_lib.__file__))
  files = ('model.py', 'sampling.py', 'sharding.py')
  info = {'path': lib_dir, 'sha1': {}}
  for f in files:
    with open(os.path.join(lib_dir, f), 'rb') as fh:
      info['sha1'][f] = hashlib.sha1(fh.read()).hexdigest()[:12]

  def git(*cmd):
    try:
      r = subprocess.run(['git', '-C', lib_dir, *cmd], capture_output=True, text=True, timeout=10)
      return r.stdout.rstrip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
      return None

  info['git_head'] = git('rev-parse', '--short', 'HEAD')
  status = git('status', '--porcelain', '--', *files)
  info['uncommitted'] = None if status is None else [l[3:] for l in status.splitlines()]
  return info


def write_json(path: str | None, result: dict) -> None:
  """Writes a benchmark's figures to path (if given), creating its directory."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'\nwrote {path}')


def csv_list(s: str | None) -> list[str]:
  """'a,b,,c' -> ['a', 'b', 'c']; None or '' -> []."""
  return [x for x in (s or '').split(',') if x]


def timed(fn, *args, repeats: int, name: str = ''):
  """Median seconds per call (compilation excluded); printed at once under a name, if given."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))  # compile + warm up
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  t = statistics.median(times)
  if name:  # so a run cut short still shows what it measured
    print(f'{name}: {t * 1e3:.2f} ms (first call, with compilation: {first:.1f} s)', flush=True)
  return t


def matmul_peak(dtype, repeats: int = 5) -> float:
  """FLOP/s of one device on square matmuls (the MFU denominator).

  Eight chained products per call, so dispatch overhead does not hide the peak
  (one 4096^2 product per call measured 240 TFLOP/s on an H200 that does ~790).
  """
  n = 2048 if jax.devices()[0].platform == 'cpu' else 8192
  x = jnp.ones((n, n), dtype) / n

  @jax.jit
  def chain(a):
    return jax.lax.fori_loop(0, 8, lambda _, b: b @ x, a)

  return 8 * 2 * n ** 3 / timed(chain, x, repeats=repeats)


def _kind(kernel: str) -> str:
  name = kernel.lower()
  if 'copy' in name or 'transpose' in name:
    return 'copy/transpose'
  if any(k in name for k in ('dot', 'ynn', 'gemm', 'cublas', 'matmul')):
    return 'matmul fusions'
  return 'other'


def kernel_breakdown(run_step, steps: int) -> dict:
  """Kernel time per step by kind and the top kernels, from a profiler trace of `steps` calls;
  and how many of the compute threads were running a kernel, over the calls' wall time."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      start = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(run_step())
      wall_ms = (time.perf_counter() - start) * 1e3 / steps
    data = jax.profiler.ProfileData.from_file(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0])
    per_kernel = collections.Counter()
    edges = []  # (time, +1 kernel started / -1 ended), over every compute thread
    for plane in data.planes:
      on_device = plane.name.startswith('/device:')
      for line in plane.lines:
        # XLA CPU's compute threads; on an accelerator, its per-op line (not yet run on one).
        if not (line.name == 'XLA Ops' if on_device else line.name.startswith('tf_XLAEigen')):
          continue
        for ev in line.events:
          if not ev.name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):  # wrappers, waits
            per_kernel[ev.name] += ev.duration_ns / 1e6 / steps
            edges += [(ev.start_ns, 1), (ev.start_ns + ev.duration_ns, -1)]
  kinds = collections.Counter()
  for name, ms in per_kernel.items():
    kinds[_kind(name)] += ms
  busy = collections.Counter()  # ms per step during which n kernels ran at once
  running, last = 0, None
  for t, delta in sorted(edges):
    if last is not None and running:
      busy[running] += (t - last) / 1e6 / steps
    running, last = running + delta, t
  return {'ms_per_step_by_kind': {k: round(v, 2) for k, v in kinds.most_common()},
          'top_kernels_ms_per_step': {k: round(v, 2) for k, v in per_kernel.most_common(12)},
          'wall_ms_per_step': round(wall_ms, 2),
          # (n <= 0 would be nested events closing out of order: rounding noise, left out)
          'ms_per_step_with_n_kernels_running': {n: round(v, 2) for n, v in sorted(busy.items())
                                                 if n > 0}}


def matmul_rate(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
  """FLOP/s of one device on [m, k] @ [k, n] products, eight per call (as matmul_peak).

  Each product reads the previous one's scalar, so XLA can neither hoist nor merge them.
  """
  a = jnp.ones((m, k), dtype) / k
  w = jnp.ones((k, n), dtype) / k

  @jax.jit
  def chain(s):
    return jax.lax.fori_loop(0, 8, lambda _, s: jnp.sum((a * s) @ w) / (m * n), s)

  return 8 * 2 * m * k * n / timed(chain, jnp.ones((), dtype), repeats=repeats)
