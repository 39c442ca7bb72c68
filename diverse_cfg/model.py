"""Conditional decoder-only transformer.

The sequence the decoder sees is [prompt_0..prompt_{C-1}, BOS, y_1, ..., y_{T-1}]
and it predicts y_1..y_T from the last T positions. The prompt is C condition
tokens embedded as a prefix; a learned null prompt (C vectors) replaces it for
"no condition" rows, which is the unconditional branch of CFG.

One call signature serves everything: a full teacher-forced forward
(cache=None) and an incremental decode step that writes keys/values into a
fixed-size KV cache at `start` and attends over all cache slots up to the
current position. Every parameter carries logical axis names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diverse_cfg import specials

NEG_INF = -1e9  # finite "impossible": keeps p*log(p/q) at exactly 0, not NaN

# {'k', 'v'}: one [B, H, S, K] array per layer (a tuple), or [L, B, H, S, K] with
# scan_layers. Per-layer arrays let XLA update each in place inside the decode loop.
Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  prompt_vocab_size: int
  prompt_len: int
  seq_len: int
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  mlp_dim: int = 256
  tie_embeddings: bool = True
  prompt_dropout: float = 0.2
  dtype: str = 'float32'
  rope_base: float = 10_000.0
  remat: str = 'none'
  scan_layers: bool = False

  @classmethod
  def from_config(cls, m: ml_collections.ConfigDict) -> 'ModelConfig':
    return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls)})

  def differences(self, other: 'ModelConfig') -> dict[str, tuple[Any, Any]]:
    """{field: (self's value, other's value)} for every field that differs."""
    return {f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)}

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def max_positions(self) -> int:
    """Cache length: prompt + BOS + all but the last target token."""
    return self.prompt_len + self.seq_len

  @property
  def padded_vocab(self) -> int:
    """Embedding rows: rounded up so any tensor-axis size divides them."""
    return -(-self.vocab_size // 128) * 128

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    emb = self.padded_vocab * self.d_model * (1 if self.tie_embeddings else 2)
    emb += (self.prompt_vocab_size + self.prompt_len) * self.d_model
    per_layer = 4 * self.d_model * self.d_model + 3 * self.d_model * self.mlp_dim + 2 * self.d_model
    return emb + self.num_layers * per_layer + self.d_model


def _init(names, std=None):
  base = nn.initializers.normal(std) if std else nn.initializers.lecun_normal()
  return nn.with_logical_partitioning(base, names)


def _weight(module: nn.Module, name: str, shape, names, cfg: 'ModelConfig'):
  """A float32 kernel with logical names, cast to the compute dtype.

  Fan-in is every axis but the last, so (embed, heads, kv) and
  (heads, kv, embed) kernels are scaled like the dense layers they are.
  """
  fan_in = 1
  for n in shape[:-1]:
    fan_in *= n
  w = module.param(name, _init(names, std=fan_in ** -0.5), shape, jnp.float32)
  return w.astype(cfg.jnp_dtype)


class RMSNorm(nn.Module):
  dtype: Any
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def rotary(x_BxHxTxK: jax.Array, pos: jax.Array, base: float) -> jax.Array:
  """Rotary positions; pos is [T] (every row alike) or [B, T] (a position per row)."""
  half = x_BxHxTxK.shape[-1] // 2
  freq_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_xTxK2 = pos.astype(jnp.float32)[..., None] * freq_K2
  if angle_xTxK2.ndim == 2:
    angle_xTxK2 = angle_xTxK2[None]
  sin, cos = jnp.sin(angle_xTxK2)[:, None], jnp.cos(angle_xTxK2)[:, None]
  x1, x2 = jnp.split(x_BxHxTxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxHxTxK.dtype)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, pos_BxT, mask_BxTxS, cache_k, cache_v, start):
    """pos_BxT: positions ([1, T] shared by every row); mask_BxTxS: which keys each query sees."""
    c = self.cfg
    qkv_shape = (c.d_model, c.num_heads, c.head_dim)
    proj = lambda name: _weight(self, name, qkv_shape, ('embed', 'heads', 'kv'), c)
    # Heads-major [B, H, T, K]: the layout the attention matmuls batch over, so
    # the cache is never transposed. The projection itself is a plain
    # [BT, D] x [D, HK] product (its natural output order); only the small
    # activation is transposed. Asking the einsum for 'bhtk' directly makes
    # XLA transpose the weights instead, at every decode step.
    heads = lambda name: jnp.einsum('btd,dhk->bthk', x_BxTxD, proj(name)).transpose(0, 2, 1, 3)
    q_BxHxTxK = rotary(heads('query'), pos_BxT, c.rope_base)
    k_BxHxTxK = rotary(heads('key'), pos_BxT, c.rope_base)
    v_BxHxTxK = heads('value')

    if cache_k is None:  # full forward: attend within this chunk
      k_BxHxSxK, v_BxHxSxK = k_BxHxTxK, v_BxHxTxK
    else:  # decode: write this chunk at `start`, attend over all slots
      idx = (0, 0, start, 0)
      k_BxHxSxK = jax.lax.dynamic_update_slice(cache_k, k_BxHxTxK.astype(cache_k.dtype), idx)
      v_BxHxSxK = jax.lax.dynamic_update_slice(cache_v, v_BxHxTxK.astype(cache_v.dtype), idx)

    scores_BxHxTxS = jnp.einsum('bhtk,bhsk->bhts', q_BxHxTxK, k_BxHxSxK,
                                preferred_element_type=jnp.float32) / jnp.sqrt(c.head_dim)
    scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS, NEG_INF)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(c.jnp_dtype)
    out_BxHxTxK = jnp.einsum('bhts,bhsk->bhtk', probs_BxHxTxS, v_BxHxSxK.astype(c.jnp_dtype))
    w_out = _weight(self, 'out', (c.num_heads, c.head_dim, c.d_model), ('heads', 'kv', 'embed'), c)
    out_BxTxD = jnp.einsum('bhtk,hkd->btd', out_BxHxTxK, w_out)
    if cache_k is None:
      return out_BxTxD, None, None
    return out_BxTxD, k_BxHxSxK, v_BxHxSxK


class GatedMLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.cfg
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.jnp_dtype)
    gate = dense(c.mlp_dim, kernel_init=_init(('embed', 'mlp')), name='gate')(x_BxTxD)
    up = dense(c.mlp_dim, kernel_init=_init(('embed', 'mlp')), name='up')(x_BxTxD)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return dense(c.d_model, kernel_init=_init(('mlp', 'embed')), name='down')(h_BxTxF)


class Block(nn.Module):
  """Pre-norm block. Signature fits nn.scan: (carry, per-layer xs) -> (carry, ys)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer_cache):
    x_BxTxD, pos_BxT, mask_BxTxS, start = carry
    cache_k, cache_v = layer_cache if layer_cache is not None else (None, None)
    h, new_k, new_v = Attention(self.cfg, name='attn')(
        RMSNorm(self.cfg.jnp_dtype, name='attn_norm')(x_BxTxD), pos_BxT, mask_BxTxS, cache_k,
        cache_v, start)
    x_BxTxD = x_BxTxD + h
    x_BxTxD = x_BxTxD + GatedMLP(self.cfg, name='mlp')(RMSNorm(self.cfg.jnp_dtype, name='mlp_norm')(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('batch', 'length', 'embed'))
    return (x_BxTxD, pos_BxT, mask_BxTxS, start), (None if new_k is None else (new_k, new_v))


def _block_class(cfg: ModelConfig):
  if cfg.remat == 'none':
    return Block
  policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if cfg.remat == 'dots'
            else jax.checkpoint_policies.nothing_saveable)
  return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    emb_init = _init(('vocab', 'embed'), std=c.d_model ** -0.5)  # tied-head logits ~ N(0, 1)
    self.embed = nn.Embed(c.padded_vocab, c.d_model, embedding_init=emb_init, name='embed')
    if c.prompt_len > 0:
      self.prompt_embed = nn.Embed(c.prompt_vocab_size, c.d_model,
                                   embedding_init=_init(('prompt_vocab', 'embed'), std=c.d_model ** -0.5))
      self.null_prompt = self.param('null_prompt', _init(('prompt_len', 'embed'), std=c.d_model ** -0.5),
                                    (c.prompt_len, c.d_model), jnp.float32)
    block = _block_class(c)
    if c.scan_layers:
      self.layers = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                            in_axes=0, length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: 'layers'})(c, name='layers')
    else:
      self.layers = [block(c, name=f'layer_{i}') for i in range(c.num_layers)]
    self.final_norm = RMSNorm(c.jnp_dtype)
    if not c.tie_embeddings:
      self.head = nn.Dense(c.padded_vocab, use_bias=False, dtype=c.jnp_dtype,
                           kernel_init=_init(('embed', 'vocab')))

  def embed_prefix(self, prompt_BxC, null_B):
    """Prompt embeddings, the learned null prompt where null_B is True."""
    p_BxCxD = self.prompt_embed(prompt_BxC)
    return jnp.where(null_B[:, None, None], self.null_prompt[None].astype(p_BxCxD.dtype), p_BxCxD)

  def __call__(self, tokens_BxT, prompt_BxC=None, null_B=None, cache: Cache | None = None,
               start=0):
    """Logits [B, T, V] (float32) for the next token after each input token.

    Full forward: cache=None, prompt given (if prompt_len > 0), start=0; the
    input is [prompt, tokens]. Decode: cache given; prompt given only on the
    first (prefill) call. Returns (logits, new_cache or None).
    """
    c = self.cfg
    x_BxTxD = self.embed(tokens_BxT).astype(c.jnp_dtype)
    if prompt_BxC is not None and c.prompt_len > 0:
      if null_B is None:
        null_B = jnp.zeros(tokens_BxT.shape[:1], bool)
      x_BxTxD = jnp.concatenate([self.embed_prefix(prompt_BxC, null_B).astype(c.jnp_dtype),
                                 x_BxTxD], axis=1)
    pos_1xT = start + jnp.arange(x_BxTxD.shape[1])[None]
    # Causal; in a decode step the slots not written yet lie after pos and stay hidden.
    slots = x_BxTxD.shape[1] if cache is None else c.max_positions
    mask_1xTxS = jnp.arange(slots)[None, None, :] <= pos_1xT[:, :, None]
    return self._layers_and_head(x_BxTxD, pos_1xT, mask_1xTxS, cache, start,
                                 keep_last=tokens_BxT.shape[1])

  def packed(self, inputs_RxW, positions_RxW, segments_RxW, null_RxW):
    """Logits [R, W, V] of packed rows (packing.Packed): several sequences per row.

    A sequence's slots hold its prompt (positions 0..C-1; null_RxW picks the
    null prompt), BOS, then its tokens; positions restart at 0 for each
    sequence and a slot attends only to earlier slots of its own sequence, so
    each sequence gets the logits it gets alone in __call__.
    """
    c = self.cfg
    prompt_slot = (positions_RxW < c.prompt_len) & (segments_RxW > 0)
    x_RxWxD = self.embed(jnp.where(prompt_slot, 0, inputs_RxW)).astype(c.jnp_dtype)
    if c.prompt_len > 0:
      p_RxWxD = self.prompt_embed(jnp.where(prompt_slot, inputs_RxW, 0))
      null_RxWxD = self.null_prompt[jnp.clip(positions_RxW, 0, c.prompt_len - 1)]
      p_RxWxD = jnp.where(null_RxW[..., None], null_RxWxD.astype(p_RxWxD.dtype), p_RxWxD)
      x_RxWxD = jnp.where(prompt_slot[..., None], p_RxWxD.astype(c.jnp_dtype), x_RxWxD)
    slot_W = jnp.arange(inputs_RxW.shape[1])
    mask_RxWxW = ((slot_W[None, :] <= slot_W[:, None])[None]
                  & (segments_RxW[:, :, None] == segments_RxW[:, None, :]))
    return self._layers_and_head(x_RxWxD, positions_RxW, mask_RxWxW, None, 0,
                                 keep_last=inputs_RxW.shape[1])[0]

  def _layers_and_head(self, x_BxTxD, pos_BxT, mask_BxTxS, cache, start, keep_last: int):
    """The layers, then the head over the last keep_last positions -> (logits, new cache)."""
    c = self.cfg
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ('batch', 'length', 'embed'))
    carry = (x_BxTxD, pos_BxT, mask_BxTxS, start)
    if c.scan_layers:
      xs = None if cache is None else (cache['k'], cache['v'])
      carry, kv = self.layers(carry, xs)
      new_cache = None if cache is None else {'k': kv[0], 'v': kv[1]}
    else:
      ks, vs = [], []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else (cache['k'][i], cache['v'][i])
        carry, kv = layer(carry, layer_cache)
        if kv is not None:
          ks.append(kv[0])
          vs.append(kv[1])
      new_cache = None if cache is None else {'k': tuple(ks), 'v': tuple(vs)}

    h_BxTxD = self.final_norm(carry[0])[:, -keep_last:]
    if c.tie_embeddings:
      logits_BxTxV = self.embed.attend(h_BxTxD.astype(jnp.float32))
    else:
      logits_BxTxV = self.head(h_BxTxD)
    logits_BxTxV = logits_BxTxV[..., :c.vocab_size].astype(jnp.float32)
    # PAD and BOS are never emitted: the sampler and the KL then agree on support.
    never_V = jnp.zeros((c.vocab_size,), bool).at[jnp.array([specials.PAD, specials.BOS])].set(True)
    logits_BxTxV = jnp.where(never_V, NEG_INF, logits_BxTxV)
    return nn.with_logical_constraint(logits_BxTxV, ('batch', 'length', 'vocab')), new_cache


