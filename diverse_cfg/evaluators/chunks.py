"""Cutting chunks out of token sequences for the contrastive embedder.

A chunk is a contiguous run of a row's events (content_mask), copied to the
start of a fixed-width [B, chunk_len] array and right-padded with PAD. Two
chunks of one row never share an event: that is what makes them a positive
pair about the *piece* rather than about shared tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diverse_cfg import specials
from diverse_cfg.evaluators import encoder


def event_counts(tokens_BxT: jax.Array) -> jax.Array:
  """Events per row (int32 [B]); events are the leading run before EOS/PAD."""
  return jnp.sum(encoder.content_mask(tokens_BxT), axis=-1).astype(jnp.int32)


def cut(tokens_BxT: jax.Array, start_B: jax.Array, len_B: jax.Array, chunk_len: int) -> jax.Array:
  """tokens[b, start_b : start_b + len_b] left-aligned in [B, chunk_len], PAD after."""
  offs_C = jnp.arange(chunk_len)
  idx_BxC = jnp.clip(start_B[:, None] + offs_C[None, :], 0, tokens_BxT.shape[1] - 1)
  out_BxC = jnp.take_along_axis(tokens_BxT, idx_BxC, axis=1)
  return jnp.where(offs_C[None, :] < len_B[:, None], out_BxC, specials.PAD)


def _pair_len(count_B: jax.Array, chunk_len: int) -> jax.Array:
  # Two chunks must fit side by side; at least one event each when count >= 2.
  return jnp.maximum(jnp.minimum(chunk_len, count_B // 2), 1)


def random_pair(key: jax.Array, tokens_BxT: jax.Array, chunk_len: int):
  """Two non-overlapping chunks per row at random positions.

  With c = min(chunk_len, events // 2) and slack s = events - 2c, draw x <= y
  uniformly in [0, s]: the chunks are [x, x + c) and [y + c, y + 2c), so the
  first ends before the second begins and both lie inside the events.
  Returns (first [B, chunk_len], second [B, chunk_len], valid [B]); rows with
  fewer than 2 events have no pair (valid False) and must be masked out.
  """
  count_B = event_counts(tokens_BxT)
  c_B = _pair_len(count_B, chunk_len)
  slack_B = jnp.maximum(count_B - 2 * c_B, 0)
  u_Bx2 = jax.random.uniform(key, (tokens_BxT.shape[0], 2))
  draws_Bx2 = jnp.minimum(jnp.floor(u_Bx2 * (slack_B[:, None] + 1)).astype(jnp.int32),
                          slack_B[:, None])
  x_B, y_B = jnp.min(draws_Bx2, axis=1), jnp.max(draws_Bx2, axis=1)
  first = cut(tokens_BxT, x_B, c_B, chunk_len)
  second = cut(tokens_BxT, y_B + c_B, c_B, chunk_len)
  return first, second, count_B >= 2


def heldout_pair(tokens_BxT: jax.Array, chunk_len: int):
  """The deterministic pair for retrieval figures: c events from the start of each half.

  first = [0, c), second = [events // 2, events // 2 + c), c = min(chunk_len, events // 2).
  """
  count_B = event_counts(tokens_BxT)
  c_B = _pair_len(count_B, chunk_len)
  first = cut(tokens_BxT, jnp.zeros_like(count_B), c_B, chunk_len)
  second = cut(tokens_BxT, count_B // 2, c_B, chunk_len)
  return first, second, count_B >= 2
