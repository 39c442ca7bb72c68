"""Checks that an .npz imports, and prints what it holds.

Usage: python -m examples.check_npz PATH.npz [--group-size=4] [--data-dir=DIR]

Runs diverse_cfg.data.imported.import_npz into a throw-away data dir (or
--data-dir), then prints N, T, vocab, per-attribute class counts, split sizes
and the row lengths; with --group-size it also checks that every row's length
is a multiple of it (tokens per event).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile

import numpy as np


def summarise(npz_path: str, group_size: int = 1) -> dict:
  """Validates with prepare_arrays; returns counts (raises ValueError)."""
  from diverse_cfg.data import imported  # pylint: disable=g-import-not-at-top
  arrays = imported.prepare_arrays(**imported.read_npz(npz_path))
  n, t_plus_eos = arrays.tokens_NxT.shape
  lengths = arrays.length_N
  bad = np.flatnonzero(lengths % group_size)
  if bad.size:
    raise ValueError(f'row {bad[0]} has length {lengths[bad[0]]}, not a '
                     f'multiple of the group size {group_size}')
  offsets = np.cumsum([0] + list(arrays.attribute_sizes[:-1]))
  classes = {}
  for c, name in enumerate(arrays.attribute_names):
    offset = 0 if arrays.shared_prompt_vocab else offsets[c]
    values = arrays.prompt_NxC[:, c] - offset
    classes[name] = dict(sorted(collections.Counter(values.tolist()).items()))
  return {
      'N': n, 'T': t_plus_eos - 1,
      'vocab_size': arrays.vocab_size - _num_special(),  # the user's ids
      'attribute_sizes': arrays.attribute_sizes,
      'classes': classes,
      'splits': dict(collections.Counter(arrays.split_N)),
      'split_given': arrays.split_given,
      'lengths': (int(lengths.min()), float(lengths.mean()),
                  int(lengths.max())),
      'fixed_length': bool((lengths == t_plus_eos - 1).all()),
  }


def _num_special() -> int:
  from diverse_cfg import specials  # pylint: disable=g-import-not-at-top
  return specials.NUM_SPECIAL


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('npz')
  parser.add_argument('--group-size', type=int, default=1)
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--name', default=None)
  args = parser.parse_args(argv)
  from diverse_cfg.data import imported  # pylint: disable=g-import-not-at-top
  summary = summarise(args.npz, args.group_size)
  name = args.name or imported.name_from_path(args.npz)
  with tempfile.TemporaryDirectory() as tmp:
    built = imported.import_npz(args.npz, name, args.data_dir or tmp,
                                overwrite=True)
    print(f'imported as {name!r} into {built}')
  for key, value in summary.items():
    print(f'{key}: {value}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