def init_cache(cfg: ModelConfig, batch: int) -> Cache:
  shape = (batch, cfg.num_heads, cfg.max_positions, cfg.head_dim)
  if cfg.scan_layers:
    zeros = jnp.zeros((cfg.num_layers,) + shape, cfg.jnp_dtype)
    return {'k': zeros, 'v': zeros}
  zeros = tuple(jnp.zeros(shape, cfg.jnp_dtype) for _ in range(cfg.num_layers))
  return {'k': zeros, 'v': zeros}


CACHE_AXES = ('layers', 'batch', 'heads', 'cache_len', 'kv')


def cache_axes(cache: Cache) -> Any:
  """Logical axis names for every array of a cache (with or without the layer axis)."""
  return jax.tree.map(lambda x: CACHE_AXES[-x.ndim:], cache)


def init_params(cfg: ModelConfig, rng: jax.Array):
  """Boxed (logically partitioned) params; wrap with sharding.create_sharded."""
  model = Decoder(cfg)
  tokens = jnp.zeros((1, 1), jnp.int32)
  prompt = jnp.zeros((1, cfg.prompt_len), jnp.int32)
  return model.init(rng, tokens, prompt, jnp.zeros((1,), bool))['params']


def forward(cfg: ModelConfig, params, tokens_BxT, prompt_BxC, null_B):
  """Teacher-forced logits for y_1..y_T given targets y (BOS is prepended here)."""
  inputs_BxT = jnp.concatenate(
      [jnp.full((tokens_BxT.shape[0], 1), specials.BOS, tokens_BxT.dtype), tokens_BxT[:, :-1]], 1)
  logits, _ = Decoder(cfg).apply({'params': params}, inputs_BxT, prompt_BxC, null_B)
  return logits


