"""Bootstrap intervals, paired differences, hypervolume, the claims verdict, length-matched diversity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverse_cfg import claims
from diverse_cfg import evaluators
from diverse_cfg import specials
from diverse_cfg.evaluators import bootstrap
from diverse_cfg.evaluators import metrics

S = specials.NUM_SPECIAL


# --- bootstrap -------------------------------------------------------------------------------

def test_figures_point_values_are_the_plain_means():
  values_PxK = np.arange(12, dtype=np.float64).reshape(4, 3) ** 2
  assert bootstrap.row_mean(values_PxK).point() == pytest.approx(values_PxK.mean())
  assert bootstrap.prompt_mean([1.0, np.nan, 3.0]).point() == 2.0  # NaN prompts left out
  assert bootstrap.ratio([1, 2, 0], [2, 2, 4]).point() == pytest.approx(3 / 8)
  idx = np.asarray([[0, 0, 2], [2, 2, 2]])
  np.testing.assert_allclose(bootstrap.ratio([1, 2, 0], [2, 2, 4]).draws(idx), [2 / 8, 0.0])


def test_resample_is_seeded_and_row_zero_is_the_evaluation():
  a, b = bootstrap.resample(10, 50, seed=3), bootstrap.resample(10, 50, seed=3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, bootstrap.resample(10, 50, seed=4))
  np.testing.assert_array_equal(a[0], np.arange(10))
  assert a.shape == (51, 10) and a.min() >= 0 and a.max() < 10


def test_interval_matches_the_standard_error_of_a_mean():
  rng = np.random.default_rng(0)
  values_P = rng.normal(0.5, 0.2, size=400)
  idx = bootstrap.resample(400, 4000, seed=0)
  lo, hi = bootstrap.interval(bootstrap.prompt_mean(values_P).draws(idx), 0.95)
  se = values_P.std() / np.sqrt(400)
  assert (hi - lo) / 2 == pytest.approx(1.96 * se, rel=0.08)
  assert lo < values_P.mean() < hi


def test_paired_difference_of_a_constant_shift_is_exact():
  """Two systems on the same prompts, one better by exactly 0.03 on every prompt: the paired
  interval is [0.03, 0.03], while each system's own interval is far wider."""
  rng = np.random.default_rng(1)
  a_P = rng.uniform(0.3, 0.9, size=64)
  a, b = bootstrap.prompt_mean(a_P), bootstrap.prompt_mean(a_P + 0.03)
  idx = bootstrap.resample(64, 500, seed=0)
  lo, hi = bootstrap.interval(b.draws(idx) - a.draws(idx))
  assert lo == pytest.approx(0.03) and hi == pytest.approx(0.03)
  lo_a, hi_a = bootstrap.interval(a.draws(idx))
  assert hi_a - lo_a > 0.05


def test_hypervolume_closed_form():
  pts = [(1, 3), (2, 2), (3, 1)]
  assert bootstrap.hypervolume(pts, (0, 0)) == 6.0  # 3*1 + 2*1 + 1*1
  assert bootstrap.hypervolume(pts + [(1.5, 1.5)], (0, 0)) == 6.0  # a dominated point adds 0
  assert bootstrap.hypervolume(pts, (1, 1)) == 1.0  # only (2, 2) lies above the reference
  assert bootstrap.hypervolume([(2, 2)], (0.5, 1)) == 1.5
  assert bootstrap.hypervolume([], (0, 0)) == 0.0


# --- the claims verdict on synthetic tables --------------------------------------------------

def _table(systems, noise: float, num_prompts: int = 200, seed: int = 0):
  """rows and figures for systems {name: (family, setting, quality, diversity, prefix)}.

  Every system's per-prompt values are its means plus one shared prompt effect (paired, as
  when all systems sample the same prompts with the same keys) plus independent noise.
  """
  rng = np.random.default_rng(seed)
  shared_P = rng.normal(0, 0.1, size=num_prompts)
  rows, figures = [], {}
  for name, (family, setting, q, d, pd) in systems.items():
    rows.append({'system': name, 'family': family, 'setting': setting,
                 'passes_per_token': 2 if family == 'cfg' else 1})
    figures[name] = {m: bootstrap.prompt_mean(v + shared_P + rng.normal(0, noise, num_prompts))
                     for m, v in (('quality', q), ('diversity', d), ('prefix_diversity', pd))}
  return rows, figures, bootstrap.resample(num_prompts, 400, seed=0)


def _verdicts(systems, noise=0.01, seed=0):
  rows, figures, idx = _table(systems, noise, seed=seed)
  return {c['claim']: c['verdict'] for c in claims.decide(rows, figures, idx, teacher_gamma=3.0)}


PAPER = {  # the paper's picture: every claim holds by a wide margin
    'base': ('base', 1.0, 0.60, 0.70, 0.70),
    'cfg gamma=1.5': ('cfg', 1.5, 0.65, 0.60, 0.60),
    'cfg gamma=3': ('cfg', 3.0, 0.75, 0.50, 0.50),
    'student beta=0': ('student', 0.0, 0.76, 0.52, 0.52),
    'student beta=8': ('student', 8.0, 0.70, 0.80, 0.80),
    'merge lambda=0.5': ('merge', 0.5, 0.74, 0.70, 0.70),
}


def test_claims_hold_on_the_papers_picture():
  assert _verdicts(PAPER) == {1: 'holds', 2: 'holds', 3: 'holds', 4: 'holds'}


