"""The finetuning runs' convergence criterion on metrics.jsonl."""

import json

import numpy as np
import pytest
from scipy import stats

from diverse_cfg import convergence


def _rows(kl_fn, steps=range(10, 310, 10)):
  return [{'step': s, 'kl': float(kl_fn(s)), 'loss': 0.0} for s in steps]


def test_a_flattened_decay_has_plateaued_and_a_steady_descent_has_not():
  flat = convergence.plateau(_rows(lambda s: 5 + 20 * np.exp(-s / 20)))
  assert flat['plateaued'] and flat['window_steps'] == [150, 300]
  falling = convergence.plateau(_rows(lambda s: 30 - 0.05 * s))
  # slope -0.05 over 150 steps = -7.5 against a mean of 18.75: -40 %
  assert not falling['plateaued']
  assert falling['relative_change'] == pytest.approx(-7.5 / 18.75)
  rising = convergence.plateau(_rows(lambda s: 10 + 0.02 * s), tol=0.1)
  assert not rising['plateaued'] and rising['relative_change'] > 0.1


def test_the_tolerance_is_the_boundary():
  rows = _rows(lambda s: 20 - 0.01 * s)  # moves -1.5 over the window, mean 17.75: -8.45 %
  assert convergence.plateau(rows, tol=0.09)['plateaued']
  assert not convergence.plateau(rows, tol=0.08)['plateaued']


def test_too_few_points_and_missing_metric_are_not_converged():
  few = convergence.plateau(_rows(lambda s: 1.0, steps=(10, 20)))
  assert not few['plateaued'] and 'need 3' in few['reason']
  assert 'no entropy' in convergence.plateau(_rows(lambda s: 1.0), key='entropy')['reason']
  assert 'unknown' in convergence.describe('beta=0', few)


def test_read_metrics_keeps_one_row_per_step_after_a_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  lines = [{'step': 10, 'kl': 5.0}, {'step': 20, 'kl': 4.0},
           {'step': 20, 'kl': 3.0}, {'step': 30, 'kl': 2.0, 'eval/quality': 0.5}]
  path.write_text('\n'.join(json.dumps(l) for l in lines) + '\n')
  rows = convergence.read_metrics(str(path))
  assert [(r['step'], r['kl']) for r in rows] == [(10, 5.0), (20, 3.0), (30, 2.0)]
  assert convergence.read_metrics(str(tmp_path / 'absent.jsonl')) == []


def test_noise_makes_the_verdict_undecided_not_a_coin_flip():
  rng = np.random.default_rng(0)
  noisy = _rows(lambda s: 8.5 + rng.normal(0, 1.0))  # flat, +-12 % per logged point
  v = convergence.plateau(noisy)
  lo, hi = v['relative_change_interval']
  assert v['verdict'] == 'undecided' and hi - lo > 0.2  # wider than the whole +-10 % band
  quiet = _rows(lambda s: 8.5 + rng.normal(0, 0.1))
  assert convergence.plateau(quiet)['verdict'] == 'plateaued'
  falling = _rows(lambda s: 30 - 0.05 * s + rng.normal(0, 0.5))
  assert convergence.plateau(falling)['verdict'] == 'moving'
  assert 'undecided' in convergence.describe('beta=8', v)


def test_the_interval_of_a_line_plus_noise_covers_the_true_change():
  """90 % intervals: over 200 noisy lines, about 90 % cover the true relative change."""
  rng = np.random.default_rng(1)
  true = -1.5 / 17.75
  covered = []
  for _ in range(200):
    v = convergence.plateau(_rows(lambda s: 20 - 0.01 * s + rng.normal(0, 0.5)))
    lo, hi = v['relative_change_interval']
    covered.append(lo <= true <= hi)
  assert 0.84 <= np.mean(covered) <= 0.95


def test_serially_correlated_noise_widens_the_interval_to_keep_its_coverage():
  """A probe read at every log step drifts with the parameters: AR(1) residuals (phi 0.7).
  Without the AR(1) widening the 90 % intervals cover the true change ~51 % of the time; with
  it ~81 % (15 points per window: rho is estimated from few residuals)."""
  rng = np.random.default_rng(2)
  true = -1.5 / 17.75

  def ar1_rows():
    e = np.zeros(30)
    e[0] = rng.normal(0, 0.3 / np.sqrt(1 - 0.7 ** 2))  # stationary from the start
    for i in range(1, 30):
      e[i] = 0.7 * e[i - 1] + rng.normal(0, 0.3)
    return [{'step': s, 'kl': 20 - 0.01 * s + e[i]} for i, s in enumerate(range(10, 310, 10))]

  verdicts = [convergence.plateau(ar1_rows()) for _ in range(300)]
  covered = [v['relative_change_interval'][0] <= true <= v['relative_change_interval'][1]
             for v in verdicts]
  assert 0.74 <= np.mean(covered) <= 0.93
  assert np.mean([v['residual_autocorrelation'] for v in verdicts]) > 0.4


