"""A small bidirectional transformer encoder over token sequences, and its two heads.

The evaluators read whole sequences (or chunks of them), so attention is not
causal: every event attends to every other event of its row, and PAD (and
anything after the first EOS) is hidden as a key and left out of the pooled
mean. Positions are rotary, i.e. relative, so a model trained on chunks reads
a whole sequence without a position table to outgrow. The classifier adds
BOS/EOS anchors (`anchored`) so that it can tell a sequence's first and last
events apart; the embedder, trained on chunks whose edges are not the piece's,
does not.

A dataset can say what its tokens are made of (data.meta.TOKEN_FEATURES; for
melodies: pitch class, octave and duration of each pitch x duration event):
each feature value then has an embedding of its own, added to the token's, so
what the parts share is learnt from every token holding them. Ordinal values
(for melodies: pitch) can be declared too; then the step from the previous token
that has one (the interval) is embedded, which no single token holds. The
encoder only sees integer tables; it assumes nothing about what they mean.

Norms and rotary come from model.py; attention and MLP are written here
because they take a padding mask instead of a cache. Every parameter carries
logical axis names; the names the decoder does not use ('embed_out',
'feature_values', 'attributes', 'classes') are unmapped by the rules, i.e. replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diverse_cfg import model as model_lib
from diverse_cfg import packing as packing_lib
from diverse_cfg import specials
from diverse_cfg.data import meta as meta_lib


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int  # incl. PAD/BOS/EOS, as the dataset's tokens
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  mlp_dim: int = 256
  dtype: str = 'float32'
  rope_base: float = 10_000.0
  # Mark the sequence's start and end with BOS / EOS tokens (see `anchored`).
  anchors: bool = False
  # Tables of per-token features (value of feature f for token id t = token_features[f][t]);
  # each feature value has an embedding, added to the token's own.
  token_features: tuple[tuple[int, ...], ...] = ()
  # Tables of ordinal values (-1 = none); the step from the previous token with a value
  # (e.g. a melody's interval) has an embedding, added too.
  token_steps: tuple[tuple[int, ...], ...] = ()

  @classmethod
  def from_section(cls, section: ml_collections.ConfigDict, vocab_size: int,
                   anchors: bool = False) -> 'EncoderConfig':
    skip = ('vocab_size', 'anchors', 'token_features', 'token_steps')
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    # Checkpoints from before token features have no field: they had none.
    features = section.get('token_features', 'none')
    if not features:
      raise ValueError("token_features='' is resolved from the dataset first "
                       '(evaluators.stage.fill_token_features)')
    tables = meta_lib.token_feature_tables(features)
    return cls(vocab_size=int(vocab_size), anchors=anchors, token_features=tables.values,
               token_steps=tables.steps, **{f: section[f] for f in fields})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def pooled_dim(self) -> int:
    """Encoder output size: the mean, plus the BOS and EOS states with anchors."""
    return 3 * self.d_model if self.anchors else self.d_model

  @property
  def padded_vocab(self) -> int:
    return -(-self.vocab_size // 128) * 128  # any tensor-axis size divides the rows

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def flops_per_token(self, seq_len: int, training: bool) -> float:
    dense = self.num_layers * (4 * self.d_model ** 2 + 3 * self.d_model * self.mlp_dim)
    attn = 2 * self.num_layers * seq_len * self.d_model
    fwd = 2 * dense + 2 * attn
    return 3 * fwd if training else fwd


def content_mask(tokens_BxT: jax.Array) -> jax.Array:
  """True on events: ids >= NUM_SPECIAL before a row's first EOS.

  Generated rows hold PAD after EOS, but a user's tokens may not: whatever
  follows the first EOS is not part of the sequence.
  """
  before_eos = jnp.cumsum(tokens_BxT == specials.EOS, axis=-1) == 0
  return before_eos & (tokens_BxT >= specials.NUM_SPECIAL)


def anchored(tokens_BxT: jax.Array) -> jax.Array:
  """[BOS, events..., EOS, PAD...] of length T + 2, from any row (EOS or not, junk after it).

  Positions are relative, so without anchors nothing tells the encoder where a
  sequence starts or ends; with them it can read what is first and last (a
  tune's final note decides its mode, for one). A row that ran out of length
  without EOS is read as ending there.
  """
  content_BxT = content_mask(tokens_BxT)
  batch, length = tokens_BxT.shape
  body_BxT = jnp.where(content_BxT, tokens_BxT, specials.PAD)
  out_BxT2 = jnp.concatenate([jnp.full((batch, 1), specials.BOS, tokens_BxT.dtype), body_BxT,
                              jnp.full((batch, 1), specials.PAD, tokens_BxT.dtype)], axis=1)
  last_B = jnp.max(jnp.where(content_BxT, jnp.arange(length), -1), axis=1)  # -1: no events
  eos_at_BxT2 = jnp.arange(length + 2)[None, :] == last_B[:, None] + 2
  return jnp.where(eos_at_BxT2, specials.EOS, out_BxT2)


def lookup(table_V: Sequence[int], tokens_BxT: jax.Array) -> jax.Array:
  """Values per token; ids past the table (the padded vocabulary's spare rows) read the end."""
  return jnp.asarray(table_V, jnp.int32)[jnp.minimum(tokens_BxT, len(table_V) - 1)]


def step_ids(table_V: Sequence[int], tokens_BxT: jax.Array) -> jax.Array:
  """Embedding ids of the step of an ordinal value (-1 = none) from the previous token with one.

  Step s in [-m, m] (m = the table's largest value) -> s + m; a token without a value, or with
  none before it, -> 2m + 1.
  """
  top = max(table_V)
  v_BxT = lookup(table_V, tokens_BxT)
  length = v_BxT.shape[1]
  last_BxT = jax.lax.cummax(jnp.where(v_BxT >= 0, jnp.arange(length), -1), axis=1)
  prev_at_BxT = jnp.concatenate([jnp.full_like(last_BxT[:, :1], -1), last_BxT[:, :-1]], axis=1)
  prev_BxT = jnp.take_along_axis(v_BxT, jnp.maximum(prev_at_BxT, 0), axis=1)
  ok_BxT = (v_BxT >= 0) & (prev_at_BxT >= 0)
  return jnp.where(ok_BxT, v_BxT - prev_BxT + top, 2 * top + 1)


def _kernel(module: nn.Module, name: str, shape, names, dtype):
  fan_in = 1
  for n in shape[:-1]:
    fan_in *= n
  init = nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5), names)
  return module.param(name, init, shape, jnp.float32).astype(dtype)


class EncoderAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, pos_xT, segments_BxT=None):
    """pos_xT: positions, [T] (every row alike) or [B, T]."""
    c = self.cfg
    proj = lambda n: _kernel(self, n, (c.d_model, c.num_heads, c.head_dim),
                             ('embed', 'heads', 'kv'), c.jnp_dtype)
    q_BxHxTxK = model_lib.rotary(jnp.einsum('btd,dhk->bhtk', x_BxTxD, proj('query')), pos_xT,
                                 c.rope_base)
    k_BxHxTxK = model_lib.rotary(jnp.einsum('btd,dhk->bhtk', x_BxTxD, proj('key')), pos_xT,
                                 c.rope_base)
    v_BxHxTxK = jnp.einsum('btd,dhk->bhtk', x_BxTxD, proj('value'))
    scores_BxHxTxS = jnp.einsum('bhtk,bhsk->bhts', q_BxHxTxK, k_BxHxTxK,
                                preferred_element_type=jnp.float32) / jnp.sqrt(c.head_dim)
    # Padding keys are hidden; a row with no events attends uniformly (finite, then unused).
    # Packed rows: a slot sees only the keys of its own sequence (segment).
    visible_BxTxS = jnp.broadcast_to(mask_BxT[:, None, :], scores_BxHxTxS.shape[:1] +
                                     scores_BxHxTxS.shape[2:])
    if segments_BxT is not None:
      visible_BxTxS = visible_BxTxS & (segments_BxT[:, :, None] == segments_BxT[:, None, :])
    scores_BxHxTxS = jnp.where(visible_BxTxS[:, None], scores_BxHxTxS, model_lib.NEG_INF)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1).astype(c.jnp_dtype)
    out_BxHxTxK = jnp.einsum('bhts,bhsk->bhtk', probs_BxHxTxS, v_BxHxTxK)
    w_out = _kernel(self, 'out', (c.num_heads, c.head_dim, c.d_model), ('heads', 'kv', 'embed'),
                    c.jnp_dtype)
    return jnp.einsum('bhtk,hkd->btd', out_BxHxTxK, w_out)


