"""Decoding stops when every row is done, with the tokens of the fixed-length loop bit for bit."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials
from test_model import CFG, _batch, _mesh, _params

Guidance, LengthBounds = sampling.Guidance, sampling.LengthBounds
LONG = dataclasses.replace(CFG, seq_len=24)


def _generate(cfg, guided, params, prompt, key, guidance, temperature, bounds, early_exit,
              shardings=None):
  fn = functools.partial(sampling.generate, cfg, cfg.seq_len, guided, early_exit=early_exit)
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
  params = _params(LONG)
  _, prompt = _batch(LONG, batch=8)
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


def test_early_exit_on_a_sharded_batch():
  """The all-rows-done test is a reduction over the sharded batch: same tokens on 4 devices."""
  params = _params(LONG)
  _, prompt = _batch(LONG, batch=8)
  key = jax.random.key(5)
  args = (LONG, False, params, prompt, key, Guidance(), 1.0, LengthBounds(0, 6))
  want, _ = _generate(*args, early_exit=False)
  mesh, rules = _mesh(jax.devices()[:4], data=4, fsdp=1)
  sharded_params = _params(LONG, (mesh, rules))
  shardings = (jax.tree.map(lambda a: a.sharding, sharded_params),
               sharding.batch_sharding(mesh, 2), *[sharding.replicated(mesh)] * 5)
  got, _ = _generate(LONG, False, sharded_params, prompt, key, Guidance(), 1.0,
                     LengthBounds(0, 6), True, shardings)
  np.testing.assert_array_equal(got, want)
