"""Tests of the data layer: vocabulary, Essen, import, meta, pipeline."""
# pylint: disable=g-import-not-at-top,wrong-import-position

import os

if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS',
                                                                  ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')

import fractions
import wave

import jax
import numpy as np
import pytest

from diverse_cfg import specials
from diverse_cfg.data import essen
from diverse_cfg.data import imported
from diverse_cfg.data import melody
from diverse_cfg.data import meta
from diverse_cfg.data import pipeline
from diverse_cfg.data import registry

F = fractions.Fraction
# Two small files of the real collection (36 tunes, about 3 s to parse).
SUBSET = dict(files=('test0.abc', 'test1.abc'), num_workers=1)


@pytest.fixture(scope='module')
def essen_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('essen'))


@pytest.fixture(scope='module')
def essen_small(essen_dir):
  return registry.load_dataset('essen_folk', essen_dir, **SUBSET)


def _all_examples(sources):
  return [(split, src[i]) for split, src in sources.items()
          for i in range(len(src))]


# ---------------------------------------------------------------------------
# Melody vocabulary.


def test_every_event_id_round_trips_through_its_event():
  for token in range(specials.NUM_SPECIAL, melody.VOCAB_SIZE):
    assert melody.encode_event(*melody.decode_event(token)) == token
  assert melody.VOCAB_SIZE == (specials.NUM_SPECIAL +
                               melody.NUM_SLOTS * melody.NUM_DURATIONS)


def test_random_token_rows_decode_to_streams():
  rng = np.random.default_rng(0)
  for _ in range(20):
    row = rng.integers(0, melody.VOCAB_SIZE, size=64)
    events = melody.event_ids(row)
    s = melody.tokens_to_stream(row)
    got = list(s.notesAndRests)
    assert len(got) == len(events)
    for n, token in zip(got, events):
      pitch, dur = melody.decode_event(token)
      assert F(n.quarterLength) == dur
      assert (n.isRest if pitch is None else n.pitch.midi == pitch)
    # Only events before the first EOS count; PAD/BOS are skipped.
    eos = np.flatnonzero(row == specials.EOS)
    body = row[:eos[0]] if eos.size else row
    assert len(events) == int(np.sum(body >= specials.NUM_SPECIAL))


def test_is_well_formed():
  rng = np.random.default_rng(1)
  events = rng.integers(specials.NUM_SPECIAL, melody.VOCAB_SIZE, size=10)
  pad = np.zeros(5, np.int64)
  assert melody.is_well_formed(np.concatenate([events, [specials.EOS], pad]))
  assert melody.is_well_formed(events)  # a full row without EOS
  # After EOS anything goes: the decoder stops there.
  assert melody.is_well_formed(np.concatenate([events, [specials.EOS, 7, 1]]))
  assert not melody.is_well_formed(np.concatenate([events, pad]))  # no EOS
  for special in (specials.PAD, specials.BOS):
    bad = events.copy()
    bad[3] = special
    assert not melody.is_well_formed(np.concatenate([bad, [specials.EOS]]))
  assert not melody.is_well_formed([melody.VOCAB_SIZE, specials.EOS])


def _stream(items):
  from music21 import note, stream, tie  # pylint: disable=g-import-not-at-top
  s = stream.Stream()
  for pitch, dur, *tied in items:
    n = note.Rest(quarterLength=dur) if pitch is None else note.Note(
        pitch, quarterLength=dur)
    if tied:
      n.tie = tie.Tie(tied[0])
    s.append(n)
  return s


def test_stream_to_tokens_is_canonical():
  # leading rest, a tie, two rests in a row, a trailing rest
  s = _stream([(None, 1), (60, 1, 'start'), (60, 0.5, 'stop'), (None, 2),
               (None, 0.375), (62, 0.25), (None, 4)])
  expected = [melody.encode_event(60, F(3, 2)),
              melody.encode_event(None, F(2)),
              melody.encode_event(None, F(3, 8)),
              melody.encode_event(62, F(1, 4))]
  np.testing.assert_array_equal(melody.stream_to_tokens(s), expected)


