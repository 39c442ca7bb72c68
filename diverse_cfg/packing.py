"""Packing: several sequences per row, so training computes on real tokens, not on PAD.

A sequence (prompt p_1..p_C, tokens y_1..y_n then PAD, n counting the EOS)
takes C + n slots of a packed row: its prompt, BOS, y_1..y_{n-1}; slot C + j
predicts y_{j+1}. Positions restart at 0 for each sequence and a slot attends
only to its own sequence (model.Decoder.packed), so every sequence gets the
logits it gets alone in an unpacked row of width W = C + T.

Everything runs inside the jitted step on the batch the pipeline delivers
(unchanged: same rows, same order, on any number of hosts). The batch is cut
into `groups` blocks of consecutive rows, one per batch shard, and each
block is packed by first-fit decreasing into its share of the layout's rows,
so no sequence moves between devices. `Layout.run` then computes on the fewest
of the layout's row counts (`shapes`: e.g. 13, 14, 15 or 16 rows for a batch
of 32) that hold every block, or on the batch's own rows when they do not fit
(`Plan.fits` False): one `lax.switch`, so the step is exact either way and
len(shapes) + 1 shapes compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diverse_cfg import specials


class Packed(NamedTuple):
  """Packed rows, each [R, W]."""
  inputs: jax.Array  # the prompt id at prompt slots, else the token fed (BOS, y_1, ...)
  positions: jax.Array  # slot index within its sequence
  segments: jax.Array  # 1 + the sequence's index within its group; 0 on empty slots
  null: jax.Array  # the sequence is fed the null prompt (bool)
  targets: jax.Array  # the token this slot predicts; PAD where none


class Plan(NamedTuple):
  """Where each of the B sequences lies: a row of its group's packed rows, a first slot."""
  row: jax.Array  # [B] int32, within the group's rows
  offset: jax.Array  # [B] int32
  slots: jax.Array  # [B] int32, prompt + real tokens
  fits: jax.Array  # bool: every group's sequences fit its rows
  rows_used: jax.Array  # int32: groups x the most rows a group's sequences take


@dataclasses.dataclass(frozen=True)
class Layout:
  """What is static about packing a batch: `rows` packed rows, in `groups` blocks; plans are
  made for `rows`, and `run` computes on the fewest rows of `shapes` that hold a plan."""
  groups: int
  rows: int
  fewer: tuple[int, ...] = ()  # smaller packed row counts that compile too (multiples of groups)

  @property
  def shapes(self) -> tuple[int, ...]:
    """Every packed row count that compiles, ascending."""
    return tuple(sorted(set(self.fewer) | {self.rows}))

  def run(self, p: 'Plan', packed_fn, own_rows_fn, *operands):
    """packed_fn(Layout of r rows, *operands) for the fewest r of `shapes` that hold the plan,
    or own_rows_fn(*operands) when it does not fit; one lax.switch over len(shapes) + 1
    branches (each compiles)."""
    shapes = self.shapes
    branches = [functools.partial(packed_fn, Layout(self.groups, r)) for r in shapes]
    return jax.lax.switch(self.branch(p), branches + [own_rows_fn], *operands)

  def branch(self, p: 'Plan'):
    """run's branch: the index in `shapes` of the fewest rows that hold the plan, or
    len(shapes) (the batch's own rows) when it does not fit."""
    fewest = jnp.searchsorted(jnp.asarray(self.shapes, jnp.int32), p.rows_used)
    return jnp.where(p.fits, fewest, len(self.shapes))

  def metrics(self, p: 'Plan', batch: int) -> dict[str, jax.Array]:
    """`packed`: the batch fit; `rows`: the rows the step computed on (packed or its own)."""
    rows_S = jnp.asarray(self.shapes + (batch,), jnp.float32)
    return {'packed': p.fits, 'rows': rows_S[self.branch(p)]}

  def plan(self, tokens_BxT, prompt_len: int) -> Plan:
    return plan(tokens_BxT, prompt_len, self.groups, self.rows)

  def plan_slots(self, slots_B, width: int) -> Plan:
    return plan_slots(slots_B, width, self.groups, self.rows)

  def pack(self, p: Plan, tokens_BxT, prompt_BxC, null_B) -> Packed:
    return pack(p, tokens_BxT, prompt_BxC, null_B, self.groups, self.rows)

  def place(self, p: Plan, values_BxW):
    return place(p, values_BxW, self.groups, self.rows)

  def unpack(self, values_RxWx, p: Plan, prompt_len: int, seq_len: int):
    return unpack(values_RxWx, p, prompt_len, seq_len, self.groups)


