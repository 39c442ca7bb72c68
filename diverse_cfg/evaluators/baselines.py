"""Parameter-free evaluators: sanity baselines, and stand-ins for tests and soak runs."""

import jax
import jax.numpy as jnp

from diverse_cfg import specials
from diverse_cfg.evaluators import interface


def bag_of_events(vocab_size: int) -> interface.Embedder:
  """An Embedder: the unit-normalised histogram of a sequence's events (before its EOS)."""
  def apply(params, tokens_BxT):
    del params
    before_eos_BxT = jnp.cumsum(tokens_BxT == specials.EOS, axis=1) == 0
    counts_BxV = jnp.sum(jax.nn.one_hot(tokens_BxT, vocab_size) * before_eos_BxT[..., None], axis=1)
    return counts_BxV / jnp.maximum(jnp.linalg.norm(counts_BxV, axis=-1, keepdims=True), 1e-6)
  return interface.Embedder(apply)