@pytest.mark.parametrize('items,reason', [
    ([(60, 1), (62, F(1, 3))], 'duration'),
    ([(60, 9)], 'duration'),
    ([(60, 1), (None, F(1, 16)), (62, 1)], 'rest_duration'),
    ([(30, 1)], 'pitch_range'),
    ([(None, 1)], 'empty'),
])
def test_stream_to_tokens_rejects_what_it_cannot_represent(items, reason):
  with pytest.raises(melody.UnsupportedMelodyError) as e:
    melody.stream_to_tokens(_stream(items))
  assert e.value.reason == reason


def test_fold_octaves_moves_pitches_into_range():
  tokens = melody.stream_to_tokens(_stream([(30, 1), (110, 1)]),
                                   fold_octaves=True)
  assert [p for p, _ in map(melody.decode_event, tokens)] == [54, 86]


def test_midi_round_trip_is_exact_for_dataset_tokens(essen_small, tmp_path):
  sources, _ = essen_small
  examples = _all_examples(sources)
  assert len(examples) >= 10
  for _, ex in examples[:12]:
    events = ex['tokens'][:ex['length']]
    path = tmp_path / 'x.mid'
    melody.write_midi(ex['tokens'], path, tempo_qpm=96)
    np.testing.assert_array_equal(melody.midi_to_tokens(path), events)


def test_wav_and_piano_roll_are_written(tmp_path):
  row = np.array([melody.encode_event(60, 1),
                  melody.encode_event(None, F(1, 2)),
                  melody.encode_event(67, F(3, 2)), specials.EOS, 0, 0])
  wav_path = tmp_path / 'x.wav'
  melody.write_wav(row, wav_path, sample_rate=8000, tempo_qpm=120)
  with wave.open(str(wav_path)) as w:
    assert w.getnchannels() == 1 and w.getsampwidth() == 2
    assert w.getframerate() == 8000
    pcm = np.frombuffer(w.readframes(w.getnframes()), '<i2')
  # 3 quarter notes at 120 qpm = 1.5 s, plus a 0.25 s tail
  assert abs(len(pcm) / 8000 - 1.75) < 0.01
  assert np.abs(pcm).max() > 20000  # normalised to 0.8 of full scale
  rest = pcm[int(0.55 * 8000):int(0.7 * 8000)]  # inside the rest
  assert np.abs(rest).max() == 0
  png_path = tmp_path / 'x.png'
  melody.piano_roll_png([row, row[:1]], png_path, titles=['a', 'b'])
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  image = plt.imread(str(png_path))
  assert image.shape[0] > 100 and image.shape[1] > 400
  assert image[..., :3].std() > 0.05  # not a blank canvas


# ---------------------------------------------------------------------------
# Essen builder.


def test_attribute_rules():
  for origin in ('Europa, Mitteleuropa, Deutschland', 'Lothringen', 'Luxemburg',
                 'Mitteleuropa, Deutschland / Frankreich, Lothringen',
                 'Europa, Mitteleuropa, Oesterreich, Tirol',
                 'Osteuropa, Tschechoslowakei, Oesterreich - Schlesien',
                 'Mitteleuropa, Deutschland / Polen, Schlesien'):
    assert essen.region_of(origin) == 'german_speaking', origin
  assert essen.region_of('Osteuropa, Ungarn') == 'eastern_europe'
  assert essen.region_of('China, Shaanxi, Zizhou') == 'china'
  assert essen.region_of('Irland') == 'other'
  assert essen.meter_of(' 6/8') == '6/8'
  assert essen.meter_of('2/2]') == 'other'
  assert essen.meter_of('none') == 'other'
  # G major signature (1 sharp): final G major, E minor, D mixolydian.
  assert essen.mode_of(1, 67) == 'major'
  assert essen.mode_of(1, 64) == 'minor'
  assert essen.mode_of(1, 62) == 'mixolydian'
  assert essen.mode_of(-1, 62) == 'minor'  # F signature, final D
  assert essen.mode_of(0, 65) == 'other'  # lydian


