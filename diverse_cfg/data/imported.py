"""Bring your own tokens: an .npz of arrays -> a TFDS array_record dataset.

The .npz (or keyword arguments, which must agree with it) holds:
  tokens             int [N, T]   user event ids in [0, vocab_size)
  prompts            int [N, C]   prompt ids, see prompt_vocab_size
  vocab_size         int scalar   size of the user's event vocabulary
  prompt_vocab_size  int scalar   one vocabulary shared by all C positions
                                  (e.g. text tokens): ids in [0, P), kept as is
                     or int [C]   per-attribute sizes: column i holds values in
                                  [0, P_i), flattened as offset_i + v
  lengths            int [N]      optional: events per row; entries at or after
                                  lengths[i] are ignored
  pad_id             int scalar   optional (instead of lengths): a row's events
                                  end at its first pad_id, and everything after
                                  must be pad_id too; pad_id may be outside
                                  [0, vocab_size) (e.g. -1)
  split              [N]          optional: 0/1/2 or train/validation/test;
                                  default: meta.hash_split of the row's events
                                  and prompt (identical rows share a split)
  attribute_names    str [C]      optional; default attr0..attr{C-1}
  fixed_length       bool scalar  optional: whether every row has the same
                                  number of events (then samplers end every
                                  row at exactly that length); default: True
                                  when all lengths are equal

Stored rule: event id u -> u + NUM_SPECIAL; each row becomes
  [events..., EOS, PAD...] of length T + 1,
so every row ends with EOS, even a row with T events. vocab_size in the dataset
metadata is the user's vocab_size + NUM_SPECIAL. Value names are generic
('0', '1', ...).

Every problem is a ValueError that names the array, the problem and the first
offending index, raised before data_dir is touched; the build itself runs in a
temporary directory inside data_dir and is moved into place only when complete.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from diverse_cfg import specials
from diverse_cfg.data import meta

BUILDER_NAME = 'imported_arrays'
VERSION = '1.0.0'
_SPLIT_CODES = {i: s for i, s in enumerate(meta.SPLITS)}
_NAME_RE = re.compile(r'^[a-z][a-z0-9_]*$')


def dataset_dir(data_dir: str, name: str) -> str:
  return os.path.join(data_dir, BUILDER_NAME, name, VERSION)


def list_imported(data_dir: str) -> list[str]:
  root = os.path.join(data_dir, BUILDER_NAME)
  if not os.path.isdir(root):
    return []
  return sorted(n for n in os.listdir(root)
                if os.path.isdir(os.path.join(root, n, VERSION)))


def name_from_path(npz_path: str) -> str:
  stem = os.path.splitext(os.path.basename(npz_path))[0].lower()
  stem = re.sub(r'[^a-z0-9_]', '_', stem)
  return stem if stem[:1].isalpha() else 'd_' + stem


@dataclasses.dataclass(frozen=True)
class PreparedArrays:
  """Validated, converted arrays: exactly what gets written."""
  tokens_NxT: np.ndarray  # int32, events + NUM_SPECIAL, EOS, PAD; T = T_in + 1
  prompt_NxC: np.ndarray  # int32, flattened prompt ids
  length_N: np.ndarray  # int32, events before EOS
  split_N: tuple[str, ...]
  split_given: bool  # False: meta.hash_split of each row
  vocab_size: int  # specials included
  attribute_sizes: tuple[int, ...]
  shared_prompt_vocab: bool
  attribute_names: tuple[str, ...]
  fixed_length: int  # events in every row; 0 = lengths vary


def _first_index(mask) -> tuple[int, ...]:
  return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_int_array(name: str, a, ndim: int) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim != ndim:
    shape = '[N, T]' if name == 'tokens' else '[N, C]' if ndim == 2 else '[N]'
    raise ValueError(f'{name} must be {ndim}-D {shape}, got shape {a.shape}')
  if not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f'{name} must have an integer dtype, got {a.dtype}')
  return a


def _check_scalar(name: str, v) -> int:
  a = np.asarray(v)
  if a.ndim != 0 or not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f'{name} must be an integer scalar, got {a.dtype} '
                     f'of shape {a.shape}')
  return int(a)


def _check_range(name: str, a, upper, valid=None) -> None:
  valid = np.ones(a.shape, bool) if valid is None else valid
  neg = valid & (a < 0)
  if neg.any():
    idx = _first_index(neg)
    raise ValueError(f'{name} has negative id {a[idx]} at index {idx}')
  upper = np.broadcast_to(np.asarray(upper), a.shape)
  over = valid & (a >= upper)
  if over.any():
    idx = _first_index(over)
    raise ValueError(f'{name} has id {a[idx]} >= its vocabulary size '
                     f'{upper[idx]} at index {idx}')


def prepare_arrays(tokens, prompts, vocab_size, prompt_vocab_size, *,
                   lengths=None, pad_id=None, split=None,
                   attribute_names=None, fixed_length=None) -> PreparedArrays:
  """Validates user arrays (ValueError naming array, problem and index)."""
  tokens = _check_int_array('tokens', tokens, 2)
  prompts = _check_int_array('prompts', prompts, 2)
  n, t = tokens.shape
  c = prompts.shape[1]
  if n == 0 or t == 0:
    raise ValueError(f'tokens must have at least one row and column, got '
                     f'shape {tokens.shape}')
  if c == 0:
    raise ValueError('prompts must have at least one column (C >= 1)')
  if prompts.shape[0] != n:
    raise ValueError(f'N mismatch: tokens has {n} rows but prompts has '
                     f'{prompts.shape[0]}')
  vocab_size = _check_scalar('vocab_size', vocab_size)
  if not 0 < vocab_size < 2**31 - specials.NUM_SPECIAL:
    raise ValueError(f'vocab_size must be positive and fit int32, got '
                     f'{vocab_size}')

  pvs = np.asarray(prompt_vocab_size)
  if not np.issubdtype(pvs.dtype, np.integer) or pvs.ndim > 1:
    raise ValueError(f'prompt_vocab_size must be an integer scalar or an int '
                     f'[C] vector, got {pvs.dtype} of shape {pvs.shape}')
  shared = pvs.ndim == 0
  if not shared and pvs.shape != (c,):
    raise ValueError(f'prompt_vocab_size has shape {pvs.shape}, expected '
                     f'({c},) to match prompts [N, C={c}]')
  if np.any(pvs <= 0):
    raise ValueError(f'prompt_vocab_size must be positive, got {pvs.tolist()}')
  sizes = (int(pvs),) * c if shared else tuple(int(s) for s in pvs)

  if lengths is not None and pad_id is not None:
    raise ValueError('give either lengths or pad_id, not both')
  if lengths is not None:
    lengths = _check_int_array('lengths', lengths, 1)
    if lengths.shape[0] != n:
      raise ValueError(f'N mismatch: tokens has {n} rows but lengths has '
                       f'{lengths.shape[0]}')
    bad = (lengths < 0) | (lengths > t)
    if bad.any():
      i = _first_index(bad)
      raise ValueError(f'lengths has {lengths[i]} outside [0, T={t}] at '
                       f'index {i}')
  elif pad_id is not None:
    pad_id = _check_scalar('pad_id', pad_id)
    is_pad = tokens == pad_id
    lengths = np.where(is_pad.any(1), is_pad.argmax(1), t)
    after = np.arange(t)[None, :] >= lengths[:, None]
    stray = after & ~is_pad
    if stray.any():
      idx = _first_index(stray)
      raise ValueError(f'tokens has id {tokens[idx]} at index {idx} after the '
                       f'first pad_id={pad_id} at column {lengths[idx[0]]}')
  else:
    lengths = np.full((n,), t)
  fixed = _fixed_length(lengths, fixed_length)
  valid_NxT = np.arange(t)[None, :] < lengths[:, None]
  _check_range('tokens', tokens, vocab_size, valid_NxT)
  _check_range('prompts', prompts, np.asarray(sizes)[None, :])

  if split is None:
    split_n = tuple(
        meta.hash_split(tokens[i, :lengths[i]].astype(np.int64).tobytes() +
                        prompts[i].astype(np.int64).tobytes())
        for i in range(n))
  else:
    split_n = _check_split(np.asarray(split), n)

  if attribute_names is None:
    names = tuple(f'attr{i}' for i in range(c))
  else:
    names = tuple(str(s) for s in np.asarray(attribute_names).reshape(-1))
    if len(names) != c or len(set(names)) != c:
      raise ValueError(f'attribute_names must be {c} distinct names, got '
                       f'{list(names)}')

  out_NxT = np.full((n, t + 1), specials.PAD, np.int32)
  out_NxT[:, :t] = np.where(valid_NxT, tokens.astype(np.int64)
                            + specials.NUM_SPECIAL, specials.PAD)
  out_NxT[np.arange(n), lengths] = specials.EOS
  offsets = 0 if shared else np.cumsum([0] + list(sizes[:-1]))
  return PreparedArrays(
      tokens_NxT=out_NxT,
      prompt_NxC=(prompts.astype(np.int64) + offsets).astype(np.int32),
      length_N=lengths.astype(np.int32),
      split_N=split_n,
      split_given=split is not None,
      vocab_size=vocab_size + specials.NUM_SPECIAL,
      attribute_sizes=sizes,
      shared_prompt_vocab=shared,
      attribute_names=names,
      fixed_length=fixed,
  )


def _fixed_length(lengths_N: np.ndarray, option) -> int:
  """The rows' common length if they are to be fixed-length, else 0.

  option None: fixed exactly when all rows have the same length; True: they
  must (ValueError naming the first row that differs); False: never.
  """
  same = bool(np.all(lengths_N == lengths_N[0]))
  if option is None:
    return int(lengths_N[0]) if same and lengths_N[0] > 0 else 0
  option = np.asarray(option)
  if option.ndim != 0 or option.dtype.kind not in 'bi' or int(option) not in (0, 1):
    raise ValueError(f'fixed_length must be a boolean scalar, got {option!r}')
  if not option:
    return 0
  if not same:
    i = int(np.flatnonzero(lengths_N != lengths_N[0])[0])
    raise ValueError(f'fixed_length=True but row {i} has {lengths_N[i]} events while row 0 '
                     f'has {lengths_N[0]}')
  if lengths_N[0] == 0:
    raise ValueError('fixed_length=True but the rows hold no events')
  return int(lengths_N[0])


def _check_split(split: np.ndarray, n: int) -> tuple[str, ...]:
  if split.shape != (n,):
    raise ValueError(f'split must have shape ({n},), got {split.shape}')
  if np.issubdtype(split.dtype, np.integer):
    bad = ~np.isin(split, list(_SPLIT_CODES))
    if bad.any():
      i = _first_index(bad)
      raise ValueError(f'split has code {split[i]} at index {i}; codes are '
                       f'{_SPLIT_CODES}')
    return tuple(_SPLIT_CODES[int(s)] for s in split)
  if split.dtype.kind in 'US':
    names = [s.decode() if isinstance(s, bytes) else str(s) for s in split]
    for i, s in enumerate(names):
      if s not in meta.SPLITS:
        raise ValueError(f'split has {s!r} at index ({i},); splits are '
                         f'{list(meta.SPLITS)}')
    return tuple(names)
  raise ValueError(f'split must hold ints 0/1/2 or split names, got '
                   f'{split.dtype}')


_NPZ_KEYS = ('tokens', 'prompts', 'vocab_size', 'prompt_vocab_size', 'lengths',
             'pad_id', 'split', 'attribute_names', 'fixed_length')


def read_npz(npz_path: str, **overrides) -> dict[str, Any]:
  """prepare_arrays' arguments from an .npz; keywords must agree with it."""
  with np.load(npz_path, allow_pickle=False) as npz:
    found = {k: npz[k] for k in npz.files if k in _NPZ_KEYS}
  for key, value in overrides.items():
    if key not in _NPZ_KEYS:
      raise ValueError(f'unknown import option {key!r}; options are '
                       f'{list(_NPZ_KEYS)}')
    if value is None:
      continue
    if key in found and not np.array_equal(np.asarray(found[key]),
                                           np.asarray(value)):
      raise ValueError(f'{key}={value!r} disagrees with the npz value '
                       f'{found[key]!r}')
    found[key] = value
  for key in ('tokens', 'prompts', 'vocab_size', 'prompt_vocab_size'):
    if key not in found:
      raise ValueError(f'{npz_path} lacks array {key!r} (give it in the npz or '
                       f'as a keyword)')
  return found


