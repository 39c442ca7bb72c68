"""The sample renderers behind the report's gallery."""

import os
import types

import numpy as np
import pytest

from diverse_cfg import report
from diverse_cfg import specials


def _meta(is_melody):  # the fields a renderer reads from a DatasetMeta
  return types.SimpleNamespace(name='toy', vocab_size=12, is_melody=is_melody)


def test_token_rows_picture_for_any_dataset(tmp_path):
  e = specials.EOS
  tokens = np.asarray([[3, 4, 5, e, 0, 0, 0, 0], [6, 7, e, 0, 0, 0, 0, 0]], np.int32)
  files = report.token_files(tokens, _meta(False), str(tmp_path / 'x'))
  assert files == {'png': str(tmp_path / 'x.png')} and os.path.getsize(files['png']) > 0


def test_resolve_picks_by_dataset_and_loads_a_users_function():
  assert report.resolve_renderer('auto', _meta(False)) is report.token_files
  assert report.resolve_renderer('auto', _meta(True)) is report.melody_files
  assert report.resolve_renderer('diverse_cfg.report:token_files', _meta(True)) is (
      report.token_files)
  with pytest.raises(ValueError, match='not a melody dataset'):
    report.resolve_renderer('melody', _meta(False))
  with pytest.raises(ValueError, match='cannot be loaded'):
    report.resolve_renderer('no_such_module:render', _meta(False))
  with pytest.raises(ValueError, match="pkg.module:function"):
    report.resolve_renderer('pictures', _meta(False))