def test_parsing_without_beaming_or_tie_copies_gives_the_same_records():
  """The build skips music21's engraving beams and merges ties in place: the same records as
  the plain reader (the whole corpus was compared too: BENCHMARKS.md)."""
  from music21 import stream  # pylint: disable=g-import-not-at-top
  make_beams = stream.Stream.makeBeams
  for name in ('kinder0.abc', 'erk5.abc'):
    fast = essen.parse_file(name, max_tunes=6)
    assert stream.Stream.makeBeams is make_beams  # music21 is left as it was
    real_notes_of = melody._notes_of
    try:  # the plain path: beams made, ties merged in a copy
      melody._notes_of = lambda s, in_place=False: real_notes_of(s, in_place=False)
      plain = essen._parse_tunes(name, max_tunes=6)
    finally:
      melody._notes_of = real_notes_of
    assert len(fast) == len(plain) == 6
    for a, b in zip(fast, plain):
      assert a.keys() == b.keys() and a['skip'] == b['skip']
      assert np.array_equal(a.get('tokens', []), b.get('tokens', [])), a['tune_id']
      assert (a.get('sharps'), a.get('final_midi')) == (b.get('sharps'), b.get('final_midi'))


def test_essen_examples_have_the_documented_layout(essen_small):
  sources, m = essen_small
  assert m.name == 'essen_folk' and m.is_melody
  assert (m.vocab_size, m.seq_len, m.prompt_len) == (melody.VOCAB_SIZE, 128, 3)
  assert m.attribute_names == ('region', 'meter', 'mode')
  assert m.prompt_vocab_size == sum(m.attribute_sizes) == 4 + 5 + 6
  examples = _all_examples(sources)
  for _, ex in examples:
    tokens, n = ex['tokens'], int(ex['length'])
    assert tokens.dtype == np.int32 and tokens.shape == (128,)
    assert ex['prompt'].dtype == np.int32 and ex['prompt'].shape == (3,)
    assert np.all(tokens[:n] >= specials.NUM_SPECIAL)
    assert np.all(tokens[:n] < m.vocab_size)
    assert tokens[n] == specials.EOS
    assert np.all(tokens[n + 1:] == specials.PAD)
    assert melody.is_well_formed(tokens)
    labels = m.attribute_labels(ex['prompt'][None])[0]  # raises if out of range
    assert np.all(labels >= 0)
    assert isinstance(ex['tune_id'], bytes)
  stats = m.metadata['stats']
  assert stats['tunes_seen'] == 36
  assert stats['kept'] == len(examples) == sum(m.split_sizes.values())
  assert stats['kept'] + sum(stats['skipped'].values()) == stats['tunes_seen']
  tune_ids = [ex['tune_id'] for _, ex in examples]
  assert len(set(tune_ids)) == len(tune_ids)


def test_essen_split_is_a_function_of_the_melody(essen_small):
  sources, _ = essen_small
  for split, ex in _all_examples(sources):
    events = ex['tokens'][:ex['length']]
    assert meta.hash_split(essen.melody_split_key(events)) == split
  # Transposed copies share the key (and hence the split).
  events = _all_examples(sources)[0][1]
  events = events['tokens'][:events['length']]
  pitch_dur = [melody.decode_event(t) for t in events]
  up = [melody.encode_event(None if p is None else p + 2, d)
        for p, d in pitch_dur]
  assert essen.melody_split_key(up) == essen.melody_split_key(events)