@dataclasses.dataclass(eq=False)
class ImportedArraysConfig(tfds.core.BuilderConfig):
  """name = the dataset's name; shapes are fixed by the npz at import time."""
  npz_path: str = ''
  seq_len: int = 0  # T + 1
  prompt_len: int = 0
  options: tuple[tuple[str, Any], ...] = ()  # read_npz overrides, as pairs
  source_path: str = ''  # the user's npz, recorded in the metadata


class ImportedArrays(tfds.core.GeneratorBasedBuilder):
  """A dataset imported from arrays; read exactly like essen_folk."""

  # TFDS's default code_path probes the optional `importlib_resources` backport
  # (absent here) for builders inside a package; it only locates checksums.
  code_path = epath.Path(__file__)

  VERSION = tfds.core.Version(VERSION)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(cfg.seq_len,),
                                           dtype=np.int32),
            'prompt': tfds.features.Tensor(shape=(cfg.prompt_len,),
                                           dtype=np.int32),
            'length': tfds.features.Scalar(dtype=np.int32),
            'row_index': tfds.features.Scalar(dtype=np.int64),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    arrays = prepare_arrays(**read_npz(cfg.npz_path, **dict(cfg.options)))
    if arrays.tokens_NxT.shape[1] != cfg.seq_len or (
        arrays.prompt_NxC.shape[1] != cfg.prompt_len):
      raise ValueError(f'{cfg.npz_path} changed shape since the config was '
                       f'made: {arrays.tokens_NxT.shape}, '
                       f'{arrays.prompt_NxC.shape}')
    rows = {s: [i for i, si in enumerate(arrays.split_N) if si == s]
            for s in meta.SPLITS}
    self.info.metadata.update(meta.metadata_dict(
        name=cfg.name,
        vocab_size=arrays.vocab_size,
        seq_len=cfg.seq_len,
        attribute_names=arrays.attribute_names,
        attribute_sizes=arrays.attribute_sizes,
        shared_prompt_vocab=arrays.shared_prompt_vocab,
        is_melody=False,
        fixed_length=arrays.fixed_length,
        split_sizes={s: len(r) for s, r in rows.items()},
        split_rule=(meta.SPLIT_RULE + '; split key = int64 bytes of the events '
                    'then the prompt') if not arrays.split_given
        else 'given by the user',
        extra={'source': cfg.source_path or os.path.abspath(cfg.npz_path),
               'token_rule': 'stored = user id + num_special; then EOS, PAD'}))
    return {s: self._generate_examples(arrays, r) for s, r in rows.items() if r}

  def _generate_examples(self, arrays: PreparedArrays, rows):
    for i in rows:
      yield i, {'tokens': arrays.tokens_NxT[i], 'prompt': arrays.prompt_NxC[i],
                'length': arrays.length_N[i], 'row_index': i}