class EncoderMLP(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.cfg
    gate = x_BxTxD @ _kernel(self, 'gate', (c.d_model, c.mlp_dim), ('embed', 'mlp'), c.jnp_dtype)
    up = x_BxTxD @ _kernel(self, 'up', (c.d_model, c.mlp_dim), ('embed', 'mlp'), c.jnp_dtype)
    h_BxTxF = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return h_BxTxF @ _kernel(self, 'down', (c.mlp_dim, c.d_model), ('mlp', 'embed'), c.jnp_dtype)


class EncoderBlock(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BxTxD, mask_BxT, pos_xT, segments_BxT=None):
    norm = functools.partial(model_lib.RMSNorm, self.cfg.jnp_dtype)
    x_BxTxD = x_BxTxD + EncoderAttention(self.cfg, name='attn')(
        norm(name='attn_norm')(x_BxTxD), mask_BxT, pos_xT, segments_BxT)
    x_BxTxD = x_BxTxD + EncoderMLP(self.cfg, name='mlp')(norm(name='mlp_norm')(x_BxTxD))
    return nn.with_logical_constraint(x_BxTxD, ('batch', 'length', 'embed'))


def encoder_rows(cfg: EncoderConfig, tokens_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the rows the encoder reads, their mask: keys attended and positions pooled)."""
  if cfg.anchors:
    rows_BxW = anchored(tokens_BxT)
    return rows_BxW, rows_BxW != specials.PAD
  return tokens_BxT, content_mask(tokens_BxT)


def sequence_slots(cfg: EncoderConfig, tokens_BxT: jax.Array) -> tuple[jax.Array, int]:
  """(slots each sequence takes: its row up to its last masked slot (events; with anchors
  BOS .. EOS), the rows' width)."""
  _, mask_BxW = encoder_rows(cfg, tokens_BxT)
  width = mask_BxW.shape[1]
  return jnp.max(jnp.where(mask_BxW, jnp.arange(1, width + 1), 0), axis=1).astype(jnp.int32), width


class Encoder(nn.Module):
  """tokens [B, T] -> masked mean of the final hidden states [B, pooled_dim] (float32).

  packing = (layout, layout.plan_slots(*sequence_slots(cfg, tokens))): the layers run over the
  sequences packed several per row (attention within a sequence, positions restarting at
  each), and each sequence gets the output it gets alone.
  """
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, tokens_BxT, packing=None):
    c = self.cfg
    tokens_BxT, mask_BxT = encoder_rows(c, tokens_BxT)
    batch, width = tokens_BxT.shape
    emb_init = nn.with_logical_partitioning(nn.initializers.normal(c.d_model ** -0.5),
                                            ('vocab', 'embed'))
    feature_init = nn.with_logical_partitioning(nn.initializers.normal(c.d_model ** -0.5),
                                                ('feature_values', 'embed'))
    embeds = [(f'feature_{i}', max(t) + 1, lookup(t, tokens_BxT))
              for i, t in enumerate(c.token_features)]
    embeds += [(f'step_{i}', 2 * max(t) + 2, step_ids(t, tokens_BxT))
               for i, t in enumerate(c.token_steps)]
    pos_xW = jnp.arange(width, dtype=jnp.int32)  # every row alike, unless packed
    inputs_BxW, keys_BxW, segments_BxW = tokens_BxT, mask_BxT, None
    if packing is not None:  # every per-slot input moves to its packed slot
      layout, plan = packing
      place = functools.partial(layout.place, plan)
      inputs_BxW, keys_BxW = place(tokens_BxT), place(mask_BxT)
      pos_xW = place(jnp.broadcast_to(pos_xW, (batch, width)))
      segments_BxW = place(packing_lib.segment_ids(batch, width, layout.groups))
      embeds = [(name, n, place(ids)) for name, n, ids in embeds]
    x_BxWxD = nn.Embed(c.padded_vocab, c.d_model, embedding_init=emb_init,
                       name='embed')(inputs_BxW).astype(c.jnp_dtype)
    for name, num_values, ids_BxW in embeds:
      x_BxWxD = x_BxWxD + nn.Embed(num_values, c.d_model, embedding_init=feature_init,
                                   name=name)(ids_BxW).astype(c.jnp_dtype)
    x_BxWxD = nn.with_logical_constraint(x_BxWxD, ('batch', 'length', 'embed'))
    for i in range(c.num_layers):
      x_BxWxD = EncoderBlock(c, name=f'layer_{i}')(x_BxWxD, keys_BxW, pos_xW, segments_BxW)
    h_BxTxD = model_lib.RMSNorm(jnp.float32, name='final_norm')(x_BxWxD)
    if packing is not None:  # back to one sequence per row, zeros past its slots
      h_BxTxD = layout.unpack(h_BxTxD, plan, 0, width)
    w_BxT = mask_BxT.astype(jnp.float32)
    # An empty row pools to zeros, so every empty sequence gets the same output.
    mean_BxD = jnp.einsum('btd,bt->bd', h_BxTxD, w_BxT) / jnp.maximum(w_BxT.sum(-1), 1.0)[:, None]
    if not c.anchors:
      return mean_BxD
    # The anchors' own states too: each attends to the whole row, and a mean over
    # ~100 positions would dilute what they single out (e.g. the last event).
    eos_B = jnp.argmax(tokens_BxT == specials.EOS, axis=1)
    eos_BxD = jnp.take_along_axis(h_BxTxD, eos_B[:, None, None], axis=1)[:, 0]
    return jnp.concatenate([mean_BxD, h_BxTxD[:, 0], eos_BxD], axis=-1)


class EmbedNet(nn.Module):
  """Encoder + projection -> unit vectors [B, E]; `log_scale` is InfoNCE's learned 1/temperature."""
  cfg: EncoderConfig
  emb_dim: int
  learn_temperature: bool = False
  init_temperature: float = 0.1

  @nn.compact
  def __call__(self, tokens_BxT):
    if self.learn_temperature:  # created here so init makes it; only the loss reads it
      self.param('log_scale', nn.with_logical_partitioning(
          nn.initializers.constant(-jnp.log(self.init_temperature)), ()), (), jnp.float32)
    pooled_BxD = Encoder(self.cfg, name='encoder')(tokens_BxT)
    # With a bias, an empty row maps to a fixed vector rather than to 0/0.
    proj = nn.Dense(self.emb_dim, dtype=jnp.float32, name='proj',
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ('embed', 'embed_out')),
                    bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                           ('embed_out',)))
    return l2_normalize(proj(pooled_BxD))


