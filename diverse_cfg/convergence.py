"""Has a finetuning run converged? A stated criterion on its metrics.jsonl.

Criterion (`plateau`, for one logged figure): over the last `window` fraction
of the run's steps, fit a least-squares line to the figure; its change from
the window's first step to its last, relative to the window's mean, gets a
90 % interval (Student t) from the residuals of a quadratic fit, so that a
bending curve is not taken for noise; when they are serially correlated
(lag-1 autocorrelation rho > 0, `lag1_autocorrelation`) the standard error is
widened by sqrt((1 + rho) / (1 - rho)) and the degrees of freedom shrink to
the effective number of points. The figure has *plateaued* when the whole
interval lies within +-tol (an equivalence test: it is shown to move by at
most tol), is *moving* when the whole interval lies beyond it, and is
*undecided* when its noise is too large to tell in this many steps. It needs
at least 3 logged points in the window; with fewer it says so.

A student (`check`) has converged when one of its two KL readings has
plateaued and neither is moving: the held-out KL (`kl_heldout`: the
distillation KL teacher-forced on the same held-out sequences at every log
step, finetune.heldout_kl_fn; free of sampling noise, but it drifts with the
parameters, slowly when a diversity reward keeps them moving) and the
on-policy KL (`kl`, a Monte-Carlo estimate over each step's rollouts: noisy,
but nearly independent from one logged step to the next). Runs logged without
`kl_heldout` are judged on `kl` alone.
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
  # The noise (spread and serial correlation) from a quadratic's residuals, so that a
  # bending curve is not mistaken for noise; the change is the line's (for evenly spaced
  # steps it equals the quadratic's from the window's first step to its last).
  if len(x) >= 5:
    resid = y - np.polyval(np.polyfit(x, y, 2), x)
    dof = len(x) - 3
  else:
    resid = y - slope * x - intercept
  se_slope = np.sqrt(np.sum(resid ** 2) / dof / np.sum((x - x.mean()) ** 2))
  rho = lag1_autocorrelation(resid)
  if rho > 0:  # AR(1) residuals: fewer effective points, a wider interval
    se_slope *= np.sqrt((1 + rho) / (1 - rho))
    dof = max(1.0, len(x) * (1 - rho) / (1 + rho) - (len(x) - dof))  # less the fitted terms
  half = float(stats.t.ppf(0.5 + LEVEL / 2, dof) * se_slope * span)
  scale = abs(mean) if mean else float('inf')
  change = slope * span
  relative, lo, hi = change / scale, (change - half) / scale, (change + half) / scale
  verdict = ('plateaued' if -tol <= lo and hi <= tol else
             'moving' if lo > tol or hi < -tol else 'undecided')
  return {**out, 'plateaued': verdict == 'plateaued', 'verdict': verdict,
          'relative_change': float(relative), 'relative_change_interval': [float(lo), float(hi)],
          'window_steps': [int(steps[0]), int(steps[-1])], 'mean': mean,
          'residual_autocorrelation': float(rho),
          'first': float(values[0]), 'last': float(values[-1])}


def lag1_autocorrelation(resid) -> float:
  """The lag-1 autocorrelation of a quadratic fit's residuals, clipped to [-0.95, 0.95] (0 when
  constant).

  From 5 points on, corrected for its small-sample bias as (n r + 3) / (n - 4) (Kendall's
  (1 + 4 rho) / n for a mean, calibrated by simulation for the three fitted terms): with it the
  90 % interval covers the true change 81 % of the time at rho = 0.7 over 15 points (51 % with
  no AR(1) widening) and 94 % for independent noise
  (tests/test_convergence.py).
  """
  r = np.asarray(resid, np.float64) - np.mean(resid)
  denom, n = float(np.sum(r ** 2)), len(r)
  if n < 3 or denom == 0:
    return 0.0
  rho = np.sum(r[1:] * r[:-1]) / denom
  if n >= 5:
    rho = (rho * n + 3) / (n - 4)
  return float(np.clip(rho, -0.95, 0.95))


def describe(name: str, verdict: dict) -> str:
  """One line: a plateau() reading, or check()'s verdict with each of its readings."""
  readings = verdict.get('readings', [verdict])
  if len(readings) == 1 and 'reason' in readings[0]:
    return f'{name}: convergence unknown ({readings[0]["reason"]})'
  state = {'plateaued': 'plateaued', 'moving': 'is still moving',
           'undecided': 'plateau undecided (too noisy to tell in these steps)'}

  def reading(v):
    if 'reason' in v:
      return f'{v["metric"]} unknown ({v["reason"]})'
    lo, hi = v['window_steps']
    c_lo, c_hi = v['relative_change_interval']
    return (f'{v["metric"]} {state[v["verdict"]]} ({v["relative_change"]:+.1%} '
            f'[{c_lo:+.1%}, {c_hi:+.1%}] over steps {lo}-{hi}, mean {v["mean"]:.4g})')

  overall = 'converged' if verdict['plateaued'] else 'not shown converged'
  return (f'{name}: {overall}: {"; ".join(reading(r) for r in readings)}; '
          f'criterion: {verdict["criterion"]}')


def run_metrics(run_dir: str) -> list[dict]:
  """read_metrics of a run directory's metrics.jsonl."""
  return read_metrics(workdir_lib.metrics_file(run_dir))


def check(rows: list[dict], f) -> dict:
  """A student's verdict from its logged rows, with the finetune section's window and tol:
  {'plateaued', 'verdict', 'criterion', 'readings': the plateau() of kl_heldout and of kl}.
  Converged: one of them plateaued, neither moving (module docstring)."""
  readings = [plateau(rows, key, f.plateau_window, f.plateau_tol) for key in ('kl_heldout', 'kl')]
  if readings[0].get('reason', '').startswith('no '):  # logged before the held-out KL existed
    readings = readings[1:]
  verdicts = [r['verdict'] for r in readings if 'reason' not in r]
  plateaued = 'plateaued' in verdicts and 'moving' not in verdicts
  criterion = (f'least-squares line of {" or ".join(r["metric"] for r in readings)} over the last '
               f'{f.plateau_window:.0%} of steps moves by <= {f.plateau_tol:.0%} of its mean, at '
               f'{LEVEL:.0%} confidence' + (', and neither is shown to move by more'
                                            if len(readings) > 1 else ''))
  return {'plateaued': plateaued, 'criterion': criterion, 'readings': readings,
          'verdict': 'plateaued' if plateaued else 'moving' if 'moving' in verdicts
          else 'undecided'}
