"""Packing: the plan, and every sequence of a packed batch gets exactly what it gets alone."""

import collections
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import helpers
from diverse_cfg import finetune
from diverse_cfg import model as model_lib
from diverse_cfg import packing
from diverse_cfg import pretrain
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials
from diverse_cfg.data import melody
from diverse_cfg.data import meta as meta_lib
from diverse_cfg.evaluators import encoder
from helpers import CFG


def ragged_batch(cfg, batch, seed=0, lengths=None):
  """Tokens with lengths real tokens (EOS last, then PAD), prompts, null flags."""
  rng = np.random.default_rng(seed)
  if lengths is None:
    lengths = rng.integers(1, cfg.seq_len + 1, batch)
  tokens = rng.integers(specials.NUM_SPECIAL, cfg.vocab_size, (batch, cfg.seq_len))
  t = np.arange(cfg.seq_len)[None]
  lengths = np.asarray(lengths)[:, None]
  tokens = np.where(t < lengths - 1, tokens, np.where(t == lengths - 1, specials.EOS, specials.PAD))
  prompt = rng.integers(0, cfg.prompt_vocab_size, (batch, cfg.prompt_len))
  null = rng.random(batch) < 0.3
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(prompt, jnp.int32), jnp.asarray(null)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_first_fit_decreasing_places_every_item_without_overlap(seed):
  rng = np.random.default_rng(seed)
  sizes = rng.integers(1, 11, 12)
  row, offset, fits = jax.jit(packing.first_fit_decreasing, static_argnums=(1, 2))(
      jnp.asarray(sizes, jnp.int32), 6, 16)
  row, offset = np.asarray(row), np.asarray(offset)
  if sizes.sum() > 6 * 16:
    assert not bool(fits)
  else:
    assert bool(fits)  # first-fit decreasing needs at most 11/9 OPT + 1 rows; here it fits
    for r in range(6):
      spans = sorted((offset[i], offset[i] + sizes[i]) for i in np.flatnonzero(row == r))
      assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
      assert all(0 <= s and e <= 16 for s, e in spans)


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_a_plan_holds_in_exactly_its_rows_used(seed):
  """rows_used is the fewest rows first-fit decreasing fits the group's items into, and a plan
  for more rows places every item as in those fewest rows (why Layout.run may compute on
  any shape >= rows_used)."""
  rng = np.random.default_rng(seed)
  slots = jnp.asarray(rng.integers(1, 15, 16), jnp.int32)
  p = packing.plan_slots(slots, 16, 2, 16)
  used = int(p.rows_used)
  for rows in range(2, 17, 2):
    q = packing.plan_slots(slots, 16, 2, rows)
    assert bool(q.fits) == (rows >= used), rows
    if rows >= used:
      np.testing.assert_array_equal(q.row, p.row)
      np.testing.assert_array_equal(q.offset, p.offset)
  assert used < 16  # 16 items of < 15 slots in rows of 16 never need one row each


def test_first_fit_decreasing_reports_what_does_not_fit():
  sizes = jnp.asarray([9, 9, 9], jnp.int32)  # two rows of 16 hold two of them
  assert not bool(packing.first_fit_decreasing(sizes, 2, 16)[2])
  assert bool(packing.first_fit_decreasing(sizes, 3, 16)[2])
  # Exactly full rows fit: [8 + 8] and [16].
  assert bool(packing.first_fit_decreasing(jnp.asarray([8, 16, 8], jnp.int32), 2, 16)[2])


@pytest.mark.parametrize('variant, groups', [({}, 2), ({'prompt_len': 0}, 1),
                                             ({'scan_layers': True}, 1)])