def test_essen_build_is_cached_and_reproducible(essen_small, essen_dir,
                                                 tmp_path, monkeypatch):
  sources, m = essen_small
  def fail(*a, **k):
    raise AssertionError('parsed again although the build is cached')
  monkeypatch.setattr(essen, 'parse_corpus', fail)
  sources2, m2 = registry.load_dataset('essen_folk', essen_dir, **SUBSET)
  assert m2 == m
  monkeypatch.undo()
  # A fresh build elsewhere writes identical records.
  sources3, _ = registry.load_dataset('essen_folk', str(tmp_path), **SUBSET)
  def contents(src):
    return sorted((e['tune_id'], e['tokens'].tobytes(), e['prompt'].tobytes())
                  for e in (src[i] for i in range(len(src))))
  assert set(sources3) == set(sources)
  for split, src in sources.items():
    assert contents(sources3[split]) == contents(src)
  del sources2


def test_failed_essen_build_leaves_nothing(tmp_path, monkeypatch):
  def fail(*a, **k):
    raise RuntimeError('parse failed')
  monkeypatch.setattr(essen, 'parse_corpus', fail)
  with pytest.raises(RuntimeError, match='parse failed'):
    registry.load_dataset('essen_folk', str(tmp_path), files=('teste.abc',))
  assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# Prompts.


def test_prompt_encode_decode(essen_small):
  _, m = essen_small
  values = {'region': 'china', 'meter': '6/8', 'mode': 'minor'}
  ids = m.encode_prompt(values)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(
      ids, [m.attribute_offsets[0] + essen.REGIONS.index('china'),
            m.attribute_offsets[1] + essen.METERS.index('6/8'),
            m.attribute_offsets[2] + essen.MODES.index('minor')])
  assert m.decode_prompt(ids) == values
  np.testing.assert_array_equal(
      m.attribute_labels(np.stack([ids, ids])),
      [[essen.REGIONS.index('china'), essen.METERS.index('6/8'),
        essen.MODES.index('minor')]] * 2)


def test_unknown_prompt_value_lists_valid_values(essen_small):
  _, m = essen_small
  with pytest.raises(ValueError) as e:
    m.encode_prompt({'region': 'atlantis', 'meter': '3/4', 'mode': 'major'})
  assert 'atlantis' in str(e.value)
  for region in essen.REGIONS:
    assert region in str(e.value)
  with pytest.raises(ValueError, match='missing'):
    m.encode_prompt({'region': 'china'})


# ---------------------------------------------------------------------------
# Import.


def _good_arrays(n=40, t=12, c=2, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 50, size=(n, t))
  lengths = rng.integers(1, t + 1, size=n)
  tokens[np.arange(t)[None, :] >= lengths[:, None]] = -1
  prompts = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n)], 1)[:, :c]
  arrays = dict(tokens=tokens, prompts=prompts, vocab_size=np.int64(50),
                prompt_vocab_size=np.array([4, 3])[:c], pad_id=np.int64(-1))
  return arrays, lengths