def test_a_figure_logged_with_its_items_takes_its_interval_over_them():
  """Closed form: each item's least-squares change over the window, a t interval over items."""
  items = [[4.0, 10.0, 1.0], [5.0, 9.0, 1.0], [6.0, 8.0, 4.0]]  # read at steps 10, 20, 30
  key = convergence.items_key('kl_heldout')
  rows = [{'step': s, 'kl_heldout': float(np.mean(v)), key: v} for s, v in zip((10, 20, 30), items)]
  v = convergence.plateau(rows, 'kl_heldout', window=1.0)
  change = np.array([2.0, -2.0, 3.0])  # each item's line from step 10 to 30
  mean = np.mean(items)
  half = stats.t.ppf(0.95, 2) * change.std(ddof=1) / np.sqrt(3)
  assert v['interval_from'] == 'items' and v['items'] == 3
  assert v['relative_change'] == pytest.approx(change.mean() / mean)
  np.testing.assert_allclose(v['relative_change_interval'],
                             [(change.mean() - half) / mean, (change.mean() + half) / mean])
  assert 'interval over 3 items' in convergence.describe('beta=0', v)
  # Without the items the same means are read as noisy readings.
  assert convergence.plateau([{k: r[k] for k in ('step', 'kl_heldout')} for r in rows],
                             'kl_heldout', window=1.0)['interval_from'] == 'readings'


def test_the_held_out_verdict_does_not_depend_on_how_often_it_is_read():
  """64 held-out sequences whose KL waves together (+-4 %, the parameters' own movement) and
  drifts by its own amount each (mean 0): read over the items it has plateaued whether logged
  every step or every 10; its mean read as noisy readings is undecided when logged densely (the
  waves look like strongly correlated noise). And 90 % intervals over 128 items cover the true
  mean change of strongly skewed (lognormal) items about 88 % of the time."""
  rng = np.random.default_rng(4)
  base, drift = rng.lognormal(1.0, 0.8, 64), rng.normal(0, 0.1, 64)

  def rows(every):
    out = []
    for s in range(every, 301, every):
      v = base * (1 + 0.04 * np.sin(s / 8) + drift * max(s - 150, 0) / 150)
      out.append({'step': s, 'kl_heldout': float(v.mean()),
                  convergence.items_key('kl_heldout'): v.tolist()})
    return out

  for every in (1, 10):
    v = convergence.plateau(rows(every), 'kl_heldout')
    assert v['verdict'] == 'plateaued' and v['interval_from'] == 'items', (every, v)
  means_only = [{'step': r['step'], 'kl_heldout': r['kl_heldout']} for r in rows(1)]
  assert convergence.plateau(means_only, 'kl_heldout')['verdict'] == 'undecided'

  covered = []
  for _ in range(300):
    change = rng.lognormal(0, 1, 128) - np.exp(0.5)  # skewed, true mean 0
    items = np.stack([np.ones(128) * 10, 10 + change / 2, 10 + change])
    v = convergence.plateau([{'step': s, 'kl_heldout': float(i.mean()),
                              convergence.items_key('kl_heldout'): i.tolist()}
                             for s, i in zip((10, 20, 30), items)], 'kl_heldout', window=1.0)
    lo, hi = v['relative_change_interval']
    covered.append(lo <= 0 <= hi)
  assert 0.84 <= np.mean(covered) <= 0.95


def test_lag1_autocorrelation_closed_forms():
  # raw r = -5/6 over 6 points, bias-corrected (6 r + 3) / (6 - 4) = -1 -> clipped
  assert convergence.lag1_autocorrelation([1, -1, 1, -1, 1, -1]) == -0.95
  assert convergence.lag1_autocorrelation([3.0, 3.0, 3.0]) == 0.0
  assert convergence.lag1_autocorrelation([1, 2, 3, 4]) == pytest.approx(0.25)  # raw, n < 5
  # raw r = 0 over 8 points: corrected (8 * 0 + 3) / (8 - 4)
  assert convergence.lag1_autocorrelation([1, 0, -1, 0, 1, 0, -1, 0]) == pytest.approx(0.75)


class _Finetune:
  plateau_window, plateau_tol = 0.5, 0.1