def test_packed_rows_give_each_sequence_its_logits_alone(variant, groups):
  cfg = dataclasses.replace(CFG, **variant)
  params = helpers.params(cfg)
  batch = 8
  lengths = [1, 12, 3, 5, 2, 7, 4, 9]
  tokens, prompt, null = ragged_batch(cfg, batch, lengths=lengths)
  pack = packing.layout(batch, groups, 0.75)  # 6 rows of 15 slots for 67 slots of sequences

  @jax.jit
  def packed_logits(params, tokens, prompt, null):
    plan = pack.plan(tokens, cfg.prompt_len)
    logits = model_lib.forward_packed(cfg, params, pack.pack(plan, tokens, prompt, null))
    return pack.unpack(logits, plan, cfg.prompt_len, cfg.seq_len), plan.fits

  got, fits = packed_logits(params, tokens, prompt, null)
  assert bool(fits)
  want = jax.jit(model_lib.forward, static_argnums=0)(cfg, params, tokens, prompt, null)
  real = np.asarray(tokens != specials.PAD)
  assert real.sum() == sum(lengths)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[~real] == 0)


def _sgd_state(cfg, seed=0):
  """SGD with lr 1: after one step, params - new params = the gradient."""
  tx = optax.sgd(1.0)
  state, _ = sharding.create_sharded(pretrain.init_state_fn(cfg, tx),
                                     *helpers.mesh(jax.devices()[:1]), jax.random.key(seed))
  return tx, state


def _assert_same_step(out_a, out_b, keys):
  (state_a, m_a), (state_b, m_b) = out_a, out_b
  for k in keys:
    np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=2e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(state_a['params']), jax.tree.leaves(state_b['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize('fraction, shapes, spacing, fits, rows', [
    (0.5, 1, 0.25, True, 4), (0.75, 3, 0.25, True, 4), (0.75, 2, 0.5, True, 6),
    (0.25, 1, 0.25, False, 8)])
def test_packed_pretraining_step_equals_the_unpacked_one(fraction, shapes, spacing, fits, rows):
  """Same loss and gradient (SGD, lr 1: the update is the gradient) on the fewest packed rows
  of the layout's shapes that hold the batch (44 slots in 2 groups of rows of 15: 2 rows per
  group); when the batch does not fit them the step falls back to its own rows."""
  tx, state = _sgd_state(CFG)
  schedule = lambda step: 1.0
  tokens, prompt, _ = ragged_batch(CFG, 8, seed=3, lengths=[1, 4, 2, 3, 4, 1, 2, 3])
  batch = {'tokens': tokens, 'prompt': prompt}
  pack = packing.layout(8, 2, fraction, shapes=shapes, spacing=spacing)
  run = lambda p: jax.jit(pretrain.train_step_fn(CFG, tx, schedule, 5, p))(state, batch,
                                                                           jnp.int32(0))
  packed, plain = run(pack), run(None)
  assert bool(packed[1]['packed']) == fits
  assert float(packed[1]['rows']) == rows
  _assert_same_step(packed, plain, ['loss', 'grad_norm'])


@pytest.mark.parametrize('rollout_min_rows', [0, 4])
def test_packed_finetuning_step_equals_the_unpacked_one(rollout_min_rows):
  """Rollout, teacher scoring, KL, reward and update: the same with and without packing
  (the fallback to the batch's own rows is the pretraining test's), with the rollout in one
  batch or compacted down to 4 rows."""
  tx, state = _sgd_state(CFG)
  teacher = helpers.params(CFG, seed=4)
  proj = jax.random.normal(jax.random.key(2), (CFG.vocab_size, 8))
  embed = lambda p, tokens: jnp.sum(p[tokens] * (tokens != specials.PAD)[..., None], axis=1)
  f = ml_collections.ConfigDict({'k': 4, 'kl': 'student_teacher', 'temperature': 1.0,
                                 'rollout_min_rows': rollout_min_rows})
  bounds = sampling.LengthBounds(0, 3)  # at most 3 events + EOS: 7 of 15 slots, two per row
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, CFG.prompt_vocab_size, (4, 3)),
                       jnp.int32)
  frozen = {'teacher': teacher, 'embedder': proj}

  def run(pack):
    step = finetune.finetune_step_fn(CFG, f, tx, lambda s: 1.0, 8.0, 0, embed,
                                     sampling.Guidance(3.0, 0.1), bounds, pack)
    return jax.jit(step)(state, {'prompt': prompt}, jnp.int32(0), frozen)

  pack = packing.layout(16, 2, 0.5, shapes=4, spacing=1 / 8)
  assert pack.shapes == (2, 4, 6, 8)
  packed, plain = run(pack), run(None)
  assert bool(packed[1]['packed']) and float(packed[1]['rows']) in pack.shapes
  assert float(plain[1]['kl']) > 0.1 and float(plain[1]['advantage/abs_mean']) > 0
  _assert_same_step(packed, plain, ['loss', 'kl', 'entropy', 'grad_norm', 'length'])