def test_import_good_arrays(tmp_path):
  arrays, lengths = _good_arrays()
  npz = tmp_path / 'my_tokens.npz'
  np.savez(npz, **arrays)
  data_dir = str(tmp_path / 'data')
  sources, m = registry.load_dataset('imported', data_dir, npz_path=str(npz))
  assert m.name == 'my_tokens' and not m.is_melody
  assert m.fixed_length == 0  # lengths vary
  assert (m.vocab_size, m.seq_len, m.prompt_len) == (53, 13, 2)
  assert m.prompt_vocab_size == 7 and m.attribute_offsets == (0, 4)
  assert m.attribute_names == ('attr0', 'attr1')
  assert sum(m.split_sizes.values()) == 40
  seen = set()
  for split, ex in _all_examples(sources):
    i = int(ex['row_index'])
    seen.add(i)
    n = lengths[i]
    assert ex['length'] == n
    np.testing.assert_array_equal(ex['tokens'][:n], arrays['tokens'][i, :n] + 3)
    assert ex['tokens'][n] == specials.EOS
    assert np.all(ex['tokens'][n + 1:] == specials.PAD)
    np.testing.assert_array_equal(ex['prompt'], arrays['prompts'][i] + [0, 4])
    assert m.decode_prompt(ex['prompt']) == {
        'attr0': str(arrays['prompts'][i, 0]),
        'attr1': str(arrays['prompts'][i, 1])}
    assert split == meta.hash_split(
        arrays['tokens'][i, :n].astype(np.int64).tobytes() +
        arrays['prompts'][i].astype(np.int64).tobytes())
  assert seen == set(range(40))
  # Reloaded by name, readable exactly like essen_folk.
  sources2, m2 = registry.load_dataset('my_tokens', data_dir)
  assert m2 == m and {k: len(v) for k, v in sources2.items()} == {
      k: len(v) for k, v in sources.items()}
  with pytest.raises(ValueError, match='my_tokens'):
    registry.load_dataset('nonexistent', data_dir)


def test_import_full_rows_shared_prompt_vocab_and_given_split(tmp_path):
  tokens = np.arange(24).reshape(4, 6) % 5
  prompts = np.array([[9, 0], [1, 2], [3, 3], [0, 9]])
  npz = tmp_path / 'x.npz'
  np.savez(npz, tokens=tokens, prompts=prompts)
  path = imported.import_npz(str(npz), 'shared', str(tmp_path / 'd'),
                             vocab_size=5, prompt_vocab_size=10,
                             split=np.array(['train', 'test', 'train', 'test']))
  sources, m = registry.load_dataset('shared', str(tmp_path / 'd'))
  assert path.endswith('imported_arrays/shared/1.0.0')
  assert m.attribute_offsets == (0, 0) and m.prompt_vocab_size == 10
  assert m.split_sizes == {'train': 2, 'validation': 0, 'test': 2}
  assert m.fixed_length == 6  # every row holds 6 events: recorded as fixed-length
  for _, ex in _all_examples(sources):
    i = int(ex['row_index'])
    np.testing.assert_array_equal(ex['tokens'], list(tokens[i] + 3) + [2])
    np.testing.assert_array_equal(ex['prompt'], prompts[i])


def test_fixed_length_is_detected_overridden_and_checked():
  tokens = np.arange(30).reshape(5, 6) % 7
  prompts = np.zeros((5, 1), np.int64)
  prep = lambda **kw: imported.prepare_arrays(tokens, prompts, 7, 2, **kw)
  assert prep().fixed_length == 6
  assert prep(fixed_length=False).fixed_length == 0
  assert prep(fixed_length=True).fixed_length == 6
  lengths = np.array([6, 6, 6, 4, 6])
  assert prep(lengths=lengths).fixed_length == 0
  with pytest.raises(ValueError, match='fixed_length=True but row 3 has 4 events while row 0 has 6'):
    prep(lengths=lengths, fixed_length=True)
  with pytest.raises(ValueError, match='fixed_length must be a boolean scalar'):
    prep(fixed_length=np.array([1, 1]))


def test_a_cached_import_refuses_a_fixed_length_option_it_was_not_built_with(tmp_path):
  npz = tmp_path / 'rows.npz'
  np.savez(npz, tokens=np.arange(30).reshape(5, 6) % 7, prompts=np.zeros((5, 1), np.int64),
           vocab_size=7, prompt_vocab_size=2)
  data_dir = str(tmp_path / 'data')
  _, m = registry.load_dataset('imported', data_dir, npz_path=str(npz))
  assert m.fixed_length == 6
  _, m = registry.load_dataset('imported', data_dir, npz_path=str(npz), fixed_length=True)
  assert m.fixed_length == 6
  with pytest.raises(ValueError, match='fixed_length=False but dataset .rows. in .* was imported '
                                       'with fixed_length=True'):
    registry.load_dataset('imported', data_dir, npz_path=str(npz), fixed_length=False)
  _, m = registry.load_dataset('imported', data_dir, npz_path=str(npz), fixed_length=False,
                           dataset_name='rows_free')
  assert m.fixed_length == 0