def import_npz(npz_path: str, name: str, data_dir: str, *,
               overwrite: bool = False, **options) -> str:
  """Validates the npz, builds dataset `name` in data_dir; returns its dir.

  options: vocab_size, prompt_vocab_size, lengths, pad_id, split,
  attribute_names, fixed_length (see the module docstring); they override missing npz
  entries and must agree with present ones.
  """
  if not _NAME_RE.match(name):
    raise ValueError(f'dataset name {name!r} must match {_NAME_RE.pattern}')
  if name in ('essen_folk', 'imported'):
    raise ValueError(f'dataset name {name!r} is reserved')
  raw = read_npz(npz_path, **options)
  arrays = prepare_arrays(**raw)  # all ValueErrors happen before any write
  final = dataset_dir(data_dir, name)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f'{final} exists; pass overwrite=True to replace it')
  created_data_dir = not os.path.exists(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  # Inside data_dir so the final move is a rename on the same filesystem.
  tmp = tempfile.mkdtemp(prefix='.import_tmp_', dir=data_dir)
  try:
    config = ImportedArraysConfig(
        name=name, version=VERSION, npz_path=os.path.abspath(npz_path),
        source_path=os.path.abspath(npz_path),
        seq_len=arrays.tokens_NxT.shape[1],
        prompt_len=arrays.prompt_NxC.shape[1],
        options=tuple(sorted((k, v) for k, v in options.items()
                             if v is not None and np.ndim(v) == 0)))
    if any(v is not None and np.ndim(v) > 0 for v in options.values()):
      # Array-valued options cannot live in a config; pass them via an npz.
      merged = os.path.join(tmp, 'merged.npz')
      np.savez(merged, **{k: np.asarray(v) for k, v in raw.items()})
      config = dataclasses.replace(config, npz_path=merged, options=())
    builder = ImportedArrays(config=config, data_dir=os.path.join(tmp, 'build'))
    builder.download_and_prepare(file_format='array_record')
    if os.path.exists(final):
      shutil.rmtree(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(str(builder.data_dir), final)
  except BaseException:
    if created_data_dir:
      shutil.rmtree(data_dir, ignore_errors=True)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final
