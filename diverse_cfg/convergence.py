"""Has a finetuning run converged? A stated criterion on its metrics.jsonl.

Criterion (`plateau`, for one logged figure): over the last `window` fraction
of the run's steps, fit a least-squares line to the figure; its change from
the window's first step to its last, relative to the window's mean, gets a
90 % interval (Student t). The figure has *plateaued* when the whole interval
lies within +-tol (an equivalence test: it is shown to move by at most tol),
is *moving* when the whole interval lies beyond it, and is *undecided* when it
is too uncertain to tell in this many steps. It needs at least 3 logged points
in the window (2 for a figure logged with its items); with fewer it says so.

Where the interval comes from depends on what makes the figure uncertain:

- The held-out KL (`kl_heldout`: the distillation KL teacher-forced on the same
  held-out sequences every finetune.heldout_every steps, finetune.heldout_kl_fn) has no sampling
  noise from one reading to the next: its wiggles are the parameters' own
  movement, part of the change, not noise around it. What is uncertain is
  which sequences were held out. Each sequence's KL is logged
  (`kl_heldout/items`); each gets its own least-squares line, and the interval
  of the mean change is a t interval over the sequences: how often the run
  reads it no longer decides the interval's width.
- The on-policy KL (`kl`, a Monte-Carlo estimate over each step's rollouts) is
  noisy and nearly independent from one logged step to the next: its interval
  comes from the scatter of the readings around the line, estimated from a
  quadratic fit's residuals (so that a bending curve is not taken for noise)
  and widened, when those residuals are serially correlated (lag-1
  autocorrelation rho > 0, `lag1_autocorrelation`), by sqrt((1 + rho) / (1 - rho))
  with the degrees of freedom shrunk to the effective number of points.

Both are proxies. The objective itself (`objective`: the on-policy KL summed
over each rollout, finetune.objective_rollouts of them spread over the first
finetune.objective_prompts validation prompts) is read at the window's first logged step
and at the last, with the same prompts and keys both times (common random
numbers), each prompt's mean logged (`objective/items`): the change is paired
by prompt, with a t interval over the prompts (the items' line through two
readings is their difference).

A student (`check`) has converged when its objective, read over the window,
has plateaued: its verdict is the student's, the proxies shown beside it (they
miss the objective both ways: docs/evaluation.md). Runs that did not read it
have converged when one proxy has plateaued and neither is moving. Runs logged
without `kl_heldout` are judged on `kl` alone; a `kl_heldout` logged without
its items (older runs) is read like `kl`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import stats

from diverse_cfg import workdir as workdir_lib

LEVEL = 0.9  # two one-sided tests at 5 % each


def items_key(key: str) -> str:
  """The metrics.jsonl field holding a figure's per-item values (the figure is their mean)."""
  return f'{key}/items'


def window_start(last: int, window: float) -> float:
  """The first step of the convergence window of a run whose last step is `last`."""
  return last - window * last


def reading(key: str, values) -> dict:
  """A figure logged with its items: {key: their mean, items_key(key): each value}."""
  values = np.asarray(values, np.float64)
  return {key: float(values.mean()), items_key(key): [float(v) for v in values]}


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
  points = [(r['step'], r[key], r.get(items_key(key))) for r in rows
            if key in r and np.isfinite(r[key])]
  criterion = (f'least-squares line of {key} over the last {window:.0%} of steps moves by '
               f'<= {tol:.0%} of its mean, at {LEVEL:.0%} confidence')
  out = {'metric': key, 'criterion': criterion, 'plateaued': False, 'verdict': 'undecided'}
  if not points:
    return {**out, 'reason': f'no {key} logged'}
  start = window_start(points[-1][0], window)
  inside = [p for p in points if p[0] >= start]
  items = [p[2] for p in inside]
  by_items = (all(v is not None for v in items) and len({len(v) for v in items}) == 1
              and len(items[0]) > 1)
  need = 2 if by_items else 3  # a line per item through 2 readings: their paired change
  if len(inside) < need:
    return {**out, 'reason': f'{len(inside)} logged points in the window, need {need}'}
  steps, values, _ = zip(*inside)
  x, y = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  mean = float(y.mean())
  if by_items:
    change, half, noise = _change_over_items(x, np.asarray(items, np.float64))
  else:
    change, half, noise = _change_over_readings(x, y)
  scale = abs(mean) if mean else float('inf')
  relative, lo, hi = change / scale, (change - half) / scale, (change + half) / scale
  verdict = ('plateaued' if -tol <= lo and hi <= tol else
             'moving' if lo > tol or hi < -tol else 'undecided')
  return {**out, 'plateaued': verdict == 'plateaued', 'verdict': verdict,
          'relative_change': float(relative), 'relative_change_interval': [float(lo), float(hi)],
          'window_steps': [int(x[0]), int(x[-1])], 'mean': mean, **noise,
          'first': float(y[0]), 'last': float(y[-1])}


