"""Grain input pipelines that yield global, sharded jax.Arrays.

Training: one global example stream (shuffle per epoch, then repeat), cut into
global batches of G consecutive positions. Of global batch b, process p reads
the block [b * G + p * L, b * G + (p + 1) * L) (P = process count, L = G / P)
and turns it into its rows of the global array with
make_array_from_process_local_data. A global batch is therefore the same rows
in the same order however many processes read it, so a run on P hosts sees
exactly the data of a run on one (row-dependent randomness such as prompt
dropout included).

The iterator is a grain DatasetIterator, so its position is a small JSON state
(get_state / set_state) and grain.checkpoint.CheckpointSave/Restore (Orbax) can
store it beside the model; restoring replays exactly the batches that follow.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np


def batch_sharding(mesh: jax.sharding.Mesh,
                   data_axes: str | Sequence[str] = ('data',)):
  """NamedSharding that splits dim 0 over data_axes and replicates the rest."""
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


def numeric_keys(source) -> tuple[str, ...]:
  """Feature names that can become jax.Arrays (drops text such as tune_id)."""
  example = source[0]
  return tuple(sorted(k for k, v in example.items()
                      if np.asarray(v).dtype.kind in 'biuf'))


class _SelectKeys(grain.transforms.Map):

  def __init__(self, keys: Sequence[str]):
    self._keys = tuple(keys)

  def map(self, element):
    return {k: np.asarray(element[k]) for k in self._keys}


class GlobalBatchIterator(grain.DatasetIterator):
  """Local numpy batches from grain -> dicts of global jax.Arrays."""

  def __init__(self, parent: grain.DatasetIterator, sharding,
               global_batch_size: int):
    super().__init__(parent)
    self._sharding = sharding
    self._global_batch_size = global_batch_size

  def __next__(self) -> dict[str, jax.Array]:
    local = next(self._parent)
    return {k: jax.make_array_from_process_local_data(
        self._sharding, v, (self._global_batch_size,) + v.shape[1:])
            for k, v in local.items()}

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def make_train_dataset(source, global_batch_size: int, seed: int, *,
                       shuffle: bool = True, num_epochs: int | None = None,
                       keys: Sequence[str] | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.MapDataset:
  """This process's MapDataset of local numpy batches (see module docstring)."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible '
                     f'by the process count {process_count}')
  local_batch_size = global_batch_size // process_count
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)  # before repeat: a fresh order every epoch
  ds = ds.repeat(num_epochs)
  if num_epochs is not None:
    # Whole global batches only, so every process yields the same count.
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
  ds = ds.map(_SelectKeys(keys or numeric_keys(source)))
  # Blocks of L consecutive positions; block j belongs to process j mod P. Lazy:
  # a process reads only its own blocks.
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds[process_index::process_count]


def make_train_iterator(source, global_batch_size: int, seed: int, sharding, *,
                        shuffle: bool = True, num_epochs: int | None = None,
                        keys: Sequence[str] | None = None,
                        read_threads: int = 4,
                        prefetch: int = 64) -> GlobalBatchIterator:
  """Endless (num_epochs=None) iterator of {key: global jax.Array [G, ...]}.

  sharding: a jax.sharding.Sharding for the batch (e.g. batch_sharding(mesh)),
  applied to every feature; only dim 0 may be partitioned.
  """
  ds = make_train_dataset(source, global_batch_size, seed, shuffle=shuffle,
                          num_epochs=num_epochs, keys=keys)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=prefetch)).__iter__()
  return GlobalBatchIterator(it, sharding, global_batch_size)


def make_eval_batches(source, batch_size: int, *, sharding=None,
                      keys: Sequence[str] | None = None
                      ) -> Iterator[dict[str, Any]]:
  """Each example exactly once, in source order, in batches of batch_size.

  The last batch is filled by repeating its final example; `mask` (bool [B])
  is False on the filler rows, so masked sums over batches are exact.
  Without sharding: numpy dicts. With sharding: global jax.Arrays, each
  process reading only its contiguous block of rows of every batch.
  """
  keys = tuple(keys or numeric_keys(source))
  n = len(source)
  process_index, process_count = jax.process_index(), jax.process_count()
  if sharding is not None and batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by the process '
                     f'count {process_count}')
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size)
    mask = rows < n
    rows = np.minimum(rows, n - 1)
    if sharding is not None:
      local = batch_size // process_count
      sl = slice(process_index * local, (process_index + 1) * local)
      rows, mask_local = rows[sl], mask[sl]
    else:
      mask_local = mask
    examples = [source[int(i)] for i in rows]
    batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in keys}
    batch['mask'] = mask_local
    if sharding is not None:
      batch = {k: jax.make_array_from_process_local_data(
          sharding, v, (batch_size,) + v.shape[1:]) for k, v in batch.items()}
    yield batch
