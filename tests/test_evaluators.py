"""Evaluators: closed forms of the measures, chunking, and what the trained smoke models learn."""

import copy
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from configs import essen as essen_config
from diverse_cfg import checkpoints
from diverse_cfg import config_lib
from diverse_cfg import evaluators
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import melody
from diverse_cfg.data import meta as meta_lib
from diverse_cfg.data import registry
from diverse_cfg.evaluators import chunks
from diverse_cfg.evaluators import classifier
from diverse_cfg.evaluators import embedder as embedder_lib
from diverse_cfg.evaluators import encoder
from diverse_cfg.evaluators import stage

S = specials.NUM_SPECIAL


def _row(events, length, tail=()):
  """events (+ EOS) then PAD, as a row of `length`; `tail` overwrites the end (after EOS)."""
  row = np.full(length, specials.PAD, np.int32)
  row[:len(events)] = events
  row[len(events)] = specials.EOS
  if tail:
    row[-len(tail):] = tail
  return row


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Both evaluators trained on the smoke preset over the synthetic imported dataset."""
  root = tmp_path_factory.mktemp('evaluators')
  npz = helpers.synthetic_npz(str(root / 'arith.npz'))
  config = helpers.smoke_config(str(root), npz)
  devices = jax.devices()[:8]
  runs = {name: lib.run(config, str(root), devices=devices, progress=False)
          for name, lib in (('embedder', embedder_lib), ('classifier', classifier))}
  sources, _ = registry.load_dataset('imported', config.data.data_dir, npz_path=npz)
  test = stage.split_arrays(sources['test'], ('tokens', 'prompt'))
  return {'root': root, 'runs': runs, 'test': test, 'config': config,
          'embedder': evaluators.load_embedder(str(root / 'embedder')),
          'quality': evaluators.load_quality_model(str(root / 'classifier'))}


# --- model-free closed forms -------------------------------------------------------------------

def test_shared_ngram_fraction_closed_forms():
  a = _row([3, 4, 5, 6], 10, tail=(5, 9))  # what follows EOS must not count
  b = _row([3, 4, 5, 9, 9, 9], 10)
  c = _row([10, 11, 12, 13], 10)
  # a's bigrams (3,4) (4,5) (5,6): 2 of 3 occur in b;
  # b's (3,4) (4,5) (5,9) (9,9) (9,9): 2 of 5 occur in a.
  assert evaluators.shared_ngram_fraction(np.stack([[a, b]]), n=2) == pytest.approx(
      (2 / 3 + 2 / 5) / 2)
  assert evaluators.shared_ngram_fraction(np.stack([[a, a, a]]), n=2) == 1.0
  assert evaluators.shared_ngram_fraction(np.stack([[a, c]]), n=2) == 0.0
  # Means over prompts: one partial prompt, one of identical generations.
  assert evaluators.shared_ngram_fraction(np.stack([[a, b], [c, c]]), n=2) == pytest.approx(
      ((2 / 3 + 2 / 5) / 2 + 1) / 2)


def _grammar_rows(rng, n, length, break_rate=0.0):
  """Rows that alternate a 'pitch' (ids S..S+4) and a 'duration' (S+5..S+9) token.

  With break_rate > 0, each token after the first is of the wrong kind with that
  probability (pitch after pitch, ...), the grammar break guidance can cause.
  """
  rows = []
  for _ in range(n):
    kind, events = 0, []
    for t in range(length):
      if t and rng.random() < break_rate:
        kind = 1 - kind
      events.append(S + 5 * kind + int(rng.integers(5)))
      kind = 1 - kind
    rows.append(_row(events, length + 4))
  return rows


def test_unseen_bigrams_rise_as_a_sampler_breaks_the_grammar():
  rng = np.random.default_rng(0)
  reference = evaluators.FidelityReference.from_rows(_grammar_rows(rng, 300, 10),
                                                     _grammar_rows(rng, 50, 10))
  # Every legal bigram (and BOS->pitch, ->EOS) occurs in 300 training rows.
  assert evaluators.fidelity(_grammar_rows(rng, 50, 10), reference)['unseen_2gram'] == 0.0
  rates = [evaluators.fidelity(_grammar_rows(rng, 200, 10, q), reference)['unseen_2gram']
           for q in (0.0, 0.1, 0.3, 0.6)]
  assert rates == sorted(rates) and rates[0] == 0.0 and rates[-1] > 0.3
  # Of a row's 11 anchored bigrams, each of the 9 inner ones breaks with probability q, and an
  # odd number of breaks leaves a pitch before EOS, which training rows never end on.
  q = 0.3
  np.testing.assert_allclose(rates[2], (9 * q + (1 - (1 - 2 * q) ** 9) / 2) / 11, atol=0.02)


def test_length_distance_of_a_truncating_sampler_and_w1_closed_forms():
  assert evaluators.metrics.wasserstein_1([1, 2, 3], [3, 4, 5]) == pytest.approx(2.0)
  assert evaluators.metrics.wasserstein_1([0, 0, 1], [0, 1, 1]) == pytest.approx(1 / 3)
  assert evaluators.metrics.wasserstein_1([2, 7], [7, 2]) == 0.0
  rng = np.random.default_rng(1)
  heldout = [_row(list(range(S, S + n)), 30) for n in rng.integers(10, 21, 200)]
  reference = evaluators.FidelityReference.from_rows(heldout, heldout)
  same = evaluators.fidelity(heldout, reference)
  assert same['length_gap'] == 0.0 and same['length_w1'] == 0.0
  # A sampler that stops every row after 8 events: every length moves down by (n - 8).
  truncated = [_row(list(range(S, S + 8)), 30) for _ in heldout]
  got = evaluators.fidelity(truncated, reference)
  want = np.mean([evaluators.metrics.event_count(r) for r in heldout]) - 8
  assert got['length_gap'] == pytest.approx(-want)
  assert got['length_w1'] == pytest.approx(want)  # all mass moved one way: W1 = |mean gap|
  # Rows that never ended (no EOS) are counted by their events; their n-grams carry no EOS.
  assert reference.length_step == 1 and got['length_off_grid'] == 0.0
  # Rows of whole 4-token events set a grid of 4; a row that stops inside an event is off it.
  grid = evaluators.FidelityReference.from_rows([_row([S] * n, 30) for n in (8, 12, 20)], heldout)
  assert grid.length_step == 4
  rows = [_row([S] * n, 30) for n in (4, 6, 16, 17)]
  assert evaluators.fidelity(rows, grid)['length_off_grid'] == 0.5
  no_eos = np.full(12, S, np.int32)
  assert evaluators.metrics.anchored_events(no_eos).tolist() == [specials.BOS] + [S] * 12


def test_pairwise_dissimilarity_matches_numpy():
  emb = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
  unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  want = 1.0 - np.einsum('pkd,pld->pkl', unit, unit)
  got = np.asarray(evaluators.pairwise_dissimilarity(jnp.asarray(emb)))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.all(np.diagonal(got, axis1=1, axis2=2) == 0)
  # Given the tokens, the same sequence (whatever follows EOS) is at exactly 0, others unchanged.
  tokens = np.stack([[_row([3 + p, 4 + k], 6) for k in range(5)] for p in range(3)])
  tokens[0, 2] = _row([3, 4], 6, tail=(7,))  # = generation 0 of prompt 0 up to its EOS
  got = np.asarray(evaluators.pairwise_dissimilarity(jnp.asarray(emb), jnp.asarray(tokens)))
  assert got[0, 0, 2] == got[0, 2, 0] == 0.0
  mask = np.ones_like(got, bool)
  mask[0, 0, 2] = mask[0, 2, 0] = False
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-6)


def test_user_embedder_plain_function_in_diversity():
  """A parameter-free bag-of-events embedder: diversity equals its numpy closed form."""
  vocab = 16

  def bag_of_events(_, tokens_BxT):
    counts = jnp.sum(jax.nn.one_hot(tokens_BxT, vocab) * (tokens_BxT >= S)[..., None], axis=1)
    return counts / jnp.linalg.norm(counts, axis=-1, keepdims=True)

  user = evaluators.Embedder(apply=bag_of_events, params={})
  tokens = np.stack([[_row([3, 4, 5], 8), _row([3, 3, 6], 8), _row([7, 8], 8)],
                     [_row([5, 5], 8), _row([5, 9], 8), _row([9, 9, 9], 8)]])
  counts = np.stack([[np.bincount(r[r >= S], minlength=vocab) for r in p] for p in tokens])
  unit = counts / np.linalg.norm(counts, axis=-1, keepdims=True)
  cos = np.einsum('pkd,pld->pkl', unit, unit)
  want = np.mean([(1 - cos[p])[~np.eye(3, dtype=bool)].mean() for p in range(2)])
  assert float(evaluators.diversity(user, tokens)) == pytest.approx(want, abs=1e-6)
  # The finetuning step calls apply inside its own jit.
  inside = jax.jit(lambda p, t: user.apply(p, t))(user.params, tokens[0])
  np.testing.assert_allclose(inside, unit[0], atol=1e-6)


# --- chunking ----------------------------------------------------------------------------------

def test_random_pairs_are_disjoint_runs_inside_the_events():
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 40, size=64)
  lengths[:3] = (2, 3, 40)
  tokens = np.stack([_row(S + np.arange(n), 48) for n in lengths])  # event id = S + position
  first, second, valid = jax.device_get(chunks.random_pair(jax.random.key(1), tokens, 8))
  assert valid.all()
  for n, f, s in zip(lengths, first, second):
    c = min(8, n // 2)
    f, s = f[f != specials.PAD] - S, s[s != specials.PAD] - S
    assert len(f) == len(s) == c
    assert np.all(np.diff(f) == 1) and np.all(np.diff(s) == 1)  # contiguous runs
    assert f[0] >= 0 and s[-1] < n and f[-1] < s[0]  # inside the events, first before second
  again = jax.device_get(chunks.random_pair(jax.random.key(1), tokens, 8))
  np.testing.assert_array_equal(again[0], first)  # deterministic per key
  _, _, short = jax.device_get(chunks.random_pair(jax.random.key(1), np.stack([_row([S], 4)]), 8))
  assert not short.any()  # one event: no pair


# --- trained smoke models ----------------------------------------------------------------------

def test_training_loss_falls_and_heldout_figures_beat_chance(trained):
  for name in ('embedder', 'classifier'):
    losses = [h['loss'] for h in trained['runs'][name].history if 'loss' in h]
    assert losses[-1] < losses[0] - 0.3, (name, losses)
  emb = json.load(open(trained['root'] / 'embedder' / "heldout.json"))
  assert emb['retrieval']['top1'] > 5 * emb['retrieval']['chance']
  cls = json.load(open(trained['root'] / 'classifier' / "heldout.json"))
  for name, acc in cls['accuracy'].items():
    assert acc['accuracy'] > acc['majority_rate'], (name, acc)
  assert cls['quality']['own_prompts'] > cls['quality']['shuffled_prompts']
  rows = [json.loads(l) for l in open(trained['root'] / 'embedder' / 'metrics.jsonl')]
  assert rows[-1]['test/retrieval/top1'] == emb['retrieval']['top1']


def test_identical_generations_have_zero_diversity(trained):
  tokens = np.repeat(trained['test']['tokens'][:6, None], 4, axis=1)  # [P=6, K=4, T]
  assert float(evaluators.diversity(trained['embedder'], tokens)) == 0.0


def test_different_pieces_are_more_diverse_than_near_duplicates(trained):
  test = trained['test']
  # Groups of 4 pieces with 4 different prompts vs 4 copies of one piece, one event changed in each.
  _, first = np.unique(test['prompt'][:, 0] * 100 + test['prompt'][:, 1], return_index=True)
  assert len(first) >= 8
  different = test['tokens'][first[:8]].reshape(2, 4, -1)
  rng = np.random.default_rng(0)
  dups = np.repeat(test['tokens'][first[:2], None], 4, axis=1).copy()
  for p in range(2):
    for k in range(4):
      n = chunks.event_counts(dups[p, k:k + 1])[0]
      dups[p, k, rng.integers(int(n))] = S + rng.integers(20)
  d_real = float(evaluators.diversity(trained['embedder'], different))
  d_dup = float(evaluators.diversity(trained['embedder'], dups))
  assert d_real > d_dup + 0.1, (d_real, d_dup)


def test_own_prompts_score_higher_than_shuffled(trained):
  test, qm = trained['test'], trained['quality']
  mean_own, per_attr_own = evaluators.quality(qm, test['tokens'], test['prompt'])
  mean_shuf, _ = evaluators.quality(qm, test['tokens'], np.roll(test['prompt'], 1, axis=0))
  assert per_attr_own.shape == (len(test['tokens']), 2)
  np.testing.assert_allclose(mean_own, per_attr_own.mean(-1), rtol=1e-6)
  np.testing.assert_allclose(qm.quality(test['tokens'], test['prompt']), mean_own, rtol=1e-6)
  assert float(mean_own.mean()) > float(mean_shuf.mean()) + 0.1


def test_loaders_restore_onto_another_mesh(trained):
  """The trained state on 8 devices and a restore onto a 2x2 (data x fsdp) mesh agree."""
  run = trained['runs']['embedder']
  tokens = trained['test']['tokens'][:8]
  want = evaluators.Embedder(trained['embedder'].apply, run.state['params'])(tokens)
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 2, 'tensor': 1}),
                                jax.devices()[:4])
  rules = (('embed', 'fsdp'), ('batch', ('data', 'fsdp')))
  loaded = evaluators.load_embedder(str(trained['root'] / 'embedder'), mesh, rules)
  emb_kernel = loaded.params['encoder']['embed']['embedding']
  assert emb_kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  np.testing.assert_allclose(loaded(tokens), want, atol=1e-5)


def test_frozen_models_load_from_the_work_directory_what_is_not_given(trained, tmp_path):
  user = evaluators.Embedder(apply=lambda _, t: jax.nn.one_hot(t[:, 0], 4), params={})
  tokens, prompt = trained['test']['tokens'][:8], trained['test']['prompt'][:8]
  emb, qm = evaluators.frozen_models(workdir_lib.WorkDir(str(trained['root'])), embedder=user)
  assert emb is user
  np.testing.assert_allclose(qm.quality(tokens, prompt), trained['quality'].quality(tokens, prompt),
                             rtol=1e-6)
  empty = workdir_lib.WorkDir(str(tmp_path))
  assert evaluators.frozen_models(empty, embedder=user) == (user, None)
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint'):
    evaluators.frozen_models(empty)


def test_classifier_starts_from_the_trained_embedders_encoder(trained):
  root = trained['root']
  exp = classifier.prepare(copy.deepcopy(trained['config']), jax.devices()[:1])
  task = classifier.make_task(exp, str(root / 'embedder'))
  fresh, _ = sharding_lib.create_sharded(task.init_state, exp.mesh, exp.rules, jax.random.key(0))
  fresh = jax.tree.map(np.asarray, fresh)  # warm_start may reuse buffers
  start = task.warm_start(fresh)
  jax.tree.map(np.testing.assert_array_equal, start['params']['encoder'],
               trained['embedder'].params['encoder'])
  for head in ('head', 'head_bias'):  # the heads stay as initialised
    np.testing.assert_array_equal(start['params'][head], fresh['params'][head])
  with pytest.raises(config_lib.ConfigError, match='needs the trained embedder of this work '
                     'directory: no checkpoint in'):
    classifier.make_task(exp, str(root / 'nowhere')).warm_start(fresh)
  config = copy.deepcopy(trained['config'])
  config.classifier.d_model, config.classifier.mlp_dim = 64, 96
  with pytest.raises(config_lib.ConfigError, match=r"init_from_embedder=True but the embedder in "
                     r".* has another encoder \(d_model: classifier 64 vs embedder 32; mlp_dim: "
                     r"classifier 96 vs embedder 64\)"):
    classifier.embedder_encoder_params(classifier.prepare(config, jax.devices()[:1]),
                                       str(root / 'embedder'))


def test_class_weights_closed_form():
  labels = np.array([[0, 2], [0, 2], [0, 2], [1, 2]])  # attribute 0: 3 x class 0, 1 x class 1
  w = classifier.class_weights(labels, (2, 3), 1.0)
  # Frequencies with one pseudo-count per class: (4/6, 2/6); 1/freq = (1.5, 3), mean 2 -> /2.
  np.testing.assert_allclose(w[0], [0.75, 1.5, 0.0], rtol=1e-6)  # padding entry stays 0
  freq = np.array([1, 1, 5]) / 7.0
  np.testing.assert_allclose(w[1], 1 / freq / np.sum(freq / freq), rtol=1e-6)
  np.testing.assert_array_equal(classifier.class_weights(labels, (2, 3), 0.0),
                                [[1, 1, 0], [1, 1, 1]])


def test_class_balanced_loss_weights_each_row_by_its_labels(trained):
  config = copy.deepcopy(trained['config'])
  config.classifier.class_balance, config.classifier.init_from_embedder = 0.5, False
  exp = classifier.prepare(config, jax.devices()[:1])
  task = classifier.make_task(exp)
  state, _ = sharding_lib.create_sharded(task.init_state, exp.mesh, exp.rules, jax.random.key(0))
  batch = next(iter(task.batches))
  with sharding_lib.activate(exp.mesh, exp.rules):
    _, m = jax.jit(task.train_step)(state, batch, 0)
  cl = exp.config.classifier
  train = stage.split_arrays(exp.sources['train'], ('prompt',))['prompt']
  w = classifier.class_weights(train - np.array(cl.prompt_offsets), cl.num_classes, 0.5)
  logp = np.asarray(classifier.build_net(exp.config).apply({'params': state['params']},
                                                           batch['tokens']))
  labels = np.asarray(batch['prompt']) - np.array(cl.prompt_offsets)
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  want = np.mean(nll * w[np.arange(len(cl.num_classes)), labels])
  np.testing.assert_allclose(float(m['loss']), want, rtol=1e-5)
  assert abs(want - np.mean(nll)) > 1e-3  # the weights matter for this batch


def test_prompt_offsets_select_each_attributes_own_classes():
  """Per-attribute vocabularies (not shared): each attribute's probabilities sum to 1."""
  md = meta_lib.metadata_dict(name='toy', vocab_size=12, seq_len=8, attribute_names=('a', 'b'),
                              attribute_sizes=(3, 5), is_melody=False, split_sizes={})
  meta = meta_lib.DatasetMeta.from_metadata(md)
  attrs = classifier.attributes_of(meta)
  assert attrs['num_classes'] == (3, 5) and attrs['prompt_offsets'] == (0, 3)
  config = essen_config.get_config('smoke')
  config.model.vocab_size = 12
  for k, v in attrs.items():
    config.classifier[k] = v
  stage.fill_token_features(config.classifier, 'classifier', meta)
  net = classifier.build_net(config)
  params = nn.meta.unbox(encoder.init_fn(net)(jax.random.key(0)))
  qm = classifier.make_quality_model(config, params)
  tokens = np.stack([_row([3, 4, 5], 8), _row([7], 8)])
  for a, (size, offset) in enumerate(zip((3, 5), (0, 3))):
    total = 0.0
    for v in range(size):
      prompt = np.tile(np.array([[0, 3]]), (2, 1))
      prompt[:, a] = offset + v
      total += np.asarray(qm(tokens, prompt))[:, a]
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
  pred = np.asarray(qm.predict(qm.params, tokens))
  assert np.all((pred[:, 0] >= 0) & (pred[:, 0] < 3) & (pred[:, 1] >= 3) & (pred[:, 1] < 8))


