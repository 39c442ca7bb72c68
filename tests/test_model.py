"""The decoder: the KV-cached decode against the full forward, causality, scanned layers and
the decode loop's pre-cast weights."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from diverse_cfg import model as model_lib
from diverse_cfg import specials
from helpers import CFG


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
  params = helpers.params(cfg)
  tokens, prompt = helpers.batch(cfg)
  null = jnp.array([False, True, False, True])
  full = helpers.forward(cfg, params, tokens, prompt, null)
  cached = jax.jit(functools.partial(_decode_all, cfg))(params, tokens, prompt, null)
  assert full.shape == (4, cfg.seq_len, cfg.vocab_size)
  np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
  # The prefix matters (else the test above says little): null rows differ from cond rows.
  if cfg.prompt_len:
    other = helpers.forward(cfg, params, tokens, prompt, ~null)
    assert np.abs(other - full).max() > 1e-3


def test_causality():
  params = helpers.params(CFG)
  tokens, prompt = helpers.batch(CFG)
  null = jnp.zeros(4, bool)
  base = helpers.forward(CFG, params, tokens, prompt, null)
  t = 5  # logits at position t predict y_{t+1} from y_<=t
  changed = tokens.at[:, t + 1:].set(specials.NUM_SPECIAL + (tokens[:, t + 1:] + 7) % 20)
  after = helpers.forward(CFG, params, changed, prompt, null)
  np.testing.assert_array_equal(after[:, :t + 2], base[:, :t + 2])
  assert np.abs(after[:, t + 2:] - base[:, t + 2:]).max() > 1e-3


def test_scan_layers_equals_python_loop():
  params = helpers.params(CFG)
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  layers = [params[f'layer_{i}'] for i in range(CFG.num_layers)]
  scanned = {k: v for k, v in params.items() if not k.startswith('layer_')}
  scanned['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  tokens, prompt = helpers.batch(CFG)
  null = jnp.zeros(4, bool)
  np.testing.assert_allclose(helpers.forward(scanned_cfg, scanned, tokens, prompt, null),
                             helpers.forward(CFG, params, tokens, prompt, null), atol=1e-5)


@pytest.mark.parametrize('tie_embeddings', [True, False])
def test_decode_params_cast_matrices_once_without_changing_outputs(tie_embeddings):
  """bfloat16 compute: the decode loop's pre-cast weights give bit-identical logits."""
  cfg = dataclasses.replace(CFG, dtype='bfloat16', tie_embeddings=tie_embeddings)
  params = helpers.params(cfg)
  same_cfg, cast = model_lib.decode_params(cfg, params)
  assert same_cfg == cfg
  assert cast['layer_0']['mlp']['gate']['kernel'].dtype == jnp.bfloat16
  assert cast['layer_0']['attn_norm']['scale'].dtype == jnp.float32
  assert cast['embed']['embedding'].dtype == jnp.float32
  tokens, prompt = helpers.batch(cfg)
  null = jnp.arange(4) >= 2
  np.testing.assert_array_equal(helpers.forward(cfg, cast, tokens, prompt, null),
                                helpers.forward(cfg, params, tokens, prompt, null))
  # float32 params pass through untouched.
  assert model_lib.decode_params(CFG, params)[1] is params