def test_claims_fail_where_the_table_says_the_opposite():
  broken = {
      'base': ('base', 1.0, 0.80, 0.40, 0.40),  # CFG lowers quality, raises diversity
      'cfg gamma=1.5': ('cfg', 1.5, 0.75, 0.60, 0.60),
      'cfg gamma=3': ('cfg', 3.0, 0.70, 0.80, 0.80),
      'student beta=0': ('student', 0.0, 0.60, 0.50, 0.50),  # 0.10 below its teacher
      'student beta=8': ('student', 8.0, 0.55, 0.45, 0.45),  # less diverse than beta = 0
  }
  assert _verdicts(broken) == {1: 'fails', 2: 'fails', 3: 'fails', 4: 'fails'}


def test_a_diversity_gain_from_length_alone_is_not_a_gain():
  """beta = 8 more diverse by the embedder only: the length-matched diversity is flat."""
  systems = dict(PAPER)
  systems['student beta=8'] = ('student', 8.0, 0.70, 0.80, 0.52)
  assert _verdicts(systems)[3] == 'undecided'
  systems['student beta=8'] = ('student', 8.0, 0.70, 0.80, 0.40)
  assert _verdicts(systems)[3] == 'fails'


def test_tiny_differences_in_noisy_tables_are_undecided():
  close = {
      'base': ('base', 1.0, 0.70, 0.60, 0.60),
      'cfg gamma=3': ('cfg', 3.0, 0.705, 0.595, 0.595),
      'student beta=0': ('student', 0.0, 0.685, 0.60, 0.60),  # at the margin below its teacher
      'student beta=8': ('student', 8.0, 0.70, 0.605, 0.605),
  }
  assert _verdicts(close, noise=0.1, seed=1) == {1: 'undecided', 2: 'undecided', 3: 'undecided',
                                         4: 'undecided'}


def test_claims_evidence_names_the_dominated_cfg_points_and_missing_systems():
  rows, figures, idx = _table(PAPER, 0.01)
  verdict = {c['claim']: c for c in claims.decide(rows, figures, idx, teacher_gamma=3.0)}
  dominated = verdict[4]['evidence']['cfg_dominated']
  assert dominated['cfg gamma=1.5']['at_level'] == ['student beta=8', 'merge lambda=0.5']
  assert dominated['cfg gamma=3']['at_level'] == ['student beta=0']
  assert verdict[2]['evidence']['passes_per_token'] == [1, 2]
  # The teacher's gamma not among the CFG rows: claims 1 and 2 cannot be decided, and say why.
  missing = {c['claim']: c for c in claims.decide(rows, figures, idx, teacher_gamma=5.0)}
  assert missing[1]['verdict'] == missing[2]['verdict'] == 'undecided'
  assert 'teacher gamma 5' in missing[1]['evidence']['missing']
  without_quality = {n: {m: f for m, f in figs.items() if m != 'quality'}
                     for n, figs in figures.items()}
  assert {c['verdict'] for c in claims.decide(rows, without_quality, idx, 3.0)} == {'undecided'}
  lines = claims.headline(list(verdict.values()))
  assert lines[0].startswith('claim 1 (CFG raises quality and lowers diversity): HOLDS')


# --- length-matched diversity ----------------------------------------------------------------

def _row(events, t):
  row = np.full(t, specials.PAD, np.int32)
  row[:len(events)] = events
  row[len(events)] = specials.EOS
  return row


def _bag_embedder(vocab=24):
  def apply(_, tokens_BxT):
    content = evaluators.encoder.content_mask(tokens_BxT)
    counts = jnp.sum(jax.nn.one_hot(tokens_BxT, vocab) * content[..., None], axis=1) + 1e-3
    return counts / jnp.linalg.norm(counts, axis=-1, keepdims=True)
  return evaluators.Embedder(apply=apply, params={})


def test_a_sampler_that_only_varies_lengths_gains_no_length_matched_diversity():
  emb = _bag_embedder()
  melody = np.arange(S, S + 12)
  # Every generation is a prefix of the same sequence, stopping at different places.
  lengths_only = np.stack([[_row(melody[:n], 16) for n in (3, 6, 9, 12)] for _ in range(2)])
  same = np.stack([[_row(melody[:6], 16)] * 4 for _ in range(2)])
  assert float(evaluators.diversity(emb, lengths_only)) > 0.1  # the embedder is fooled
  np.testing.assert_array_equal(metrics.prefix_diversity_per_prompt(emb, lengths_only), 0.0)
  np.testing.assert_array_equal(metrics.prefix_diversity_per_prompt(emb, same), 0.0)
  # Same-length generations: length matching changes nothing.
  rng = np.random.default_rng(0)
  equal_length = np.stack([[_row(rng.integers(S, 24, size=8), 16) for _ in range(4)]
                           for _ in range(3)])
  np.testing.assert_allclose(metrics.prefix_diversity_per_prompt(emb, equal_length),
                             np.asarray(metrics.diversity_per_prompt(emb, equal_length)),
                             atol=1e-6)


def test_length_matched_pairs_cut_both_rows_to_the_shorter():
  tokens = np.stack([[_row([5, 6, 7], 6), _row([8, 9], 6), _row([5, 6, 7, 8], 6)]])
  a, b = metrics.length_matched_pairs(tokens)
  # pairs (0, 1), (0, 2), (1, 2)
  np.testing.assert_array_equal(a[0, 0], _row([5, 6], 6))
  np.testing.assert_array_equal(b[0, 0], _row([8, 9], 6))
  np.testing.assert_array_equal(a[0, 1], _row([5, 6, 7], 6))
  np.testing.assert_array_equal(b[0, 1], _row([5, 6, 7], 6))
  np.testing.assert_array_equal(b[0, 2], _row([5, 6], 6))
