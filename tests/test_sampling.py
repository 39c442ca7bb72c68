"""Sampling (sampling.py): the CFG combination, the draw, scoring, the samplers on one device and
sharded, without recompiling, their argument checks; decoding that stops when every row is done."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from diverse_cfg import model as model_lib
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials
from helpers import CFG


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize('gamma', [0.0, 1.0, 3.0])
def test_cfg_combination_by_hand(gamma):
  rng = np.random.default_rng(0)
  lc, lu = rng.normal(size=(2, 5, 9)) * 3
  got = np.asarray(sampling.cfg_log_probs(jnp.asarray(lc, jnp.float32), jnp.asarray(lu, jnp.float32),
                                          sampling.Guidance(gamma, 0.0)))
  pc, pu = np.exp(_log_softmax(lc)), np.exp(_log_softmax(lu))
  # p_cfg is proportional to p_u^(1-gamma) * p_c^gamma.
  want = pu ** (1 - gamma) * pc ** gamma
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.exp(got), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-6)
  if gamma == 0.0:
    np.testing.assert_allclose(np.exp(got), pu, rtol=1e-5)


def test_draw_inverts_the_cdf_exactly_and_never_draws_masked_tokens():
  # Dyadic probabilities and stratified u: the share of u that lands on each
  # token is exactly its probability (every sum is exact in float32).
  p_V = np.array([0, 0, 1 / 2, 1 / 4, 1 / 8, 0, 1 / 16, 1 / 16])
  logp_V = np.where(p_V > 0, np.log(np.maximum(p_V, 1e-30)), model_lib.NEG_INF).astype(np.float32)
  n = 1024
  u_n = (np.arange(n, dtype=np.float32) + 0.5) / n
  logp_nxV = jnp.asarray(np.tile(logp_V, (n, 1)))
  tok, lp, done = sampling.draw(jnp.asarray(u_n), logp_nxV, jnp.zeros(n, bool))
  np.testing.assert_array_equal(np.bincount(np.asarray(tok), minlength=8), p_V * n)
  np.testing.assert_array_equal(lp, logp_V[np.asarray(tok)])
  np.testing.assert_array_equal(done, np.asarray(tok) == specials.EOS)
  # The extremes of u land on live tokens (the first and the last).
  edge = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))], jnp.float32)
  tok_e, _, _ = sampling.draw(edge, logp_nxV[:2], jnp.zeros(2, bool))
  np.testing.assert_array_equal(tok_e, [7, 2])
  # Rows already done get PAD with log-prob 0 and stay done.
  tok_d, lp_d, done_d = sampling.draw(jnp.asarray(u_n[:2]), logp_nxV[:2], jnp.ones(2, bool))
  np.testing.assert_array_equal(tok_d, specials.PAD)
  np.testing.assert_array_equal(lp_d, 0.0)
  assert bool(done_d.all())


def test_draw_matches_the_distribution_for_random_logits():
  # 20000 draws from one random distribution over 300 tokens: the frequency of
  # every token is within 5 standard errors of its probability.
  rng = np.random.default_rng(0)
  logp_V = np.asarray(jax.nn.log_softmax(jnp.asarray(rng.normal(size=300) * 2, jnp.float32)))
  n = 20000
  u_n = jax.random.uniform(jax.random.key(0), (n,))
  tok, _, _ = sampling.draw(u_n, jnp.asarray(np.tile(logp_V, (n, 1))), jnp.zeros(n, bool))
  freq = np.bincount(np.asarray(tok), minlength=300) / n
  p = np.exp(logp_V.astype(np.float64))
  assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-4).all()


def test_score_is_normalised_and_matches_forward():
  params = helpers.params(CFG)
  tokens, prompt = helpers.batch(CFG)
  out = helpers.score(CFG, params, tokens, prompt, sampling.Guidance(3.0, 0.0))
  for name in ('cond', 'uncond', 'cfg'):
    np.testing.assert_allclose(jnp.exp(out[name]).sum(-1), 1.0, rtol=1e-5)
  lc = helpers.forward(CFG, params, tokens, prompt, jnp.zeros(4, bool))
  lu = helpers.forward(CFG, params, tokens, prompt, jnp.ones(4, bool))
  np.testing.assert_allclose(out['cond'], jax.nn.log_softmax(lc), atol=1e-5)
  np.testing.assert_allclose(out['uncond'], jax.nn.log_softmax(lu), atol=1e-5)
  np.testing.assert_allclose(out['cfg'], sampling.cfg_log_probs(lc, lu, sampling.Guidance(3.0, 0.0)),
                             atol=1e-5)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_sampler_log_probs_agree_with_teacher_forced_scoring(scan_layers):
  """The samplers' per-token log-probs equal the scoring pass on the same tokens.

  With scan_layers the sampler decodes with unstacked per-layer weights and
  caches, while scoring runs the scanned forward: two independent paths.
  """
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  params = helpers.params(cfg)
  mesh, rules = helpers.mesh(jax.devices()[:1])
  sampler = sampling.Sampler(cfg, cfg.seq_len, mesh, rules)
  _, prompt = helpers.batch(cfg)
  key = jax.random.key(3)
  tok_s, lp_s = sampler.sample(params, prompt, key)
  tok_t, lp_t = sampler.sample_cfg(params, prompt, key, gamma=3.0)
  guidance = sampling.Guidance(3.0, sampling.DEFAULT_PLAUSIBILITY)
  score_s = helpers.score(cfg, params, tok_s, prompt, guidance)
  score_t = helpers.score(cfg, params, tok_t, prompt, guidance)
  np.testing.assert_allclose(lp_s, helpers.gather(score_s['cond'], tok_s), atol=1e-4)
  np.testing.assert_allclose(lp_t, helpers.gather(score_t['cfg'], tok_t), atol=1e-4)
  # Post-EOS positions are PAD with log-prob 0; no PAD/BOS is ever sampled before EOS.
  for tok in (np.asarray(tok_s), np.asarray(tok_t)):
    for row in tok:
      eos = np.flatnonzero(row == specials.EOS)
      end = eos[0] + 1 if eos.size else len(row)
      assert (row[:end] >= specials.EOS).all() and (row[end:] == specials.PAD).all()


def test_gamma_one_gives_student_tokens_and_top_k_one_is_greedy():
  params = helpers.params(CFG)
  mesh, rules = helpers.mesh(jax.devices()[:1])
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  _, prompt = helpers.batch(CFG)
  for seed in range(3):
    key = jax.random.key(seed)
    tok_s, lp_s = sampler.sample(params, prompt, key, temperature=0.9)
    tok_t, lp_t = sampler.sample_cfg(params, prompt, key, gamma=1.0, temperature=0.9)
    np.testing.assert_array_equal(tok_s, tok_t)
    np.testing.assert_allclose(lp_s, lp_t, atol=1e-5)
  # top_k = 1: every draw is the argmax, so any key gives the same tokens, log-prob 0.
  g1, lp1 = sampler.sample_cfg(params, prompt, jax.random.key(0), gamma=3.0, top_k=1)
  g2, _ = sampler.sample_cfg(params, prompt, jax.random.key(9), gamma=3.0, top_k=1)
  np.testing.assert_array_equal(g1, g2)
  np.testing.assert_allclose(lp1, 0.0, atol=1e-6)
  # ...and it is the argmax of the CFG distribution under teacher forcing.
  cfg_lp = helpers.score(CFG, params, g1, prompt,
                  sampling.Guidance(3.0, sampling.DEFAULT_PLAUSIBILITY))['cfg']
  first_eos = np.argmax(np.asarray(g1) == specials.EOS, axis=1)
  amax = np.asarray(jnp.argmax(cfg_lp, -1))
  for b in range(4):
    end = first_eos[b] + 1 if (np.asarray(g1[b]) == specials.EOS).any() else CFG.seq_len
    np.testing.assert_array_equal(amax[b, :end], np.asarray(g1[b, :end]))


@pytest.mark.parametrize('axes', [dict(fsdp=4, tensor=2), dict(data=4, fsdp=1, tensor=2)])
def test_sharded_sampler_matches_single_device(axes):
  devices = jax.devices()
  assert len(devices) >= 8, 'tests expect 8 fake CPU devices (see conftest.py)'
  cfg = dataclasses.replace(CFG, d_model=64, mlp_dim=128, num_heads=4)
  one = helpers.mesh(devices[:1])
  many = helpers.mesh(devices[:8], **axes)
  p1, p8 = helpers.params(cfg, one), helpers.params(cfg, many)
  # Same values, really sharded: the MLP kernel is split over fsdp x tensor.
  gate = p8['layer_0']['mlp']['gate']['kernel']
  expected = jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert gate.sharding.spec == expected
  want_shard = (64 // many[0].shape['fsdp'], 128 // 2)
  assert {s.data.shape for s in gate.addressable_shards} == {want_shard}
  assert len({tuple(s.device.id for s in [x]) for x in gate.addressable_shards}) == 8
  jax.tree.map(np.testing.assert_array_equal, p1, p8)
  _, prompt = helpers.batch(cfg, batch=8)
  s1 = sampling.Sampler(cfg, cfg.seq_len, *one)
  s8 = sampling.Sampler(cfg, cfg.seq_len, *many)
  key = jax.random.key(5)
  for fn in ('sample', 'sample_cfg'):
    t1, l1 = getattr(s1, fn)(p1, prompt, key)
    t8, l8 = getattr(s8, fn)(p8, prompt, key)
    np.testing.assert_array_equal(t1, t8)
    np.testing.assert_allclose(l1, l8, atol=1e-4)
    assert t8.sharding.spec[0] == sharding.BATCH_AXES


def test_changing_gamma_plausibility_temperature_top_k_does_not_recompile():
  params = helpers.params(CFG)
  mesh, rules = helpers.mesh(jax.devices()[:1])
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  _, prompt = helpers.batch(CFG)
  sampler.sample_cfg(params, prompt, jax.random.key(0), gamma=3.0)  # compile once
  sampler.sample(params, prompt, jax.random.key(0))
  with helpers.count_compiles() as compiles:
    outs = [sampler.sample_cfg(params, prompt, jax.random.key(0), gamma=g, temperature=t, top_k=k,
                               plausibility=a)
            for g, t, k, a in [(1.5, 1.0, 0, 0.1), (5.0, 0.7, 3, 0.0), (0.0, 1.3, 10, 0.5)]]
    outs += [sampler.sample(params, prompt, jax.random.key(0), temperature=t) for t in (0.5, 2.0)]
  assert compiles == [], f'{len(compiles)} recompilations'
  # The runtime values did take effect.
  assert not np.array_equal(outs[0][0], outs[1][0])


def test_sampler_rejects_bad_prompts():
  mesh, rules = helpers.mesh(jax.devices()[:8], fsdp=8)
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  params = helpers.params(CFG, (mesh, rules))
  with pytest.raises(ValueError, match='prompt_len=3'):
    sampler.sample(params, jnp.zeros((8, 2), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match='multiple of data\\*fsdp = 8'):
    sampler.sample(params, jnp.zeros((4, 3), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match='gamma'):
    sampler.sample_cfg(params, jnp.zeros((8, 3), jnp.int32), jax.random.key(0), gamma=-1.0)
  with pytest.raises(ValueError, match='num_new_tokens'):
    sampling.Sampler(CFG, CFG.seq_len + 1, mesh, rules)


# ---------------------------------------------------------------------------------------------
# Early exit: decoding stops when every row is done, with the fixed-length loop's tokens bit
# for bit.

Guidance, LengthBounds = sampling.Guidance, sampling.LengthBounds
LONG = dataclasses.replace(CFG, seq_len=24)


def _generate(cfg, guided, params, prompt, key, guidance, temperature, bounds, early_exit,
              shardings=None, min_rows=0):
  fn = functools.partial(sampling.generate, cfg, cfg.seq_len, guided, early_exit=early_exit,
                         min_rows=min_rows)
  jitted = jax.jit(fn) if shardings is None else jax.jit(fn, in_shardings=shardings)
  return jax.device_get(jitted(params, prompt, key, sampling.as_traced(guidance),
                               jnp.float32(temperature), jnp.int32(0),
                               sampling.as_traced(bounds)))


@pytest.mark.parametrize('guided,guidance,temperature,bounds', [
    (False, Guidance(), 1.0, LengthBounds()),  # the student sampler
    (False, Guidance(), 0.7, LengthBounds(0, 4)),  # the finetuning rollout, short rows
    (True, Guidance(3.0, 0.1), 1.0, LengthBounds()),  # the CFG teacher
    (True, Guidance(2.0, 0.0), 1.0, LengthBounds(2, 5)),
])
def test_early_exit_gives_the_fixed_length_loops_tokens_bit_for_bit(guided, guidance,
                                                                     temperature, bounds):
  params = helpers.params(LONG)
  _, prompt = helpers.batch(LONG, batch=8)
  key = jax.random.key(3)
  args = (LONG, guided, params, prompt, key, guidance, temperature, bounds)
  tok_e, lp_e = _generate(*args, early_exit=True)
  tok_f, lp_f = _generate(*args, early_exit=False)
  np.testing.assert_array_equal(tok_e, tok_f)
  np.testing.assert_array_equal(lp_e, lp_f)
  ends = np.argmax(tok_f == specials.EOS, axis=1)
  if bounds.max < LONG.seq_len - 1:  # every row done long before the end: the loop exits early
    assert (tok_f == specials.EOS).any(1).all() and ends.max() < LONG.seq_len // 2
    assert (tok_e[:, ends.max() + 1:] == specials.PAD).all()


@pytest.mark.parametrize('guided,guidance', [(False, Guidance()), (True, Guidance(3.0, 0.1))])
def test_compacted_loops_give_the_fixed_length_loops_tokens_bit_for_bit(guided, guidance):
  """Rows of 64 steps ending at different steps: the running rows move into batches of 4, then
  2 rows (their caches and uniforms with them), with the same tokens; the log-probs equal to
  float rounding (here bit for bit unguided; guided, whose 2B-row matmuls round differently at
  16, 8 and 4 rows, within 1e-5 of their value: 5.5e-6 seen at -2.49 on one AVX-512 CPU)."""
  cfg = dataclasses.replace(CFG, seq_len=64)
  params = helpers.params(cfg)
  _, prompt = helpers.batch(cfg, batch=8)
  args = (cfg, guided, params, prompt, jax.random.key(7), guidance, 1.0, LengthBounds())
  tok_c, lp_c = _generate(*args, early_exit=True, min_rows=2)
  tok_f, lp_f = _generate(*args, early_exit=False)
  np.testing.assert_array_equal(tok_c, tok_f)
  if guided:
    np.testing.assert_allclose(lp_c, lp_f, rtol=1e-5, atol=0)
  else:
    np.testing.assert_array_equal(lp_c, lp_f)
  ended = (tok_f == specials.EOS).any(1)
  ends = np.where(ended, np.argmax(tok_f == specials.EOS, axis=1), cfg.seq_len)
  # Four rows ended before the sixth, and that one before the last: all three loops ran.
  assert np.sort(ends)[3] < np.sort(ends)[5] < ends.max(), ends


def test_early_exit_on_a_sharded_batch():
  """The all-rows-done test is a reduction over the sharded batch: same tokens on 4 devices."""
  params = helpers.params(LONG)
  _, prompt = helpers.batch(LONG, batch=8)
  key = jax.random.key(5)
  args = (LONG, False, params, prompt, key, Guidance(), 1.0, LengthBounds(0, 6))
  want, _ = _generate(*args, early_exit=False)
  mesh, rules = helpers.mesh(jax.devices()[:4], data=4, fsdp=1)
  sharded_params = helpers.params(LONG, (mesh, rules))
  shardings = (jax.tree.map(lambda a: a.sharding, sharded_params),
               sharding.batch_sharding(mesh, 2), *[sharding.replicated(mesh)] * 5)
  for min_rows in (0, 2):  # 2: the compacting loops on a sharded batch (rows may end together)
    got, _ = _generate(LONG, False, sharded_params, prompt, key, Guidance(), 1.0,
                       LengthBounds(0, 6), True, shardings, min_rows)
    np.testing.assert_array_equal(got, want)