# --- token features ----------------------------------------------------------------------------

def test_melody_token_features_are_the_events_parts():
  tables = meta_lib.TOKEN_FEATURES['melody'][0]()
  assert list(tables) == ['pitch_class', 'octave', 'duration']
  assert all(len(t) == melody.VOCAB_SIZE for t in tables.values())
  for midi, dur, want in ((62, 1, (2, 1, 5)), (48, '1/8', (0, 0, 0)), (95, 12, (11, 3, 17)),
                          (None, '3/2', (12, 4, 7))):
    token = melody.encode_event(midi, dur)
    assert tuple(t[token] for t in tables.values()) == want, (midi, dur)
  for special in (specials.PAD, specials.BOS, specials.EOS):  # a value of their own
    assert tuple(t[special] for t in tables.values()) == (13, 5, 18)


def test_token_features_tie_tokens_that_share_them():
  """With the tokens' own embeddings zeroed, a row reads only its tokens' feature values."""
  table_V = (9, 9, 9, 0, 1, 0, 2, 1, 0, 2)  # specials 9; ids 3, 5, 8 share value 0
  cfg = encoder.EncoderConfig(vocab_size=10, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                              token_features=(table_V,))
  net = encoder.Encoder(cfg)
  params = nn.meta.unbox(net.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))['params'])
  assert params['feature_0']['embedding'].shape == (10, 16)  # values 0..9
  params['embed']['embedding'] = jnp.zeros_like(params['embed']['embedding'])
  rows = np.stack([_row([3, 4, 6], 6), _row([5, 7, 6], 6), _row([8, 4, 6], 6),
                   _row([3, 6, 4], 6)])
  out = np.asarray(net.apply({'params': params}, rows))
  np.testing.assert_allclose(out[1], out[0], atol=1e-6)
  np.testing.assert_allclose(out[2], out[0], atol=1e-6)
  assert np.abs(out[3] - out[0]).max() > 1e-3  # same bag of values, other order
  plain = encoder.Encoder(dataclasses.replace(cfg, token_features=()))
  plain_params = nn.meta.unbox(plain.init(jax.random.key(0), rows)['params'])
  assert not any(k.startswith('feature_') for k in plain_params)