def layout(batch: int, groups: int, fraction: float, width: int | None = None,
           min_slots: int = 1, shapes: int = 1, spacing: float = 1 / 32) -> Layout | None:
  """Packed rows = fraction of the batch's rows, rounded up to a multiple of groups; `shapes`
  row counts in all, each `spacing` of the batch's rows (at least `groups`) fewer than the next.

  None (no packing) for fraction 0, when that leaves as many rows as the batch
  has, or when sequences of at least min_slots slots (e.g. fixed-length data)
  could never fit in rows of `width` slots (row_slots gives both).
  """
  rows = _round_up(int(round(batch * fraction)), groups)
  if not 0 < rows < batch:
    return None
  if width is not None and width // min_slots * (rows // groups) < batch // groups:
    return None
  step = _round_up(max(1, int(round(batch * spacing))), groups)
  return Layout(groups, rows, tuple(r for r in range(rows - step, 0, -step)[:shapes - 1]))


def configured(section, batch: int, groups: int, width: int | None = None,
               min_slots: int = 1) -> Layout | None:
  """layout() with a config section's packed_rows, packed_shapes and packed_spacing (no
  packing when it sets no packed_rows, one shape when it sets no packed_shapes)."""
  return layout(batch, groups, section.get('packed_rows', 0.0), width, min_slots,
                int(section.get('packed_shapes', 1)), float(section.get('packed_spacing', 1 / 32)))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def row_slots(cfg, bounds) -> tuple[int, int]:
  """(width, fewest slots a sequence takes) for a model config and the data's length bounds:
  prompt + at least bounds.min events + EOS (a truncated row may lack the EOS)."""
  width = cfg.prompt_len + cfg.seq_len
  return width, min(width, cfg.prompt_len + int(bounds.min) + 1)


def sequence_slots(tokens_BxT, prompt_len: int):
  """Slots each sequence needs: prompt + real (non-PAD) tokens."""
  return prompt_len + jnp.sum(tokens_BxT != specials.PAD, axis=-1).astype(jnp.int32)


def first_fit_decreasing(slots_N, rows: int, width: int):
  """Each item into the first row with room, longest first -> (row_N, offset_N, fits)."""
  order_N = jnp.argsort(-slots_N, stable=True)

  def place(fill_R, size):
    room_R = fill_R + size <= width
    r = jnp.argmax(room_R)
    ok = room_R[r]
    return fill_R.at[r].add(jnp.where(ok, size, 0)), (r, fill_R[r], ok)

  _, (row_N, offset_N, ok_N) = jax.lax.scan(place, jnp.zeros(rows, jnp.int32), slots_N[order_N])
  inverse_N = jnp.argsort(order_N)
  return row_N[inverse_N].astype(jnp.int32), offset_N[inverse_N], jnp.all(ok_N)


def _grouped(x, groups: int):
  """[B, ...] -> [groups, B / groups, ...]: block g is the g-th run of consecutive rows."""
  return x.reshape((groups, -1) + x.shape[1:])


def plan(tokens_BxT, prompt_len: int, groups: int, rows: int) -> Plan:
  """First-fit decreasing of each group of B / groups sequences into rows / groups rows."""
  return plan_slots(sequence_slots(tokens_BxT, prompt_len), prompt_len + tokens_BxT.shape[1],
                    groups, rows)