def test_no_layout_when_the_data_can_never_fit():
  cfg = dataclasses.replace(CFG, seq_len=25, prompt_len=1)  # 26 slots per row
  variable = packing.row_slots(cfg, sampling.LengthBounds())
  fixed = packing.row_slots(cfg, sampling.LengthBounds(24, 24))  # every sequence takes 26 slots
  assert variable == (26, 2) and fixed == (26, 26)
  assert packing.layout(32, 2, 0.5, *variable) == packing.Layout(2, 16)
  # Smaller row counts: spacing of the batch's rows apart, in multiples of the groups.
  assert packing.layout(32, 1, 0.5, *variable, shapes=4).shapes == (13, 14, 15, 16)
  assert packing.layout(32, 2, 0.5, *variable, shapes=4, spacing=1 / 16).shapes == (10, 12, 14, 16)
  assert packing.layout(32, 8, 0.5, *variable, shapes=4).shapes == (8, 16)
  assert packing.layout(32, 2, 0.5, *fixed) is None  # one sequence per row: never fits
  assert packing.layout(32, 2, 0.0, *variable) is None
  assert packing.layout(32, 2, 1.0, *variable) is None  # as many rows as the batch


def melody_rows(lengths, width, seed=0):
  """Melody token rows with `lengths` events each (notes and rests), then EOS and PAD."""
  rng = np.random.default_rng(seed)
  rows = np.full((len(lengths), width), specials.PAD, np.int32)
  for i, n in enumerate(lengths):
    rows[i, :n] = rng.integers(specials.NUM_SPECIAL, melody.VOCAB_SIZE, n)
    if n < width:
      rows[i, n] = specials.EOS
  return jnp.asarray(rows)


@pytest.mark.parametrize('anchors, groups', [(True, 2), (False, 1)])
def test_packed_encoder_gives_each_sequence_its_output_and_gradient_alone(anchors, groups):
  """The evaluators' encoder over packed rows (token features, interval steps, anchors):
  each sequence's classifier log-probs and the loss's gradient as in its own row."""
  tables = meta_lib.token_feature_tables('melody_steps')
  cfg = encoder.EncoderConfig(vocab_size=melody.VOCAB_SIZE, num_layers=2, d_model=16,
                              num_heads=2, mlp_dim=32, anchors=anchors,
                              token_features=tables.values, token_steps=tables.steps)
  net = encoder.ClassifierNet(cfg, num_classes=(3, 5))
  lengths = [9, 0, 3, 12, 2, 6, 1, 5]  # one empty sequence; with anchors group 0 fills 2 rows
  tokens = melody_rows(lengths, 14)
  labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, (8, 2)))
  params = nn.meta.unbox(net.init(jax.random.key(0), tokens)['params'])
  layout = packing.layout(8, groups, 0.5)
  plan = layout.plan_slots(*encoder.sequence_slots(cfg, tokens))
  assert bool(plan.fits)
  slots = np.asarray(plan.slots)
  np.testing.assert_array_equal(slots, np.asarray(lengths) + (2 if anchors else 0))

  def loss(params, packed):
    logp = net.apply({'params': params}, tokens, (layout, plan) if packed else None)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1)), logp

  (loss_p, logp_p), grads_p = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, True)
  (loss_u, logp_u), grads_u = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
      params, False)
  np.testing.assert_allclose(np.asarray(logp_p), np.asarray(logp_u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # The rows are really shared: 8 sequences in 4 rows.
  rows = collections.Counter(zip(np.arange(8) // (8 // groups), np.asarray(plan.row)))
  assert sum(rows.values()) == 8 and len(rows) <= 4
