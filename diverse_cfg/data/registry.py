"""Loading a dataset by name: the Essen builder, an npz import, or one imported earlier.

    sources, meta = registry.load_dataset('essen_folk', data_dir, seq_len=128)
    sources, meta = registry.load_dataset('imported', data_dir, npz_path='my.npz')

The schema every dataset shares (what tokens and prompts mean) is meta.py.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from diverse_cfg.data import essen
from diverse_cfg.data import imported
from diverse_cfg.data import meta


def _check_fixed_length(builder, wanted: bool | None) -> None:
  """A dataset is imported once: a fixed_length option that disagrees with it is an error."""
  recorded = bool(meta.DatasetMeta.from_builder(builder).fixed_length)
  if wanted is not None and recorded != bool(wanted):
    raise ValueError(
        f'fixed_length={wanted} but dataset {builder.info.metadata["name"]!r} in '
        f'{builder.data_dir} was imported with fixed_length={recorded}; to change it, import it again under '
        "another name (the npz's file name gives it) or remove that directory")


def default_data_dir() -> str:
  return os.environ.get('DIVERSE_CFG_DATA_DIR',
                        os.path.expanduser('~/tensorflow_datasets'))


def load_dataset(name: str, data_dir: str | None = None, **options):
  """(dict split -> random-access data source, DatasetMeta); builds if needed.

  name:
    'essen_folk'  options: seq_len, files, max_files, max_tunes, num_workers
                  (essen.make_builder); the first call parses, later ones read.
    'imported'    options: npz_path (required), dataset_name (default: the npz
                  file's stem) and import_npz's keywords; imports only when
                  that dataset is not in data_dir yet.
    other         the name of a dataset imported earlier into data_dir.
  Splits that came out empty (tiny subsets) are absent from the dict.
  """
  data_dir = data_dir or default_data_dir()
  if name == essen.DATASET_NAME:
    builder = essen.make_builder(data_dir, **options)
    essen.prepare(builder)
  elif name == 'imported':
    options = dict(options)
    if 'npz_path' not in options:
      raise ValueError("load_dataset('imported', ...) needs npz_path=")
    npz_path = options.pop('npz_path')
    dataset_name = options.pop('dataset_name', None) or imported.name_from_path(
        npz_path)
    if not os.path.isdir(imported.dataset_dir(data_dir, dataset_name)):
      imported.import_npz(npz_path, dataset_name, data_dir, **options)
    builder = tfds.builder_from_directory(
        imported.dataset_dir(data_dir, dataset_name))
    _check_fixed_length(builder, options.get('fixed_length'))
  else:
    if options:
      raise ValueError(f'options {sorted(options)} only apply to essen_folk or '
                       f'imported, not to the imported dataset {name!r}')
    path = imported.dataset_dir(data_dir, name)
    if not os.path.isdir(path):
      raise ValueError(
          f'no dataset {name!r} in {data_dir}: use "essen_folk", "imported" '
          f'with npz_path=, or one of the imported datasets '
          f'{imported.list_imported(data_dir)}')
    builder = tfds.builder_from_directory(path)
  return dict(builder.as_data_source()), meta.DatasetMeta.from_builder(builder)