def l2_normalize(x_BxE: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x_BxE * jax.lax.rsqrt(jnp.sum(x_BxE * x_BxE, axis=-1, keepdims=True) + eps)


class ClassifierNet(nn.Module):
  """Encoder + one softmax head per attribute -> log-probs [B, A, K_max].

  Heads share one [D, A, K_max] kernel; classes at or past an attribute's size
  get -inf logits, so each attribute's softmax is over its own values only.
  """
  cfg: EncoderConfig
  num_classes: Sequence[int]  # per attribute

  @nn.compact
  def __call__(self, tokens_BxT, packing=None):
    pooled_BxD = Encoder(self.cfg, name='encoder')(tokens_BxT, packing)
    num_attr, k_max = len(self.num_classes), max(self.num_classes)
    w_DxAxK = self.param('head', nn.with_logical_partitioning(
        nn.initializers.normal(self.cfg.pooled_dim ** -0.5), ('embed', 'attributes', 'classes')),
                         (self.cfg.pooled_dim, num_attr, k_max), jnp.float32)
    b_AxK = self.param('head_bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('attributes', 'classes')), (num_attr, k_max), jnp.float32)
    logits_BxAxK = jnp.einsum('bd,dak->bak', pooled_BxD, w_DxAxK) + b_AxK
    valid_AxK = jnp.arange(k_max)[None, :] < jnp.asarray(self.num_classes)[:, None]
    logits_BxAxK = jnp.where(valid_AxK, logits_BxAxK, model_lib.NEG_INF)
    return jax.nn.log_softmax(logits_BxAxK, axis=-1)


def init_fn(net: nn.Module):
  """key -> boxed params of `net` (shape-only dummy input; positions are relative)."""
  def init(key: jax.Array) -> Any:
    return net.init(key, jnp.zeros((1, 2), jnp.int32))['params']
  return init