def _change_over_items(x, y_RxI) -> tuple[float, float, dict]:
  """(change, half-width, details) of the mean of I items read at steps x: each item's
  least-squares change over the window; a t interval over the items."""
  change_I = np.polyfit(x, y_RxI, 1)[0] * (x[-1] - x[0])
  n = change_I.size
  half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * change_I.std(ddof=1) / np.sqrt(n)
  return float(change_I.mean()), float(half), {'interval_from': 'items', 'items': int(n)}


def _change_over_readings(x, y) -> tuple[float, float, dict]:
  """(change, half-width, details) of one noisy reading per step: the line's change, its
  interval from the residuals of a quadratic fit, widened for their serial correlation."""
  slope, intercept = np.polyfit(x, y, 1)
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
  span = x[-1] - x[0]
  half = stats.t.ppf(0.5 + LEVEL / 2, dof) * se_slope * span
  return float(slope * span), float(half), {'interval_from': 'readings',
                                            'residual_autocorrelation': float(rho)}


def paired_change(before_P, after_P) -> dict:
  """The mean change of a figure read twice on the same P items (before -> after), its t
  interval over the items (LEVEL), and both relative to the two readings' mean
  (benchmarks/objective_change.py: the objective at two checkpoints, paired by prompt)."""
  before_P, after_P = np.asarray(before_P, np.float64), np.asarray(after_P, np.float64)
  d_P = after_P - before_P
  half = stats.t.ppf(0.5 + LEVEL / 2, len(d_P) - 1) * d_P.std(ddof=1) / np.sqrt(len(d_P))
  mean, change = (before_P.mean() + after_P.mean()) / 2, float(d_P.mean())
  return {'change': change, 'interval': [change - half, change + half],
          'relative': change / mean,
          'relative_interval': [(change - half) / mean, (change + half) / mean]}


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
           'undecided': 'plateau undecided (too uncertain to tell in these steps)'}

  def reading(v):
    if 'reason' in v:
      return f'{v["metric"]} unknown ({v["reason"]})'
    lo, hi = v['window_steps']
    c_lo, c_hi = v['relative_change_interval']
    over = f', interval over {v["items"]} items' if v.get('interval_from') == 'items' else ''
    return (f'{v["metric"]} {state[v["verdict"]]} ({v["relative_change"]:+.1%} '
            f'[{c_lo:+.1%}, {c_hi:+.1%}] over steps {lo}-{hi}, mean {v["mean"]:.4g}{over})')

  overall = 'converged' if verdict['plateaued'] else 'not shown converged'
  return (f'{name}: {overall}: {"; ".join(reading(r) for r in readings)}; '
          f'criterion: {verdict["criterion"]}')


def run_metrics(run_dir: str) -> list[dict]:
  """read_metrics of a run directory's metrics.jsonl."""
  return read_metrics(workdir_lib.metrics_file(run_dir))


def check(rows: list[dict], f) -> dict:
  """A student's verdict from its logged rows, with the finetune section's window and tol:
  {'plateaued', 'verdict', 'criterion', 'readings': the plateau() of objective, kl_heldout and
  kl, those never logged left out}. The objective's verdict is the student's when it was read
  over the window; else converged means one proxy plateaued and neither moving (module
  docstring)."""
  readings = [plateau(rows, key, f.plateau_window, f.plateau_tol)
              for key in ('objective', 'kl_heldout', 'kl')]
  readings = [r for r in readings if not r.get('reason', '').startswith('no ')] or readings[-1:]
  band = f'by <= {f.plateau_tol:.0%} of its mean'
  if readings[0]['metric'] == 'objective' and 'reason' not in readings[0]:
    verdict = readings[0]['verdict']
    criterion = (f'the objective, read at both ends of the last {f.plateau_window:.0%} of steps on '
                 f'the same prompts and keys, moves {band} (paired over prompts)')
  else:
    proxies = [r for r in readings if r['metric'] != 'objective']
    verdicts = [r['verdict'] for r in proxies if 'reason' not in r]
    verdict = ('plateaued' if 'plateaued' in verdicts and 'moving' not in verdicts else
               'moving' if 'moving' in verdicts else 'undecided')
    criterion = (f'least-squares line of {" or ".join(r["metric"] for r in proxies)} over the '
                 f'last {f.plateau_window:.0%} of steps moves {band}'
                 + (', and neither is shown to move by more' if len(proxies) > 1 else ''))
  criterion += f', at {LEVEL:.0%} confidence'
  return {'plateaued': verdict == 'plateaued', 'criterion': criterion, 'readings': readings,
          'verdict': verdict}
