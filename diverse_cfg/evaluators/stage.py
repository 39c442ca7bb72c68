"""What the two evaluator stages share: split arrays, restoring, held-out reports.

An evaluator's checkpoint holds the full config it was trained with, so a
loader needs nothing but the evaluator's run directory: the network is rebuilt
from the config and its params restored onto whatever mesh the caller has.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from diverse_cfg import checkpoints
from diverse_cfg import config_lib
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import training
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import meta as meta_lib
from diverse_cfg.data import pipeline

log = logging.getLogger('diverse_cfg')


def split_arrays(source, keys: Sequence[str], max_rows: int = 0) -> dict[str, np.ndarray]:
  """A split (or its first max_rows rows; 0 = all) as numpy arrays, in source order."""
  n = len(source) if not max_rows else min(max_rows, len(source))
  out = {k: [] for k in keys}
  batches = pipeline.make_eval_batches(source, 256, keys=keys)
  for batch in itertools.islice(batches, -(-n // 256)):  # reads no further than row n
    for k in keys:
      out[k].append(batch[k][batch['mask']])
  return {k: np.concatenate(v)[:n] for k, v in out.items()}


def heldout_split(sources: dict[str, Any]) -> str:
  """'test' when the build has one; tiny subsets may only have validation/train."""
  for split in ('test', 'validation', 'train'):
    if split in sources and len(sources[split]):
      if split != 'test':
        log.warning('no test split in this dataset: held-out figures use %r', split)
      return split
  raise ValueError('the dataset has no examples in any split')


def fill_token_features(section: ml_collections.ConfigDict, field: str, meta) -> None:
  """section.token_features '' -> the dataset's feature set; a named one must fit its tokens."""
  name = section.token_features or meta.token_features
  try:
    tables = meta_lib.token_feature_tables(name)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.{field}.token_features: {e}') from None
  sizes = {len(t) for t in tables.values + tables.steps}
  if sizes and sizes != {meta.vocab_size}:
    raise config_lib.ConfigError(
        f'config.{field}.token_features={name!r} describes {max(sizes)} token ids but '
        f'dataset {meta.name!r} has {meta.vocab_size}; use \'\' (the dataset\'s own) or \'none\'')
  section.token_features = name


def validation_rows(section: ml_collections.ConfigDict) -> int:
  return section.eval_batches * section.batch_size


def flatten(tree: dict, prefix: str = '') -> dict[str, float]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}/'))
    elif isinstance(v, (int, float, np.number)):
      out[f'{prefix}{k}'] = float(v)
  return out


def write_heldout(run_dir: str, step: int, figures: dict) -> None:
  """heldout.json in the evaluator's run directory, and the same numbers as test/* metrics."""
  if jax.process_index() != 0:
    return
  with open(workdir_lib.heldout_file(run_dir), 'w') as f:
    json.dump({'step': step, **figures}, f, indent=2)
  writer = training.MetricsWriter(run_dir)
  writer.write(step, flatten(figures, 'test/'))
  writer.close()


def default_mesh(mesh, rules, config: ml_collections.ConfigDict):
  """The caller's mesh, or this process's first device with the trained config's rules."""
  if rules is None:
    rules = sharding_lib.rules_of(config.mesh)
  if mesh is None:
    one = ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1})
    # This process's own first device: with several processes, jax.devices()[0]
    # belongs to process 0 and the others could not read the params.
    mesh = sharding_lib.make_mesh(one, jax.local_devices()[:1])
  return mesh, rules


def restore(run_dir: str, init_for: Callable[[ml_collections.ConfigDict], Callable], mesh=None,
            rules=None) -> tuple[ml_collections.ConfigDict, Any]:
  """(trained config, params on `mesh`) from the latest checkpoint of a run directory.

  init_for(config) returns the key -> boxed params function of the network
  the config describes; its logical names give the params' shardings.
  """
  ckpt_dir = workdir_lib.checkpoints(run_dir)
  config = checkpoints.read_config(ckpt_dir)
  mesh, rules = default_mesh(mesh, rules, config)
  abstract = sharding_lib.abstract_sharded(init_for(config), mesh, rules, jax.random.key(0))
  return config, checkpoints.restore_params(ckpt_dir, abstract)
