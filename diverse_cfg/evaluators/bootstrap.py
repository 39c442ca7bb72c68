"""Figures as functions of the prompts drawn: bootstrap intervals and paired differences.

An evaluation scores P held-out prompts x K generations. Every figure is a
`Figure`: its value over any multiset of prompts (a resample), so one set of
resampled prompt indices gives every figure's interval, and the same indices
applied to two systems (sampled on the same prompts with the same keys) give
a *paired* interval of their difference.

    idx_RxP = resample(P, num_resamples, seed)   # row 0 is every prompt once
    fig.point()                                   # the figure on the evaluation itself
    interval(fig.draws(idx_RxP), level)           # percentile interval
    interval(a.draws(idx_RxP) - b.draws(idx_RxP)) # paired difference
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Figure:
  """fn(idx_RxP int) -> [R]: the figure over prompts idx (with repetition), one per row."""
  fn: Callable[[np.ndarray], np.ndarray]
  num_prompts: int

  def draws(self, idx_RxP: np.ndarray) -> np.ndarray:
    return np.asarray(self.fn(np.asarray(idx_RxP)), np.float64)

  def point(self) -> float:
    return float(self.draws(np.arange(self.num_prompts)[None])[0])


def ratio(num_P, den_P) -> Figure:
  """sum(num) / sum(den) over the drawn prompts (a mean of per-row values, a rate of counts)."""
  num_P, den_P = np.asarray(num_P, np.float64), np.asarray(den_P, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    return Figure(lambda idx: num_P[idx].sum(-1) / den_P[idx].sum(-1), len(num_P))


def prompt_mean(values_P) -> Figure:
  """The mean over the drawn prompts of a per-prompt value; NaN prompts are left out."""
  values_P = np.asarray(values_P, np.float64)
  finite_P = np.isfinite(values_P)
  return ratio(np.where(finite_P, values_P, 0.0), finite_P)


def row_mean(values_PxK) -> Figure:
  """The mean over every generation of the drawn prompts."""
  values_PxK = np.asarray(values_PxK, np.float64)
  return ratio(values_PxK.sum(-1), np.full(len(values_PxK), values_PxK.shape[-1]))


def per_draw(fn_of_prompts: Callable[[np.ndarray], float], num_prompts: int) -> Figure:
  """A figure that is not a ratio (e.g. a distance between distributions): one call per draw."""
  return Figure(lambda idx: np.asarray([fn_of_prompts(row) for row in idx]), num_prompts)


def resample(num_prompts: int, num_resamples: int, seed: int) -> np.ndarray:
  """[1 + R, P] prompt indices: row 0 is the evaluation itself, then R bootstrap draws."""
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, num_prompts, size=(num_resamples, num_prompts))
  return np.concatenate([np.arange(num_prompts)[None], draws]).astype(np.int64)


def interval(draws_R: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The percentile interval of the bootstrap draws (row 0, the point, is excluded).

  Empirical quantiles (no interpolation), so infinite draws (a ratio over a
  zero) are ordered, not turned into NaN; NaN draws (a figure undefined on a
  draw) are left out.
  """
  draws_R = np.asarray(draws_R, np.float64)[1:]
  draws_R = draws_R[~np.isnan(draws_R)]
  if not draws_R.size:
    return float('nan'), float('nan')
  tail = 100 * (1 - level) / 2
  lo, hi = np.percentile(draws_R, [tail, 100 - tail], method='inverted_cdf')
  return float(lo), float(hi)


def summary(draws_R: np.ndarray, level: float = 0.95) -> dict[str, float]:
  """{'value': the point (row 0), 'lo', 'hi': its interval}."""
  lo, hi = interval(draws_R, level)
  return {'value': float(np.asarray(draws_R)[0]), 'lo': lo, 'hi': hi}


def hypervolume(points_Nx2, ref_2) -> float:
  """Area dominated by the points (both coordinates maximised) above the reference point.

  Points not above the reference in both coordinates add nothing.
  """
  pts = np.asarray(points_Nx2, np.float64).reshape(-1, 2)
  ref = np.asarray(ref_2, np.float64)
  pts = pts[np.all(pts > ref, axis=1)]
  area, best_y = 0.0, ref[1]
  for x, y in pts[np.argsort(-pts[:, 0], kind='stable')]:  # sweep from the largest x
    if y > best_y:
      area += (x - ref[0]) * (y - best_y)
      best_y = y
  return float(area)
