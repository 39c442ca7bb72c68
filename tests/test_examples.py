"""The example converters (examples/) on small subsets of their real data.

Each data test is skipped, naming the missing package, where the package that
ships the data is not installed (pip install sktime==1.2.0 for
ItalyPowerDemand; music21 comes with the project).
"""

import importlib.util
import os

import numpy as np
import pytest

from diverse_cfg.data import imported
from examples import bach_chorales
from examples import italy_power_demand


def _has_italy_power_demand() -> bool:
  try:
    return os.path.isdir(italy_power_demand.data_dir())
  except FileNotFoundError:
    return False


def _has_bach_corpus() -> bool:
  if importlib.util.find_spec('music21') is None:
    return False
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  return bool(corpus.getComposer('bach'))


needs_sktime = pytest.mark.skipif(
    not _has_italy_power_demand(),
    reason='sktime (which bundles ItalyPowerDemand) is not installed: '
    'pip install sktime==1.2.0')
needs_music21 = pytest.mark.skipif(
    not _has_bach_corpus(),
    reason="music21 with its Bach corpus is not installed")


def _write_and_prepare(main, tmp_path, *args):
  """Runs a converter's CLI; returns (npz contents, prepare_arrays result)."""
  out = str(tmp_path / 'out.npz')
  assert main([f'--out={out}', *args]) == 0
  with np.load(out) as npz:
    saved = {k: npz[k] for k in npz.files}
  return saved, imported.prepare_arrays(**imported.read_npz(out))


# ItalyPowerDemand: fixed length, one token per hour.

def test_quantise_bins_and_clips():
  values = np.asarray([[-5.0, -2.0, -0.01, 0.0, 1.99, 2.0, 7.0]])
  np.testing.assert_array_equal(
      italy_power_demand.quantise(values, levels=4, clip=2.0),
      [[0, 0, 1, 2, 3, 3, 3]])


@needs_sktime
def test_italy_power_demand_fixed_length_and_deterministic(tmp_path):
  args = ('--max-rows-per-file=15',)
  saved, arrays = _write_and_prepare(italy_power_demand.main, tmp_path, *args)
  assert saved['tokens'].shape == (30, italy_power_demand.SERIES_LENGTH)
  assert (arrays.length_N == italy_power_demand.SERIES_LENGTH).all()
  assert saved['tokens'].max() < 16 and arrays.attribute_sizes == (2,)
  assert arrays.attribute_names == ('season',)
  assert not arrays.split_given  # the importer's hash split
  again, _ = _write_and_prepare(italy_power_demand.main, tmp_path, *args)
  for key, value in saved.items():
    np.testing.assert_array_equal(value, again[key], err_msg=key)


@needs_sktime
def test_italy_power_demand_ucr_split_and_levels(tmp_path):
  saved, arrays = _write_and_prepare(
      italy_power_demand.main, tmp_path, '--max-rows-per-file=10',
      '--split=ucr', '--levels=32')
  assert saved['tokens'].max() < 32 and arrays.vocab_size > 32
  assert arrays.split_N == ('train',) * 10 + ('validation', 'test') * 5


# Bach chorales: 4 tokens (S, A, T, B) per eighth-note step.

def test_window_bounds_pickup_and_short_tail():
  # 2-step pickup, windows of 8; a 3-step tail is merged, a 5-step one kept.
  assert bach_chorales.window_bounds(21, 2, 8, 4) == [(0, 10), (10, 21)]
  assert bach_chorales.window_bounds(23, 2, 8, 4) == [(0, 10), (10, 18),
                                                       (18, 23)]
  assert bach_chorales.window_bounds(5, 0, 8, 4) == [(0, 5)]


def test_grid_marks_holds_rests_and_drops_short_notes():
  # A half note, a sixteenth between grid points, a rest, then two equal
  # pitches struck separately (not a hold).
  notes = [(0.0, 2.0, 60), (2.25, 2.5, 62), (3.0, 3.5, 64), (3.5, 4.0, 64)]
  pitch, note_id, dropped = bach_chorales.voice_grid(notes, 8)
  assert dropped == 1
  tokens = bach_chorales.grid_tokens(pitch, note_id)
  c4 = 60 - bach_chorales.PITCH_MIN + bach_chorales.NUM_CONTROL
  hold, rest = bach_chorales.HOLD, bach_chorales.REST
  np.testing.assert_array_equal(
      tokens, [c4, hold, hold, hold, rest, rest, c4 + 4, c4 + 4])


@needs_music21
def test_bach_chorales_groups_prompts_split_and_determinism(tmp_path):
  saved, arrays = _write_and_prepare(bach_chorales.main, tmp_path,
                                     '--max-files=2', '--window=16')
  group = bach_chorales.GROUP_SIZE
  lengths = arrays.length_N
  assert (lengths % group == 0).all() and (lengths >= 8 * group).all()
  assert saved['tokens'].shape[1] == lengths.max()
  assert int(saved['group_size']) == group
  assert arrays.attribute_names == ('mode', 'meter', 'position')
  assert arrays.split_given
  tokens, ids = saved['tokens'], saved['chorale_id']
  # Every row spells out its first step: no HOLD before a pitch in a row.
  assert (tokens[:, :group] != bach_chorales.HOLD).all()
  for chorale in set(ids.tolist()):
    rows = ids == chorale
    assert len(set(saved['split'][rows].tolist())) == 1  # never straddles
    positions = saved['prompts'][rows, 2].tolist()
    assert positions[0] == 0 and positions[-1] == 2  # start ... end
  again, _ = _write_and_prepare(bach_chorales.main, tmp_path,
                                '--max-files=2', '--window=16')
  for key, value in saved.items():
    np.testing.assert_array_equal(value, again[key], err_msg=key)
