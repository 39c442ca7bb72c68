"""Guidance restricted to plausible tokens, and the length bounds (sampling.py, DESIGN.md 6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from diverse_cfg import model as model_lib
from diverse_cfg import objectives
from diverse_cfg import sampling
from diverse_cfg import specials
from helpers import CFG

Guidance, LengthBounds = sampling.Guidance, sampling.LengthBounds

# Hand-made conditional / unconditional distributions over 6 tokens.
P_C = np.array([0.50, 0.30, 0.12, 0.04, 0.03, 0.01])
P_U = np.array([0.20, 0.40, 0.10, 0.005, 0.09, 0.205])


def _guided(alpha, gamma=3.0):
  return np.asarray(sampling.guided_log_probs(jnp.log(jnp.asarray([P_C], jnp.float32)),
                                              jnp.log(jnp.asarray([P_U], jnp.float32)),
                                              Guidance(gamma, alpha)))[0]


def test_only_plausible_tokens_are_guided():
  lc, lu = np.log(P_C), np.log(P_U)
  # alpha = 0.1: plausible = p_c >= 0.05 = tokens 0, 1, 2.
  got = _guided(0.1)
  want = np.where(np.arange(6) < 3, lc + 2.0 * (lc - lu), lc)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert sampling.plausible_mask(jnp.log(jnp.asarray(P_C)), 0.1).tolist() == [True] * 3 + [False] * 3
  # alpha = 0.07: threshold 0.035 admits token 3 (0.04), not token 4 (0.03).
  assert sampling.plausible_mask(jnp.log(jnp.asarray(P_C)), 0.07).tolist() == [True] * 4 + [False] * 2
  # Token 3's conditional/unconditional ratio is 8: plain CFG boosts it by 8^2 = 64, here not at all.
  teacher = np.exp(np.asarray(sampling.cfg_log_probs(jnp.log(jnp.asarray([P_C])),
                                                     jnp.log(jnp.asarray([P_U])),
                                                     Guidance(3.0, 0.1))))[0]
  plain = np.exp(np.asarray(sampling.cfg_log_probs(jnp.log(jnp.asarray([P_C])),
                                                   jnp.log(jnp.asarray([P_U])),
                                                   Guidance(3.0, 0.0))))[0]
  assert plain[3] > 0.2 and teacher[3] < 0.02
  # Implausible tokens keep their conditional proportions among themselves.
  np.testing.assert_allclose(teacher[3:] / teacher[3:].sum(), P_C[3:] / P_C[3:].sum(), rtol=1e-5)
  # ...and the plausible ones are exactly CFG's among themselves.
  np.testing.assert_allclose(teacher[:3] / teacher[:3].sum(), plain[:3] / plain[:3].sum(), rtol=1e-5)


def test_alpha_zero_is_plain_cfg_and_gamma_one_is_the_conditional_bit_for_bit():
  rng = np.random.default_rng(0)
  logits_c, logits_u = (jnp.asarray(x, jnp.float32) for x in rng.normal(size=(2, 4, 7, 50)) * 4)
  lc, lu = jax.nn.log_softmax(logits_c), jax.nn.log_softmax(logits_u)
  for gamma in (0.0, 2.0, 3.0, 7.0):
    plain = lc + (gamma - 1.0) * (lc - lu)  # the CFG combination before plausibility existed
    np.testing.assert_array_equal(sampling.guided_log_probs(logits_c, logits_u,
                                                            Guidance(gamma, 0.0)), plain)
  for alpha in (0.0, 0.1, 0.5, 0.99):
    np.testing.assert_array_equal(sampling.guided_log_probs(logits_c, logits_u,
                                                            Guidance(1.0, alpha)), lc)


def test_kl_to_the_plausibility_teacher_is_finite_where_masking_would_be_infinite():
  teacher = sampling.cfg_log_probs(jnp.log(jnp.asarray([[P_C]])), jnp.log(jnp.asarray([[P_U]])),
                                   Guidance(3.0, 0.1))
  student = jnp.log(jnp.asarray([[np.full(6, 1 / 6)]], jnp.float32))  # mass on every token
  kl = float(objectives.kl_student_teacher(student, teacher, jnp.ones((1, 1)))[0])
  t = np.exp(np.asarray(teacher, np.float64))[0, 0]
  np.testing.assert_allclose(kl, np.sum(np.log((1 / 6) / t)) / 6, rtol=1e-4)
  assert np.isfinite(kl) and (t > 0).all()
  # Masking the implausible tokens instead would put zero teacher mass under student mass.
  masked = np.where(np.arange(6) < 3, t, 0.0)
  with np.errstate(divide='ignore'):
    assert np.isinf(np.sum((1 / 6) * np.log((1 / 6) / masked)))


@pytest.mark.parametrize('alpha,bounds', [(0.0, LengthBounds()), (0.3, LengthBounds()),
                                          (0.3, LengthBounds(5, 5)), (0.1, LengthBounds(2, 8))])
def test_sampler_log_probs_are_the_teachers_scored_distribution(alpha, bounds):
  """The CFG sampler draws from exactly what finetuning's teacher scoring computes."""
  cfg = dataclasses.replace(CFG, seq_len=12)
  params = helpers.params(cfg)
  mesh, rules = helpers.mesh(jax.devices()[:1])
  sampler = sampling.Sampler(cfg, cfg.seq_len, mesh, rules)
  _, prompt = helpers.batch(cfg, batch=8)
  key = jax.random.key(4)
  tok_t, lp_t = sampler.sample_cfg(params, prompt, key, gamma=3.0, plausibility=alpha,
                                   bounds=bounds)
  tok_s, lp_s = sampler.sample(params, prompt, key, bounds=bounds)
  traced = sampling.as_traced(bounds)
  scored_t = helpers.score(cfg, params, tok_t, prompt, sampling.as_traced(Guidance(3.0, alpha)),
                           traced)
  scored_s = helpers.score(cfg, params, tok_s, prompt, sampling.as_traced(Guidance()), traced)
  np.testing.assert_allclose(lp_t, helpers.gather(scored_t['cfg'], tok_t), atol=1e-4)
  np.testing.assert_allclose(lp_s, helpers.gather(scored_s['cond'], tok_s), atol=1e-4)
  # Finetuning's student log-probs (bounded_log_probs of the plain forward) are the same ones.
  logits = jax.jit(model_lib.forward, static_argnums=0)(cfg, params, tok_s, prompt,
                                                        jnp.zeros(8, bool))
  np.testing.assert_allclose(lp_s,
                             helpers.gather(sampling.bounded_log_probs(logits, traced), tok_s),
                             atol=1e-4)


