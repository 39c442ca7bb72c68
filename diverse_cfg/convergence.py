"""Has a finetuning run converged? A stated criterion on its metrics.jsonl.

Criterion (`plateau`): over the last `window` fraction of the run's steps,
fit a least-squares line to the logged KL; its change from the window's first
step to its last, relative to the window's mean KL, gets a 90 % interval from
the fit's residuals (Student t). The run has *plateaued* when the whole
interval lies within +-tol (an equivalence test: the KL is shown to move by
at most tol), is *moving* when the whole interval lies beyond it, and is
*undecided* when the step-to-step noise of the KL is too large to tell in
this many steps. The KL of a step is a Monte-Carlo estimate over its rollouts,
so a point reading alone flips with the noise. It needs at least 3 logged
points in the window; with fewer it says so and does not call the run converged.
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import stats

from diverse_cfg import workdir as workdir_lib

LEVEL = 0.9  # two one-sided tests at 5 % each


def read_metrics(path: str) -> list[dict]:
  """The logged rows of a metrics.jsonl, one per step (a resumed run's rewrite of a step wins)."""
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[row['step']] = {**by_step.get(row['step'], {}), **row}
  return [by_step[s] for s in sorted(by_step)]


def plateau(rows: list[dict], key: str = 'kl', window: float = 0.5, tol: float = 0.1) -> dict:
  """{'plateaued', 'relative_change', 'window_steps', 'mean', 'criterion', ...} for one run."""
  points = [(r['step'], r[key]) for r in rows if key in r and np.isfinite(r[key])]
  criterion = (f'least-squares line of {key} over the last {window:.0%} of steps moves by '
               f'<= {tol:.0%} of its mean, at {LEVEL:.0%} confidence')
  out = {'metric': key, 'criterion': criterion, 'plateaued': False, 'verdict': 'undecided'}
  if not points:
    return {**out, 'reason': f'no {key} logged'}
  last = points[-1][0]
  start = last - window * last
  steps, values = map(np.asarray, zip(*[p for p in points if p[0] >= start]))
  if len(steps) < 3:
    return {**out, 'reason': f'{len(steps)} logged points in the window, need 3'}
  x, y = steps.astype(np.float64), values.astype(np.float64)
  slope, intercept = np.polyfit(x, y, 1)
  mean = float(y.mean())
  span = float(x[-1] - x[0])
  dof = len(x) - 2
  se_slope = np.sqrt(np.sum((y - slope * x - intercept) ** 2) / dof / np.sum((x - x.mean()) ** 2))
  half = float(stats.t.ppf(0.5 + LEVEL / 2, dof) * se_slope * span)
  scale = abs(mean) if mean else float('inf')
  change = slope * span
  relative, lo, hi = change / scale, (change - half) / scale, (change + half) / scale
  verdict = ('plateaued' if -tol <= lo and hi <= tol else
             'moving' if lo > tol or hi < -tol else 'undecided')
  return {**out, 'plateaued': verdict == 'plateaued', 'verdict': verdict,
          'relative_change': float(relative), 'relative_change_interval': [float(lo), float(hi)],
          'window_steps': [int(steps[0]), int(steps[-1])], 'mean': mean,
          'first': float(values[0]), 'last': float(values[-1])}


def describe(name: str, verdict: dict) -> str:
  if 'reason' in verdict:
    return f'{name}: convergence unknown ({verdict["reason"]})'
  state = {'plateaued': 'plateaued', 'moving': 'is still moving',
           'undecided': 'plateau undecided (the KL is too noisy to tell in these steps)'}
  lo, hi = verdict['window_steps']
  c_lo, c_hi = verdict['relative_change_interval']
  return (f'{name}: {verdict["metric"]} {state[verdict["verdict"]]} '
          f'({verdict["relative_change"]:+.1%} [{c_lo:+.1%}, {c_hi:+.1%}] over steps {lo}-{hi}, '
          f'mean {verdict["mean"]:.4g}; criterion: {verdict["criterion"]})')


def run_metrics(run_dir: str) -> list[dict]:
  """read_metrics of a run directory's metrics.jsonl."""
  return read_metrics(workdir_lib.metrics_file(run_dir))


def check(rows: list[dict], f) -> dict:
  """plateau of the KL in a run's logged rows with the finetune section's window and tol."""
  return plateau(rows, 'kl', f.plateau_window, f.plateau_tol)