def test_steps_are_intervals_between_the_notes():
  """The step table's ids on a row: none at the start, across a rest to the note before it."""
  pitch_V = meta_lib.token_feature_tables('melody_steps').steps[0]
  assert len(pitch_V) == melody.VOCAB_SIZE and max(pitch_V) == melody.NUM_PITCHES - 1
  row = [specials.BOS] + [melody.encode_event(m, 1) for m in (60, 64, None, 62, 62)] + [
      specials.EOS, specials.PAD]
  none, zero = 2 * 47 + 1, 47
  np.testing.assert_array_equal(encoder.step_ids(pitch_V, jnp.asarray([row]))[0],
                                [none, none, zero + 4, none, zero - 2, zero, none, none])


def test_an_encoder_of_steps_alone_is_transposition_invariant():
  """Token embeddings zeroed, only steps embedded: a transposed tune reads the same."""
  pitch_V = meta_lib.token_feature_tables('melody_steps').steps[0]
  cfg = encoder.EncoderConfig(vocab_size=melody.VOCAB_SIZE, num_layers=1, d_model=16, num_heads=2,
                              mlp_dim=32, anchors=True, token_steps=(pitch_V,))
  net = encoder.Encoder(cfg)
  tune = lambda pitches: _row([melody.encode_event(m, '1/2') for m in pitches], 10)
  rows = np.stack([tune((60, 62, None, 67, 65)), tune((65, 67, None, 72, 70)),
                   tune((60, 63, None, 67, 65))])
  params = nn.meta.unbox(net.init(jax.random.key(0), rows)['params'])
  assert params['step_0']['embedding'].shape == (96, 16)
  params['embed']['embedding'] = jnp.zeros_like(params['embed']['embedding'])
  out = np.asarray(net.apply({'params': params}, rows))
  np.testing.assert_allclose(out[1], out[0], atol=1e-6)  # up a fourth
  assert np.abs(out[2] - out[0]).max() > 1e-3  # one interval changed