def step(cfg: ModelConfig, params, tokens_BxT, cache: Cache, start, prompt_BxC=None, null_B=None):
  """The decode step every sampler uses: (logits of the last position, new cache)."""
  logits, cache = Decoder(cfg).apply({'params': params}, tokens_BxT, prompt_BxC, null_B,
                                     cache=cache, start=start)
  return logits[:, -1], cache


def decode_params(cfg: ModelConfig, params) -> tuple[ModelConfig, Any]:
  """The model prepared for a decode loop: one subtree per layer, matrices in the compute dtype.

  A scanned decode threads the stacked [L, ...] cache through the layer loop
  and writes all of it back at every step (2.5-3x slower on a CPU); per-layer
  caches are updated in place. Slicing the stacked weights costs one copy of
  the parameters per sampling call. remat only matters for gradients, so it is
  dropped. With a compute dtype below float32, the layers' and the head's
  matrices are cast once here instead of at every step (each use casts them
  to that dtype anyway, so no output changes); norm scales and the embedding
  tables (used in float32 by the tied head) stay as stored. Config and params
  of an unscanned float32 model are returned unchanged.
  """
  if cfg.scan_layers:
    out = {k: v for k, v in params.items() if k != 'layers'}
    for i in range(cfg.num_layers):
      out[f'layer_{i}'] = jax.tree.map(lambda p, i=i: p[i], params['layers'])
    params, cfg = out, dataclasses.replace(cfg, scan_layers=False, remat='none')
  if cfg.jnp_dtype != jnp.float32:
    cast = lambda w: w.astype(cfg.jnp_dtype) if w.ndim >= 2 else w
    params = {k: jax.tree.map(cast, v) if k.startswith('layer_') or k == 'head' else v
              for k, v in params.items()}
  return cfg, params


def abstract_params(cfg: ModelConfig):
  """Boxed ShapeDtypeStructs of the params (no memory): shapes + logical names."""
  return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def forward_packed(cfg: ModelConfig, params, packed) -> jax.Array:
  """Teacher-forced logits [R, W, V] of packed rows (packing.Packed; Decoder.packed)."""
  return Decoder(cfg).apply({'params': params}, packed.inputs, packed.positions, packed.segments,
                            packed.null, method=Decoder.packed)