def test_a_student_converges_on_either_kl_unless_the_other_moves():
  rng = np.random.default_rng(3)
  steps = range(10, 310, 10)
  heldout_flat = [5 + 20 * np.exp(-s / 20) for s in steps]
  noisy = [8.5 + rng.normal(0, 2.0) for _ in steps]  # on-policy: undecided on its own
  rows = [{'step': s, 'kl': k, 'kl_heldout': h} for s, k, h in zip(steps, noisy, heldout_flat)]
  v = convergence.check(rows, _Finetune)
  heldout, on_policy = v['readings']
  assert v['plateaued'] and heldout['metric'] == 'kl_heldout' and heldout['plateaued']
  assert on_policy['metric'] == 'kl' and on_policy['verdict'] == 'undecided'
  assert convergence.describe('beta=0', v).startswith('beta=0: converged: kl_heldout plateaued')
  falling = [{**r, 'kl': 30 - 0.08 * r['step']} for r in rows]
  v = convergence.check(falling, _Finetune)
  assert not v['plateaued'] and v['verdict'] == 'moving'
  drifting = [{**r, 'kl_heldout': 10 + 0.02 * r['step']} for r in rows]
  assert convergence.check(drifting, _Finetune)['verdict'] == 'moving'
  # A held-out KL that wanders slowly (undecided) beside a quiet, flat on-policy KL: converged.
  wander = [{'step': s, 'kl': 8.5 + rng.normal(0, 0.05), 'kl_heldout': 11.5 + 3 * np.sin(s / 40)}
            for s in steps]
  v = convergence.check(wander, _Finetune)
  assert [r['verdict'] for r in v['readings']] == ['undecided', 'plateaued'] and v['plateaued']
  assert convergence.describe('beta=8', v).startswith('beta=8: converged: kl_heldout plateau undecided')
  # A run logged before the held-out KL existed is judged on its on-policy KL.
  old = [{'step': r['step'], 'kl': h} for r, h in zip(rows, heldout_flat)]
  v = convergence.check(old, _Finetune)
  assert v['plateaued'] and [r['metric'] for r in v['readings']] == ['kl']
  assert convergence.describe('beta=0', v).startswith('beta=0: converged: kl plateaued')


def test_objective_change_is_paired_by_prompt():
  before = np.array([2.0, 4.0, 6.0, 8.0])
  c = convergence.paired_change(before, before - 1.0)  # every prompt falls by 1
  assert c['change'] == -1.0 and c['interval'] == [-1.0, -1.0]  # spread across prompts: no width
  assert c['relative'] == pytest.approx(-1.0 / 4.5)  # the two readings' mean: (5 + 4) / 2
  c = convergence.paired_change(before, before + np.array([1.0, -1.0, 1.0, -1.0]))
  half = stats.t.ppf(0.95, 3) * np.sqrt(4 / 3) / 2  # t(90 %, 3 dof) * sd / sqrt(n)
  assert c['change'] == 0.0 and c['interval'] == pytest.approx([-half, half])


def test_the_objective_read_at_the_window_ends_decides():
  """Two readings with their items: the paired change (paired_change's closed form); when read
  over the window the objective's verdict is the student's, whatever the proxies say."""
  rng = np.random.default_rng(5)
  before = rng.lognormal(1.0, 0.5, 64)
  key = convergence.items_key('objective')
  steps = range(10, 310, 10)
  heldout_flat = [5 + 20 * np.exp(-s / 20) for s in steps]
  rows = [{'step': s, 'kl': 8.5 + rng.normal(0, 0.05), 'kl_heldout': h}
          for s, h in zip(steps, heldout_flat)]

  def read(rows, after):
    by_step = {r['step']: r for r in rows}
    for s, v in ((150, before), (300, after)):
      by_step[s] = {**by_step[s], 'objective': float(np.mean(v)), key: list(v)}
    return [by_step[s] for s in sorted(by_step)]

  falling = before * 0.8 + rng.normal(0, 0.01, 64)
  v = convergence.plateau(read(rows, falling), 'objective')
  c = convergence.paired_change(before, falling)
  assert v['window_steps'] == [150, 300] and v['items'] == 64
  assert v['relative_change'] == pytest.approx(c['relative'])
  np.testing.assert_allclose(v['relative_change_interval'], c['relative_interval'])
  # The proxies both plateau, the objective falls 20 %: moving.
  v = convergence.check(read(rows, falling), _Finetune)
  assert [r['metric'] for r in v['readings']] == ['objective', 'kl_heldout', 'kl']
  assert [r['verdict'] for r in v['readings']] == ['moving', 'plateaued', 'plateaued']
  assert v['verdict'] == 'moving' and not v['plateaued'] and 'paired' in v['criterion']
  assert convergence.describe('beta=0', v).startswith('beta=0: not shown converged: objective '
                                                      'is still moving (-22.')
  # The held-out KL rises 40 %, the objective is flat: converged.
  rising = [{**r, 'kl_heldout': 10 + 0.02 * r['step']} for r in rows]
  flat = before + rng.normal(0, 0.01, 64)
  v = convergence.check(read(rising, flat), _Finetune)
  assert [r['verdict'] for r in v['readings']] == ['plateaued', 'moving', 'plateaued']
  assert v['plateaued']
  # Read once in the window (a run resumed to more steps): the proxies decide, as before.
  once = read(rising, flat)
  del once[-1]['objective'], once[-1][key]
  v = convergence.check(once, _Finetune)
  assert 'need 2' in v['readings'][0]['reason'] and v['verdict'] == 'moving'
