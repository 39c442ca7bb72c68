"""The two plug-in points of evaluation and finetuning: `Embedder` and `QualityModel`.

Both are a pure function plus its parameters, so the finetuning step can call
`embedder.apply(embedder.params, tokens)` inside its own jit: `apply` must be
jittable (no host callbacks, no Python side effects) and `params` a pytree of
arrays (or {} for a parameter-free function). Token arrays are the dataset's
ids: events, then EOS, then PAD; everything after a row's first EOS is ignored.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def jitted(fn: Callable) -> Callable:
  """One jit wrapper per function object, so repeated calls reuse its compilations."""
  return jax.jit(fn)


# eq=False: hashing by identity; params (dicts of arrays) are not hashable.
@dataclasses.dataclass(frozen=True, eq=False)
class Embedder:
  """apply(params, tokens_BxT int32) -> emb_BxD float32, unit vectors (rows of a sequence)."""
  apply: Callable[[Any, jax.Array], jax.Array]
  params: Any = dataclasses.field(default_factory=dict, repr=False)

  def __call__(self, tokens_BxT) -> jax.Array:
    return jitted(self.apply)(self.params, jnp.asarray(tokens_BxT, jnp.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class QualityModel:
  """apply(params, tokens_BxT, prompt_BxC) -> probs_BxA: per attribute, P(prompt's value).

  predict(params, tokens_BxT) -> prompt ids [B, C] (the most likely value of
  each attribute, in the prompt's id space) is optional: only accuracy figures
  need it, a user's quality model may leave it None.
  """
  apply: Callable[[Any, jax.Array, jax.Array], jax.Array]
  params: Any = dataclasses.field(default_factory=dict, repr=False)
  predict: Callable[[Any, jax.Array], jax.Array] | None = None
  attribute_names: tuple[str, ...] = ()

  def __call__(self, tokens_BxT, prompt_BxC) -> jax.Array:
    return jitted(self.apply)(self.params, jnp.asarray(tokens_BxT, jnp.int32),
                              jnp.asarray(prompt_BxC, jnp.int32))

  def quality(self, tokens_BxT, prompt_BxC) -> jax.Array:
    """Per-sequence quality [B]: the mean over attributes of P(prompt's value)."""
    return jnp.mean(self(tokens_BxT, prompt_BxC), axis=-1)