def _bad(kind):
  arrays, _ = _good_arrays(n=6)
  if kind == 'ndim':
    arrays['tokens'] = arrays['tokens'][0]
  elif kind == 'float':
    arrays['tokens'] = arrays['tokens'].astype(np.float32)
  elif kind == 'negative':
    arrays['tokens'][2, 0] = -5
  elif kind == 'too_big':
    arrays['tokens'][3, 0] = 50
  elif kind == 'n_mismatch':
    arrays['prompts'] = arrays['prompts'][:5]
  elif kind == 'prompt_too_big':
    arrays['prompts'][4, 1] = 3
  elif kind == 'after_pad':
    arrays['tokens'][1, :] = 7
    arrays['tokens'][1, 2] = -1
  elif kind == 'missing':
    del arrays['vocab_size']
  return arrays


@pytest.mark.parametrize('kind,message', [
    ('ndim', r'tokens must be 2-D \[N, T\], got shape \(12,\)'),
    ('float', 'tokens must have an integer dtype, got float32'),
    ('negative', r'tokens has negative id -5 at index \(2, 0\)'),
    ('too_big', r'tokens has id 50 >= its vocabulary size 50 at index '
                r'\(3, 0\)'),
    ('n_mismatch', 'N mismatch: tokens has 6 rows but prompts has 5'),
    ('prompt_too_big', r'prompts has id 3 >= its vocabulary size 3 at index '
                       r'\(4, 1\)'),
    ('after_pad', r'tokens has id 7 at index \(1, 3\) after the first '
                  'pad_id=-1 at column 2'),
    ('missing', "lacks array 'vocab_size'"),
])
def test_import_rejects_bad_arrays_and_writes_nothing(tmp_path, kind, message):
  npz = tmp_path / 'bad.npz'
  np.savez(npz, **_bad(kind))
  data_dir = tmp_path / 'data'
  with pytest.raises(ValueError, match=message):
    imported.import_npz(str(npz), 'bad', str(data_dir))
  assert not data_dir.exists()
  existing = tmp_path / 'existing'
  existing.mkdir()
  with pytest.raises(ValueError, match=message):
    registry.load_dataset('imported', str(existing), npz_path=str(npz))
  assert not list(existing.iterdir())


def test_import_failure_during_build_leaves_nothing(tmp_path, monkeypatch):
  arrays, _ = _good_arrays()
  npz = tmp_path / 'ok.npz'
  np.savez(npz, **arrays)
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  def explode(self, examples, rows):
    yield from ()
    raise RuntimeError('disk full')
  monkeypatch.setattr(imported.ImportedArrays, '_generate_examples', explode)
  with pytest.raises(RuntimeError, match='disk full'):
    imported.import_npz(str(npz), 'ok', str(data_dir))
  assert not list(data_dir.iterdir())


# ---------------------------------------------------------------------------
# Pipeline.


@pytest.fixture(scope='module')
def small_source(tmp_path_factory):
  d = tmp_path_factory.mktemp('pipe')
  arrays, _ = _good_arrays(n=80)
  np.savez(d / 'pipe.npz', **arrays)
  sources, m = registry.load_dataset('imported', str(d / 'data'),
                                 npz_path=str(d / 'pipe.npz'),
                                 split=np.zeros(80, np.int64))
  return sources['train'], m


def _mesh(n=4):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ('data',))