def test_fill_token_features_from_the_dataset_with_clear_errors():
  def meta(vocab_size, is_melody):
    return meta_lib.DatasetMeta.from_metadata(meta_lib.metadata_dict(
        name='toy', vocab_size=vocab_size, seq_len=8, attribute_names=('a',),
        attribute_sizes=(3,), is_melody=is_melody, split_sizes={}))
  essen_like, other = meta(melody.VOCAB_SIZE, True), meta(12, False)
  for m, want in ((essen_like, 'melody_steps'), (other, 'none')):
    section = essen_config.get_config('smoke').embedder
    stage.fill_token_features(section, 'embedder', m)
    assert section.token_features == want
  section = essen_config.get_config('smoke').classifier
  section.token_features = 'melody'
  with pytest.raises(config_lib.ConfigError, match=r'token_features=.melody. describes 885 '
                     r'token ids but dataset .toy. has 12'):
    stage.fill_token_features(section, 'classifier', other)
  section.token_features = 'pitches'
  with pytest.raises(config_lib.ConfigError, match=r'classifier.token_features: unknown token '
                     r'feature set .pitches.; known: none, melody, melody_steps'):
    stage.fill_token_features(section, 'classifier', other)
  section.token_features = ''
  with pytest.raises(ValueError, match='resolved from the dataset first'):
    encoder.EncoderConfig.from_section(section, 12)
  old = ml_collections.ConfigDict({k: v for k, v in section.items() if k != 'token_features'})
  old_cfg = encoder.EncoderConfig.from_section(old, 12)  # older checkpoints
  assert old_cfg.token_features == () and old_cfg.token_steps == ()
