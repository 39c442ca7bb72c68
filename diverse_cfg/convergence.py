"""Has a finetuning run converged? A stated criterion on its metrics.jsonl.

Criterion (`plateau`): over the last `window` fraction of the run's steps,
fit a least-squares line to the logged KL; the run has plateaued when that
line moves by at most `tol` x the window's mean KL from the window's first
step to its last (a flat line: |slope x span| <= tol x mean). It needs at
least 3 logged points in the window; with fewer it says so and does not call
the run converged.
"""

from __future__ import annotations

import json
import os

import numpy as np


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
               f'<= {tol:.0%} of its mean')
  out = {'metric': key, 'criterion': criterion, 'plateaued': False}
  if not points:
    return {**out, 'reason': f'no {key} logged'}
  last = points[-1][0]
  start = last - window * last
  steps, values = map(np.asarray, zip(*[p for p in points if p[0] >= start]))
  if len(steps) < 3:
    return {**out, 'reason': f'{len(steps)} logged points in the window, need 3'}
  slope = np.polyfit(steps.astype(np.float64), values.astype(np.float64), 1)[0]
  mean = float(values.mean())
  change = float(slope * (steps[-1] - steps[0]))
  relative = change / abs(mean) if mean else float('inf')
  return {**out, 'plateaued': bool(abs(relative) <= tol), 'relative_change': relative,
          'window_steps': [int(steps[0]), int(steps[-1])], 'mean': mean,
          'first': float(values[0]), 'last': float(values[-1])}


def describe(name: str, verdict: dict) -> str:
  if 'reason' in verdict:
    return f'{name}: convergence unknown ({verdict["reason"]})'
  state = 'plateaued' if verdict['plateaued'] else 'has NOT plateaued'
  lo, hi = verdict['window_steps']
  return (f'{name}: {verdict["metric"]} {state} ({verdict["relative_change"]:+.1%} over steps '
          f'{lo}-{hi}, mean {verdict["mean"]:.4g}; criterion: {verdict["criterion"]})')


def run_metrics(run_dir: str) -> list[dict]:
  """read_metrics of a stage directory's metrics.jsonl."""
  return read_metrics(os.path.join(run_dir, 'metrics.jsonl'))


def check(rows: list[dict], f) -> dict:
  """plateau of the KL in a run's logged rows with the finetune section's window and tol."""
  return plateau(rows, 'kl', f.plateau_window, f.plateau_tol)
