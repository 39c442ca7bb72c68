"""What every stage does first: validate the config, load the data, build the mesh.

Model sizes left at FROM_DATA (-1) are filled from the dataset's metadata;
sizes set explicitly must agree with it. Everything is checked before any
training work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections

from diverse_cfg import config_lib
from diverse_cfg import model as model_lib
from diverse_cfg import packing as packing_lib
from diverse_cfg import sampling
from diverse_cfg import sharding as sharding_lib
from diverse_cfg.data import registry


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  meta: Any  # data.meta.DatasetMeta
  sources: dict[str, Any]  # split -> random-access data source
  mesh: jax.sharding.Mesh
  rules: Any
  model_cfg: model_lib.ModelConfig

  @property
  def length_bounds(self) -> sampling.LengthBounds:
    """Where every sampler of this experiment lets rows end (the data's fixed length, if any)."""
    return sampling.data_length_bounds(self.meta.fixed_length)

  def packing(self, batch: int, section) -> packing_lib.Layout | None:
    """How a training batch of `batch` rows packs on this mesh (packing.configured: a config
    section's packed_rows, packed_shapes, packed_spacing), or None."""
    return packing_lib.configured(section, batch, sharding_lib.batch_shards(self.mesh),
                                  *packing_lib.row_slots(self.model_cfg, self.length_bounds))


_SIZE_FIELDS = {'vocab_size': 'vocab_size', 'prompt_vocab_size': 'prompt_vocab_size',
                'prompt_len': 'prompt_len', 'seq_len': 'seq_len'}


def fill_model_sizes(config: ml_collections.ConfigDict, meta, checkpoint: str | None = None) -> None:
  """Sets the model's data-given sizes; a size that disagrees with the data raises.

  With `checkpoint`, `config` is that checkpoint's and the error says so: its sizes are fixed, so
  the data must be the data it was trained on.
  """
  for field, attr in _SIZE_FIELDS.items():
    have, want = config.model[field], getattr(meta, attr)
    if have == config_lib.FROM_DATA:
      config.model[field] = int(want)
    elif have != want and checkpoint is None:
      raise config_lib.ConfigError(
          f'config.model.{field}={have} but dataset {meta.name!r} has {attr}={want}; '
          f'leave it at {config_lib.FROM_DATA} to take it from the data')
    elif have != want:
      raise config_lib.ConfigError(
          f'{checkpoint} was trained with model.{field}={have}, but dataset {meta.name!r} in '
          f'{config.data.data_dir or registry.default_data_dir()} now has {attr}={want}. Sample it '
          'against the data it was trained on (--data_dir); an essen_folk build older than this '
          'library (e.g. 1.0.0, which had 7 regions) needs the library version that built it')


def load_data(config: ml_collections.ConfigDict):
  d = config.data
  if d.name == 'essen_folk':
    options = {'seq_len': d.seq_len, 'max_files': d.max_files or None,
               'max_tunes': d.max_tunes or None}
  elif d.name == 'imported':
    if not d.npz_path:
      raise config_lib.ConfigError("config.data.npz_path='': needed when config.data.name='imported'")
    options = {'npz_path': d.npz_path,
               'fixed_length': config_lib.FIXED_LENGTH_OPTIONS[d.get('fixed_length', 'auto')]}
  else:
    options = {}
  if jax.process_count() == 1:
    return registry.load_dataset(d.name, d.data_dir or None, **options)
  # Several processes: process 0 builds or imports the dataset first and the
  # others open it after the barrier, so that no two write one directory at once.
  # (With a data_dir local to each host, the others build their own copy then.)
  if jax.process_index() == 0:
    out = registry.load_dataset(d.name, d.data_dir or None, **options)
  multihost_utils.sync_global_devices('diverse_cfg.load_data')
  if jax.process_index() != 0:
    out = registry.load_dataset(d.name, d.data_dir or None, **options)
  return out


def prepare(config: ml_collections.ConfigDict,
            devices: Sequence[jax.Device] | None = None) -> Experiment:
  config = config.copy_and_resolve_references()
  devices = list(jax.devices() if devices is None else devices)
  config_lib.validate(config, sizes_known=False)
  sources, meta = load_data(config)
  with config.unlocked():
    fill_model_sizes(config, meta)
  config_lib.validate(config, num_devices=len(devices))
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  return Experiment(config=config, meta=meta, sources=sources, mesh=mesh,
                    rules=sharding_lib.rules_of(config.mesh),
                    model_cfg=model_lib.ModelConfig.from_config(config.model))