def plan_slots(slots_B, width: int, groups: int, rows: int) -> Plan:
  """plan for sequences of slots_B slots each, into rows of `width` slots."""
  batch = slots_B.shape[0]
  if batch % groups or rows % groups:
    raise ValueError(f'batch {batch} and packed rows {rows} must split into {groups} groups')
  row_GxN, offset_GxN, fits_G = jax.vmap(
      lambda s: first_fit_decreasing(s, rows // groups, width))(_grouped(slots_B, groups))
  # First fit fills the first rows it can, so a plan for fewer rows is the same plan.
  rows_used = groups * (jnp.max(row_GxN) + 1)
  return Plan(row_GxN.reshape(-1), offset_GxN.reshape(-1), slots_B, jnp.all(fits_G),
              rows_used.astype(jnp.int32))


def pack(p: Plan, tokens_BxT, prompt_BxC, null_B, groups: int, rows: int) -> Packed:
  """The batch's sequences laid out in `rows` packed rows of width C + T (see Plan)."""
  batch, seq_len = tokens_BxT.shape
  c = prompt_BxC.shape[1]
  width = c + seq_len
  bos_Bx1 = jnp.full((batch, 1), specials.BOS, tokens_BxT.dtype)
  fields = Packed(
      inputs=jnp.concatenate([prompt_BxC.astype(tokens_BxT.dtype), bos_Bx1, tokens_BxT[:, :-1]], 1),
      positions=jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width)),
      segments=segment_ids(batch, width, groups),
      null=jnp.broadcast_to(null_B[:, None], (batch, width)),
      targets=jnp.concatenate([jnp.full((batch, c), specials.PAD, tokens_BxT.dtype), tokens_BxT],
                              1))
  return Packed(*(place(p, v, groups, rows) for v in fields))


def segment_ids(batch: int, width: int, groups: int):
  """[B, W]: 1 + each sequence's index within its group (a segments field, before place)."""
  return jnp.broadcast_to((1 + jnp.arange(batch, dtype=jnp.int32) % (batch // groups))[:, None],
                          (batch, width))


def place(p: Plan, values_BxW, groups: int, rows: int):
  """Each sequence's first p.slots values at its (row, offset) of the packed rows [R, W];
  0 on the slots no sequence takes."""
  width, rows_g = values_BxW.shape[1], rows // groups
  slot_W = jnp.arange(width)
  # Flat destination in the group's rows_g * width slots; slots past a sequence go nowhere.
  dest_BxW = jnp.where(slot_W[None] < p.slots[:, None],
                       p.row[:, None] * width + p.offset[:, None] + slot_W[None], rows_g * width)

  def scatter(values_NxW, dest_NxW):
    flat = jnp.zeros(rows_g * width, values_NxW.dtype).at[dest_NxW.reshape(-1)].set(
        values_NxW.reshape(-1), mode='drop')
    return flat.reshape(rows_g, width)

  return jax.vmap(scatter)(_grouped(values_BxW, groups),
                           _grouped(dest_BxW, groups)).reshape(rows, width)


def unpack(values_RxWx, p: Plan, prompt_len: int, seq_len: int, groups: int):
  """Per-slot values [R, W, ...] back to [B, T, ...]: entry t is the value at the slot that
  predicts y_{t+1}; 0 after a sequence's last real token."""
  width = values_RxWx.shape[1]
  t_T = jnp.arange(seq_len)
  idx_BxT = p.row[:, None] * width + p.offset[:, None] + prompt_len + t_T[None]
  real_BxT = prompt_len + t_T[None] < p.slots[:, None]

  def gather(values_RgxWx, idx_NxT, real_NxT):
    flat = values_RgxWx.reshape((-1,) + values_RgxWx.shape[2:])
    out = flat[jnp.clip(idx_NxT, 0, flat.shape[0] - 1)]
    return jnp.where(real_NxT.reshape(real_NxT.shape + (1,) * (out.ndim - 2)), out, 0)

  out = jax.vmap(gather)(_grouped(values_RxWx, groups), _grouped(idx_BxT, groups),
                         _grouped(real_BxT, groups))
  return out.reshape((-1, seq_len) + values_RxWx.shape[2:]).astype(values_RxWx.dtype)