def _host(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def test_train_iterator_yields_sharded_global_batches(small_source):
  source, m = small_source
  sharding = pipeline.batch_sharding(_mesh(4))
  it = pipeline.make_train_iterator(source, 8, seed=3, sharding=sharding)
  batch = next(it)
  assert set(batch) == {'length', 'prompt', 'row_index', 'tokens'}
  assert batch['tokens'].shape == (8, m.seq_len)
  assert batch['prompt'].shape == (8, m.prompt_len)
  assert batch['tokens'].dtype == np.int32
  assert batch['tokens'].sharding == sharding
  assert len(batch['tokens'].addressable_shards) == 4
  assert batch['tokens'].addressable_shards[0].data.shape == (2, m.seq_len)


def test_train_iterator_resumes_exactly_from_saved_state(small_source,
                                                       tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  source, _ = small_source
  sharding = pipeline.batch_sharding(_mesh(2))
  it = pipeline.make_train_iterator(source, 8, seed=7, sharding=sharding)
  for _ in range(3):
    next(it)
  # Saved the way a training loop saves it beside the model (grain's Orbax
  # handler writes one JSON state per process).
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  # 15 more batches cross the 10-batch epoch boundary of 80 examples.
  expected = [_host(next(it)) for _ in range(15)]
  resumed = pipeline.make_train_iterator(source, 8, seed=7, sharding=sharding)
  next(resumed)  # a different position, overwritten by the restore
  handler.restore(epath.Path(tmp_path),
                  args=grain.checkpoint.CheckpointRestore(resumed))
  for want in expected:
    got = _host(next(resumed))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # In-memory state works the same way.
  again = pipeline.make_train_iterator(source, 8, seed=7, sharding=sharding)
  again.set_state(resumed.get_state())
  np.testing.assert_array_equal(np.asarray(next(again)['tokens']),
                                np.asarray(next(resumed)['tokens']))
  first_7 = next(pipeline.make_train_iterator(source, 8, seed=7,
                                              sharding=sharding))
  first_8 = next(pipeline.make_train_iterator(source, 8, seed=8,
                                              sharding=sharding))
  assert not np.array_equal(np.asarray(first_7['row_index']),
                            np.asarray(first_8['row_index']))


def test_train_epochs_cover_the_split_and_reshuffle(small_source):
  source, _ = small_source
  ds = pipeline.make_train_dataset(source, 8, seed=0, num_epochs=2,
                                   process_index=0, process_count=1)
  rows = [b['row_index'] for b in ds]
  assert len(rows) == 20
  epoch1, epoch2 = np.concatenate(rows[:10]), np.concatenate(rows[10:])
  assert sorted(epoch1) == sorted(epoch2) == list(range(80))
  assert not np.array_equal(epoch1, epoch2)


def test_processes_split_each_global_batch(small_source):
  source, _ = small_source
  one = pipeline.make_train_dataset(source, 8, seed=5, process_index=0,
                                    process_count=1)
  halves = [pipeline.make_train_dataset(source, 8, seed=5, process_index=p,
                                        process_count=2) for p in range(2)]
  for b in range(12):
    union = np.concatenate([h[b]['row_index'] for h in halves])
    assert len(halves[0][b]['row_index']) == 4
    assert sorted(union) == sorted(one[b]['row_index'])


def test_eval_batches_cover_each_example_once(small_source):
  source, _ = small_source
  batches = list(pipeline.make_eval_batches(source, 24))
  assert len(batches) == 4  # 80 = 24 + 24 + 24 + 8
  assert all(b['tokens'].shape[0] == 24 for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  rows = np.concatenate([b['row_index'] for b in batches])
  assert mask.sum() == 80 and not mask[80:].any()
  # Source order, each example once.
  np.testing.assert_array_equal(
      rows[mask], [int(source[i]['row_index']) for i in range(80)])
  assert sorted(rows[mask]) == list(range(80))
  sharded = list(pipeline.make_eval_batches(
      source, 24, sharding=pipeline.batch_sharding(_mesh(4))))
  for a, b in zip(batches, sharded):
    for k in a:
      np.testing.assert_array_equal(a[k], np.asarray(b[k]))
