"""Core: decoder, KV cache, CFG, samplers, sharding, config validation."""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverse_cfg import config_lib
from diverse_cfg import model as model_lib
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials

CFG = model_lib.ModelConfig(vocab_size=37, prompt_vocab_size=11, prompt_len=3, seq_len=12,
                            num_layers=2, d_model=32, num_heads=4, mlp_dim=64)


_forward = jax.jit(model_lib.forward, static_argnums=0)
_score = jax.jit(sampling.score, static_argnums=0)


def _mesh(devices, data=1, fsdp=-1, tensor=1):
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return sharding.make_mesh(c.mesh, devices), sharding.rules_of(c.mesh)


def _params(cfg, mesh_rules=None, seed=0):
  mesh, rules = mesh_rules or _mesh(jax.devices()[:1])
  params, _ = sharding.create_sharded(functools.partial(model_lib.init_params, cfg), mesh, rules,
                                      jax.random.key(seed))
  return params


def _batch(cfg, batch=4, seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(specials.NUM_SPECIAL, cfg.vocab_size, (batch, cfg.seq_len)).astype(np.int32)
  prompt = rng.integers(0, cfg.prompt_vocab_size, (batch, cfg.prompt_len)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(prompt)


def _decode_all(cfg, params, tokens, prompt, null):
  """Logits for every target position via prefill + one-token decode steps."""
  cache = model_lib.init_cache(cfg, tokens.shape[0])
  bos = jnp.full((tokens.shape[0], 1), specials.BOS, jnp.int32)
  logits, cache = model_lib.step(cfg, params, bos, cache, 0, prompt if cfg.prompt_len else None,
                                 null)
  out = [logits]
  for t in range(cfg.seq_len - 1):
    logits, cache = model_lib.step(cfg, params, tokens[:, t:t + 1], cache, cfg.prompt_len + 1 + t)
    out.append(logits)
  return jnp.stack(out, axis=1)


@pytest.mark.parametrize('variant', [
    {}, {'prompt_len': 0}, {'scan_layers': True}, {'remat': 'full', 'tie_embeddings': False}])
def test_kv_cache_matches_full_forward(variant):
  cfg = dataclasses.replace(CFG, **variant)
  params = _params(cfg)
  tokens, prompt = _batch(cfg)
  null = jnp.array([False, True, False, True])
  full = _forward(cfg, params, tokens, prompt, null)
  cached = jax.jit(functools.partial(_decode_all, cfg))(params, tokens, prompt, null)
  assert full.shape == (4, cfg.seq_len, cfg.vocab_size)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
  # The prefix matters (else the test above says little): null rows differ from cond rows.
  if cfg.prompt_len:
    other = _forward(cfg, params, tokens, prompt, ~null)
    assert np.abs(other - full).max() > 1e-3


def test_causality():
  params = _params(CFG)
  tokens, prompt = _batch(CFG)
  null = jnp.zeros(4, bool)
  base = _forward(CFG, params, tokens, prompt, null)
  t = 5  # logits at position t predict y_{t+1} from y_<=t
  changed = tokens.at[:, t + 1:].set(specials.NUM_SPECIAL + (tokens[:, t + 1:] + 7) % 20)
  after = _forward(CFG, params, changed, prompt, null)
  np.testing.assert_array_equal(after[:, :t + 2], base[:, :t + 2])
  assert np.abs(after[:, t + 2:] - base[:, t + 2:]).max() > 1e-3


def test_scan_layers_equals_python_loop():
  params = _params(CFG)
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  layers = [params[f'layer_{i}'] for i in range(CFG.num_layers)]
  scanned = {k: v for k, v in params.items() if not k.startswith('layer_')}
  scanned['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  tokens, prompt = _batch(CFG)
  null = jnp.zeros(4, bool)
  np.testing.assert_allclose(_forward(scanned_cfg, scanned, tokens, prompt, null),
                             _forward(CFG, params, tokens, prompt, null), atol=1e-5)


@pytest.mark.parametrize('tie_embeddings', [True, False])
def test_decode_params_cast_matrices_once_without_changing_outputs(tie_embeddings):
  """bfloat16 compute: the decode loop's pre-cast weights give bit-identical logits."""
  cfg = dataclasses.replace(CFG, dtype='bfloat16', tie_embeddings=tie_embeddings)
  params = _params(cfg)
  same_cfg, cast = model_lib.decode_params(cfg, params)
  assert same_cfg == cfg
  assert cast['layer_0']['mlp']['gate']['kernel'].dtype == jnp.bfloat16
  assert cast['layer_0']['attn_norm']['scale'].dtype == jnp.float32
  assert cast['embed']['embedding'].dtype == jnp.float32
  tokens, prompt = _batch(cfg)
  null = jnp.arange(4) >= 2
  np.testing.assert_array_equal(_forward(cfg, cast, tokens, prompt, null),
                                _forward(cfg, params, tokens, prompt, null))
  # float32 params pass through untouched.
  assert model_lib.decode_params(CFG, params)[1] is params


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
  params = _params(CFG)
  tokens, prompt = _batch(CFG)
  out = _score(CFG, params, tokens, prompt, sampling.Guidance(3.0, 0.0))
  for name in ('cond', 'uncond', 'cfg'):
    np.testing.assert_allclose(jnp.exp(out[name]).sum(-1), 1.0, rtol=1e-5)
  lc = _forward(CFG, params, tokens, prompt, jnp.zeros(4, bool))
  lu = _forward(CFG, params, tokens, prompt, jnp.ones(4, bool))
  np.testing.assert_allclose(out['cond'], jax.nn.log_softmax(lc), atol=1e-5)
  np.testing.assert_allclose(out['uncond'], jax.nn.log_softmax(lu), atol=1e-5)
  np.testing.assert_allclose(out['cfg'], sampling.cfg_log_probs(lc, lu, sampling.Guidance(3.0, 0.0)),
                             atol=1e-5)


def _gather(logp_BxTxV, tokens_BxT):
  lp = jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], -1)[..., 0]
  return lp * sampling.token_mask(tokens_BxT)


@pytest.mark.parametrize('scan_layers', [False, True])
def test_sampler_log_probs_agree_with_teacher_forced_scoring(scan_layers):
  """The samplers' per-token log-probs equal the scoring pass on the same tokens.

  With scan_layers the sampler decodes with unstacked per-layer weights and
  caches, while scoring runs the scanned forward: two independent paths.
  """
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  params = _params(cfg)
  mesh, rules = _mesh(jax.devices()[:1])
  sampler = sampling.Sampler(cfg, cfg.seq_len, mesh, rules)
  _, prompt = _batch(cfg)
  key = jax.random.key(3)
  tok_s, lp_s = sampler.sample(params, prompt, key)
  tok_t, lp_t = sampler.sample_cfg(params, prompt, key, gamma=3.0)
  guidance = sampling.Guidance(3.0, sampling.DEFAULT_PLAUSIBILITY)
  score_s = _score(cfg, params, tok_s, prompt, guidance)
  score_t = _score(cfg, params, tok_t, prompt, guidance)
  np.testing.assert_allclose(lp_s, _gather(score_s['cond'], tok_s), atol=1e-4)
  np.testing.assert_allclose(lp_t, _gather(score_t['cfg'], tok_t), atol=1e-4)
  # Post-EOS positions are PAD with log-prob 0; no PAD/BOS is ever sampled before EOS.
  for tok in (np.asarray(tok_s), np.asarray(tok_t)):
    for row in tok:
      eos = np.flatnonzero(row == specials.EOS)
      end = eos[0] + 1 if eos.size else len(row)
      assert (row[:end] >= specials.EOS).all() and (row[end:] == specials.PAD).all()


def test_gamma_one_gives_student_tokens_and_top_k_one_is_greedy():
  params = _params(CFG)
  mesh, rules = _mesh(jax.devices()[:1])
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  _, prompt = _batch(CFG)
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
  cfg_lp = _score(CFG, params, g1, prompt,
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
  one = _mesh(devices[:1])
  many = _mesh(devices[:8], **axes)
  p1, p8 = _params(cfg, one), _params(cfg, many)
  # Same values, really sharded: the MLP kernel is split over fsdp x tensor.
  gate = p8['layer_0']['mlp']['gate']['kernel']
  expected = jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert gate.sharding.spec == expected
  want_shard = (64 // many[0].shape['fsdp'], 128 // 2)
  assert {s.data.shape for s in gate.addressable_shards} == {want_shard}
  assert len({tuple(s.device.id for s in [x]) for x in gate.addressable_shards}) == 8
  jax.tree.map(np.testing.assert_array_equal, p1, p8)
  _, prompt = _batch(cfg, batch=8)
  s1 = sampling.Sampler(cfg, cfg.seq_len, *one)
  s8 = sampling.Sampler(cfg, cfg.seq_len, *many)
  key = jax.random.key(5)
  for fn in ('sample', 'sample_cfg'):
    t1, l1 = getattr(s1, fn)(p1, prompt, key)
    t8, l8 = getattr(s8, fn)(p8, prompt, key)
    np.testing.assert_array_equal(t1, t8)
    np.testing.assert_allclose(l1, l8, atol=1e-4)
    assert t8.sharding.spec[0] == sharding.BATCH_AXES


@contextlib.contextmanager
def _count_compiles():
  count = []
  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      count.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_changing_gamma_plausibility_temperature_top_k_does_not_recompile():
  params = _params(CFG)
  mesh, rules = _mesh(jax.devices()[:1])
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  _, prompt = _batch(CFG)
  sampler.sample_cfg(params, prompt, jax.random.key(0), gamma=3.0)  # compile once
  sampler.sample(params, prompt, jax.random.key(0))
  with _count_compiles() as compiles:
    outs = [sampler.sample_cfg(params, prompt, jax.random.key(0), gamma=g, temperature=t, top_k=k,
                               plausibility=a)
            for g, t, k, a in [(1.5, 1.0, 0, 0.1), (5.0, 0.7, 3, 0.0), (0.0, 1.3, 10, 0.5)]]
    outs += [sampler.sample(params, prompt, jax.random.key(0), temperature=t) for t in (0.5, 2.0)]
  assert compiles == [], f'{len(compiles)} recompilations'
  # The runtime values did take effect.
  assert not np.array_equal(outs[0][0], outs[1][0])


def _validate(**changes):
  c = config_lib.base_config()
  c.model.vocab_size, c.model.prompt_vocab_size, c.model.prompt_len, c.model.seq_len = 40, 10, 3, 16
  for path, value in changes.items():
    section, key = path.split('__')
    c[section][key] = value
  config_lib.validate(c, num_devices=8)


def test_valid_config_passes():
  _validate()
  _validate(mesh__fsdp=4, mesh__tensor=2)


@pytest.mark.parametrize('changes,field', [
    (dict(mesh__fsdp=3), 'config.mesh'),
    (dict(mesh__data=4, mesh__fsdp=4), 'mesh'),
    (dict(mesh__data=-1, mesh__fsdp=-1), '(data and fsdp are)'),
    (dict(model__num_heads=5), 'model.num_heads'),
    (dict(model__d_model=20, model__num_heads=4), 'model.num_heads'),  # odd head dim: no rotary
    (dict(finetune__teacher_gamma=-0.5), 'finetune.teacher_gamma'),
    (dict(evaluate__temperature=0.0), 'evaluate.temperature'),
    (dict(model__dtype='float16'), 'model.dtype'),
    (dict(model__prompt_dropout=1.0), 'model.prompt_dropout'),
    (dict(classifier__class_balance=-0.5), 'classifier.class_balance'),
])
def test_bad_configs_name_the_field(changes, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    _validate(**changes)


def test_unknown_config_key_is_named():
  c = config_lib.base_config()
  c.model.vocab_size, c.model.prompt_vocab_size, c.model.prompt_len, c.model.seq_len = 40, 10, 3, 16
  with c.unlocked():
    c.model.num_layer = 3
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.num_layer'):
    config_lib.validate(c)


def test_sampler_rejects_bad_prompts():
  mesh, rules = _mesh(jax.devices()[:8], fsdp=8)
  sampler = sampling.Sampler(CFG, CFG.seq_len, mesh, rules)
  params = _params(CFG, (mesh, rules))
  with pytest.raises(ValueError, match='prompt_len=3'):
    sampler.sample(params, jnp.zeros((8, 2), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match='multiple of data\\*fsdp = 8'):
    sampler.sample(params, jnp.zeros((4, 3), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match='gamma'):
    sampler.sample_cfg(params, jnp.zeros((8, 3), jnp.int32), jax.random.key(0), gamma=-1.0)
  with pytest.raises(ValueError, match='num_new_tokens'):
    sampling.Sampler(CFG, CFG.seq_len + 1, mesh, rules)
