"""ItalyPowerDemand (UCR) -> a fixed-length .npz for diverse_cfg's importer.

Source: the UCR/UEA time-series archive's ItalyPowerDemand, as bundled inside
the sktime wheel (pip install sktime==1.2.0; BSD 3-Clause for the package; the
archive asks users to cite it, no other licence is stated in the files):
  sktime/datasets/data/ItalyPowerDemand/ItalyPowerDemand_{TRAIN,TEST}.ts
Nothing is downloaded. The files are read as text here (the .ts format is
'@' headers, then one `v1,...,v24:label` line per series), and the package
directory is found without importing sktime, so only the data files matter.

Data: 1096 days (67 in UCR's TRAIN file, 1029 in TEST) of Italian electrical
power demand, 24 hourly values per day, each series z-normalised by UCR. The
class says whether the day falls in October-March (label 1, 'winter') or
April-September (label 2, 'summer').

Tokenisation: one token per hour, so every row has exactly T = 24 events (no
padding). A value x becomes floor((x + clip) / (2 clip) * levels), clipped to
[0, levels): `levels` equal-width bins over [-clip, clip] (defaults 16 and
2.0; 0.7% of values lie beyond +-2 and fall in the end bins). The bins are
fixed, not fitted, so a subset is tokenised exactly as the full set.

Prompt: one attribute, `season` (0 = winter, Oct-Mar, 547 rows; 1 = summer,
Apr-Sep, 549 rows).

Split: none is written by default, so the importer's hash split of each row's
events and prompt applies (about 90/5/5; identical rows share a split). UCR's
own split (67 train rows) is far too small to pretrain on; `--split=ucr` keeps
it anyway, putting UCR TRAIN in train and alternating UCR TEST rows between
validation and test. UCR's split is also stored as `ucr_split` (0 TRAIN,
1 TEST), which the importer ignores.

Caveat: the days carry no date, and neighbouring days look alike, so a random
split puts near-twins of test days in train; the two classes overlap in spring
and autumn.

Usage:
  python -m examples.italy_power_demand --out=/work/datasets/italy_power_demand.npz
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import time

import numpy as np

PACKAGE = 'sktime'
DATA_SUBDIR = os.path.join('datasets', 'data', 'ItalyPowerDemand')
FILES = (('TRAIN', 'ItalyPowerDemand_TRAIN.ts'),
         ('TEST', 'ItalyPowerDemand_TEST.ts'))
SERIES_LENGTH = 24
LABELS = {'1': 0, '2': 1}  # UCR label -> season id
SEASONS = ('winter', 'summer')


def data_dir() -> str:
  """The bundled data folder, found without importing the package.

  find_spec on a top-level name locates it without running its __init__, so
  this works even when sktime's heavier dependencies are missing.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'{PACKAGE} is not installed; pip install {PACKAGE}==1.2.0')
  path = os.path.join(list(spec.submodule_search_locations)[0], DATA_SUBDIR)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path} missing: this {PACKAGE} does not bundle '
                            'ItalyPowerDemand')
  return path


def read_ts(path: str) -> tuple[np.ndarray, list[str]]:
  """Values [n, 24] float64 and labels of a univariate equal-length .ts file."""
  values, labels = [], []
  in_data = False
  with open(path, encoding='utf-8') as f:
    for line_no, raw in enumerate(f, 1):
      line = raw.strip()
      if not line or line.startswith('#'):
        continue
      if line.lower().startswith('@data'):
        in_data = True
        continue
      if line.startswith('@') or not in_data:
        continue
      series, label = line.rsplit(':', 1)
      row = [float(v) for v in series.split(',')]
      if len(row) != SERIES_LENGTH:
        raise ValueError(f'{path}:{line_no}: {len(row)} values, expected '
                         f'{SERIES_LENGTH}')
      values.append(row)
      labels.append(label)
  return np.asarray(values, np.float64), labels


def quantise(values: np.ndarray, levels: int, clip: float) -> np.ndarray:
  """Equal-width bins over [-clip, clip]; outliers go to the end bins."""
  scaled = (values + clip) / (2 * clip) * levels
  return np.clip(np.floor(scaled), 0, levels - 1).astype(np.int32)


def load_rows(max_rows_per_file: int | None = None):
  """(values [N, 24], season [N], ucr_split [N]) in file order: TRAIN, TEST."""
  values, seasons, ucr = [], [], []
  for code, (_, name) in enumerate(FILES):
    v, labels = read_ts(os.path.join(data_dir(), name))
    if max_rows_per_file is not None:
      v, labels = v[:max_rows_per_file], labels[:max_rows_per_file]
    values.append(v)
    seasons += [LABELS[l] for l in labels]
    ucr += [code] * len(labels)
  return (np.concatenate(values), np.asarray(seasons, np.int32),
          np.asarray(ucr, np.int32))


def ucr_based_split(ucr_split: np.ndarray) -> np.ndarray:
  """UCR TRAIN -> train (0); UCR TEST rows alternate validation (1)/test (2)."""
  split = np.zeros_like(ucr_split)
  test_rows = np.flatnonzero(ucr_split == 1)
  split[test_rows] = 1 + (np.arange(len(test_rows)) % 2)
  return split


def build(levels: int = 16, clip: float = 2.0, split: str = 'hash',
          max_rows_per_file: int | None = None) -> dict[str, np.ndarray]:
  """The arrays to save (the importer's keys plus `ucr_split`)."""
  if levels < 2 or clip <= 0:
    raise ValueError(f'need levels >= 2 and clip > 0, got {levels}, {clip}')
  values, seasons, ucr = load_rows(max_rows_per_file)
  arrays = {
      'tokens': quantise(values, levels, clip),
      'prompts': seasons[:, None],
      'vocab_size': np.int32(levels),
      'prompt_vocab_size': np.asarray([len(SEASONS)], np.int32),
      'attribute_names': np.asarray(['season']),
      'ucr_split': ucr,
  }
  if split == 'ucr':
    arrays['split'] = ucr_based_split(ucr).astype(np.int32)
  elif split != 'hash':
    raise ValueError(f'split must be hash or ucr, got {split!r}')
  return arrays


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='.npz to write')
  parser.add_argument('--levels', type=int, default=16,
                      help='quantisation levels = vocab_size')
  parser.add_argument('--clip', type=float, default=2.0,
                      help='bins span [-clip, clip] (z-normalised values)')
  parser.add_argument('--split', choices=('hash', 'ucr'), default='hash')
  parser.add_argument('--max-rows-per-file', type=int, default=None,
                      help='small subsets for tests')
  args = parser.parse_args(argv)
  start = time.time()
  arrays = build(args.levels, args.clip, args.split, args.max_rows_per_file)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **arrays)
  counts = collections.Counter(SEASONS[s] for s in arrays['prompts'][:, 0])
  print(f'wrote {args.out}: tokens {arrays["tokens"].shape}, vocab '
        f'{args.levels}, season {dict(sorted(counts.items()))}, '
        f'{time.time() - start:.1f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
