"""What the benchmark scripts share: timing, the load average, which library code was measured,
comma lists on the command line and JSON output.

  from benchmarks.common import time_interleaved
  times = time_interleaved({'a': run_a, 'b': run_b}, repeats=5)  # {'a': {'median_s': ...}, ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import time

import jax

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