def _events_and_eos(tokens_BxN):
  tokens_BxN = np.asarray(tokens_BxN)
  has_eos = (tokens_BxN == specials.EOS).any(1)
  return np.argmax(tokens_BxN == specials.EOS, axis=1), has_eos


def test_length_bounds_bar_and_force_eos_without_recompiling():
  params = helpers.params(CFG)
  mesh, rules = helpers.mesh(jax.devices()[:1])
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  _, prompt = helpers.batch(CFG, batch=8)
  key = jax.random.key(0)
  tok0, _ = sampler.sample(params, prompt, key)
  sampler.sample_cfg(params, prompt, key, gamma=2.0)
  with helpers.count_compiles() as compiles:
    runs = {b: sampler.sample(params, prompt, key, bounds=b) for b in
            (LengthBounds(4, 4), LengthBounds(6, 9), LengthBounds(0, 3), LengthBounds(11, 11))}
    runs_cfg = {b: sampler.sample_cfg(params, prompt, key, gamma=2.0, plausibility=p, bounds=b)
                for b, p in ((LengthBounds(4, 4), 0.2), (LengthBounds(0, 3), 0.0))}
  assert compiles == [], f'{len(compiles)} recompilations'
  for b, (tok, lp) in list(runs.items()) + list(runs_cfg.items()):
    events, has_eos = _events_and_eos(tok)
    assert has_eos.all(), b  # max <= seq_len - 1 always leaves room for the EOS
    assert ((events >= b.min) & (events <= b.max)).all(), (b, events)
    assert (np.asarray(tok)[np.arange(8), events] == specials.EOS).all()
    if b.min == b.max:
      np.testing.assert_array_equal(events, b.min)
      # The forced EOS is certain: log-prob exactly 0.
      np.testing.assert_array_equal(np.asarray(lp)[np.arange(8), events], 0.0)
  # Without bounds some rows of this random model end early; with min = max = 11, none do.
  events0, _ = _events_and_eos(tok0)
  assert (events0 < 11).any()


def test_sampler_rejects_bad_guidance_and_bounds():
  params = helpers.params(CFG)
  mesh, rules = helpers.mesh(jax.devices()[:1])
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  _, prompt = helpers.batch(CFG)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='plausibility must be in'):
    sampler.sample_cfg(params, prompt, key, plausibility=1.0)
  with pytest.raises(ValueError, match='0 <= min <= max'):
    sampler.sample(params, prompt, key, bounds=LengthBounds(5, 3))
  with pytest.raises(ValueError, match='leaves no room for EOS'):
    sampler.sample(params, prompt, key, bounds=LengthBounds(12, 12))
