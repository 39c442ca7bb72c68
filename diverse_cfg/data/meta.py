"""What a dataset's tokens and prompts mean (the schema every dataset shares; loading: registry.py).

Every dataset stores the same metadata (`metadata_dict`) in its TFDS
`info.metadata` (metadata.json next to the records), so code downstream reads
vocabularies from `DatasetMeta` and never from a particular builder.

Prompt layout: C attribute tokens flattened into one prompt vocabulary,
attribute i value v -> attribute_offsets[i] + v, so ids lie in
[0, prompt_vocab_size). An imported dataset may instead share one prompt
vocabulary across all C positions (e.g. text tokens): then every offset is 0
and prompt_vocab_size is that vocabulary's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from diverse_cfg import specials
from diverse_cfg.data import melody

FORMAT_VERSION = 1
SPLITS = ('train', 'validation', 'test')
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
SPLIT_RULE = ('u = first 8 bytes of sha256(split key) as a big-endian '
              'integer / 2**64; train if u < 0.90, validation if u < 0.95, '
              'else test')

# Per-token feature sets an encoder can embed besides the token itself, by name:
# name -> (() -> {feature: value per token id}, () -> {feature: ordinal value per token id,
# -1 = none} or None). The first kind is embedded per token; of the second, the step from the
# previous token that has a value. A config names a set (or 'none'); the tables are rebuilt
# from the name, so a checkpoint's config says which. Sets are never changed once used:
# 'melody' is what checkpoints from f47dcb9 to 9640baf were trained with.
TOKEN_FEATURES = {
    'melody': (melody.token_features, None),
    'melody_steps': (melody.token_features, melody.token_steps),
}


class TokenTables(NamedTuple):
  values: tuple[tuple[int, ...], ...] = ()  # one table per feature: value per token id
  steps: tuple[tuple[int, ...], ...] = ()  # ordinal value per token id, -1 = none


def token_feature_tables(name: str) -> TokenTables:
  """The tables of a registered feature set; empty for 'none'."""
  if name == 'none':
    return TokenTables()
  if name not in TOKEN_FEATURES:
    raise ValueError(f'unknown token feature set {name!r}; known: none, '
                     f'{", ".join(sorted(TOKEN_FEATURES))}')
  as_tuples = lambda fn: tuple(tuple(int(v) for v in t) for t in (fn() if fn else {}).values())
  values_fn, steps_fn = TOKEN_FEATURES[name]
  return TokenTables(values=as_tuples(values_fn), steps=as_tuples(steps_fn))


def hash_split(key: bytes, fractions: Sequence[float] = SPLIT_FRACTIONS) -> str:
  """Stable split of an example from bytes that identify it (see SPLIT_RULE)."""
  u = int.from_bytes(hashlib.sha256(key).digest()[:8], 'big') / 2.0**64
  edge = 0.0
  for split, f in zip(SPLITS, fractions):
    edge += f
    if u < edge:
      return split
  return SPLITS[-1]


def metadata_dict(*, name: str, vocab_size: int, seq_len: int,
                  attribute_names: Sequence[str],
                  attribute_sizes: Sequence[int],
                  attribute_values=None, shared_prompt_vocab: bool = False,
                  is_melody: bool, split_sizes: Mapping[str, int],
                  fixed_length: int = 0,
                  split_rule: str = SPLIT_RULE, extra=None) -> dict[str, Any]:
  """The JSON metadata every builder writes (the schema DatasetMeta reads)."""
  sizes = [int(s) for s in attribute_sizes]
  if shared_prompt_vocab:
    offsets = [0] * len(sizes)
    prompt_vocab_size = max(sizes)
  else:
    offsets = [int(o) for o in np.cumsum([0] + sizes[:-1])]
    prompt_vocab_size = int(sum(sizes))
  md = {
      'format_version': FORMAT_VERSION,
      'name': name,
      'vocab_size': int(vocab_size),
      'num_special': specials.NUM_SPECIAL,
      'special_ids': {'pad': specials.PAD, 'bos': specials.BOS,
                      'eos': specials.EOS},
      'seq_len': int(seq_len),
      'prompt_len': len(sizes),
      'prompt_vocab_size': prompt_vocab_size,
      'attribute_names': list(attribute_names),
      'attribute_sizes': sizes,
      'attribute_offsets': offsets,
      # None per attribute = generic value names '0', '1', ...
      'attribute_values': (list(attribute_values) if attribute_values
                           else [None] * len(sizes)),
      'shared_prompt_vocab': bool(shared_prompt_vocab),
      'is_melody': bool(is_melody),
      # Events in every row (0 = lengths vary): samplers then end every row there.
      'fixed_length': int(fixed_length),
      'split_rule': split_rule,
      'split_sizes': {s: int(n) for s, n in split_sizes.items()},
  }
  md.update(extra or {})
  return md


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """Vocabularies and sizes of one built dataset.

  vocab_size counts the specials (PAD=0, BOS=1, EOS=2): event ids are in
  [NUM_SPECIAL, vocab_size). seq_len is the stored row length, EOS included.
  fixed_length > 0: every row holds exactly that many events.
  """
  name: str
  vocab_size: int
  seq_len: int
  prompt_len: int
  prompt_vocab_size: int
  attribute_names: tuple[str, ...]
  attribute_sizes: tuple[int, ...]
  attribute_offsets: tuple[int, ...]
  attribute_values: tuple[tuple[str, ...] | None, ...]
  is_melody: bool
  fixed_length: int  # events in every row; 0 = lengths vary
  # Mappings stay out of the hash, so a DatasetMeta can be a static argument.
  split_sizes: Mapping[str, int] = dataclasses.field(hash=False)
  metadata: Mapping[str, Any] = dataclasses.field(
      default_factory=dict, repr=False, compare=False, hash=False)

  @classmethod
  def from_metadata(cls, md: Mapping[str, Any],
                    split_sizes: Mapping[str, int] | None = None
                    ) -> DatasetMeta:
    if md.get('format_version') != FORMAT_VERSION:
      raise ValueError(f'metadata format {md.get("format_version")} != '
                       f'{FORMAT_VERSION}; rebuild the dataset')
    sizes = dict(md['split_sizes'])
    sizes.update(split_sizes or {})
    return cls(
        name=md['name'],
        vocab_size=int(md['vocab_size']),
        seq_len=int(md['seq_len']),
        prompt_len=int(md['prompt_len']),
        prompt_vocab_size=int(md['prompt_vocab_size']),
        attribute_names=tuple(md['attribute_names']),
        attribute_sizes=tuple(int(s) for s in md['attribute_sizes']),
        attribute_offsets=tuple(int(o) for o in md['attribute_offsets']),
        attribute_values=tuple(None if v is None else tuple(v)
                               for v in md['attribute_values']),
        is_melody=bool(md['is_melody']),
        fixed_length=int(md.get('fixed_length', 0)),  # absent before it was recorded
        split_sizes={s: int(sizes.get(s, 0)) for s in SPLITS},
        metadata=dict(md),
    )

  @classmethod
  def from_builder(cls, builder) -> DatasetMeta:
    return cls.from_metadata(
        builder.info.metadata,
        {s: int(info.num_examples) for s, info in builder.info.splits.items()})

  @property
  def token_features(self) -> str:
    """The feature set that describes this dataset's tokens (see TOKEN_FEATURES)."""
    return 'melody_steps' if self.is_melody else 'none'

  def value_names(self, attribute: int | str) -> tuple[str, ...]:
    i = self._index(attribute)
    names = self.attribute_values[i]
    return names if names is not None else tuple(
        str(v) for v in range(self.attribute_sizes[i]))

  def _index(self, attribute: int | str) -> int:
    if isinstance(attribute, str):
      if attribute not in self.attribute_names:
        raise ValueError(f'unknown attribute {attribute!r}; attributes are '
                         f'{list(self.attribute_names)}')
      return self.attribute_names.index(attribute)
    return int(attribute)

  def encode_prompt(self, values: Mapping[str, Any]) -> np.ndarray:
    """int32 [C] prompt ids from {attribute name: value name (or index)}."""
    unknown = sorted(set(values) - set(self.attribute_names))
    missing = [n for n in self.attribute_names if n not in values]
    if unknown or missing:
      raise ValueError(f'prompt needs exactly the attributes '
                       f'{list(self.attribute_names)}; unknown {unknown}, '
                       f'missing {missing}')
    out = np.zeros((self.prompt_len,), np.int32)
    for i, name in enumerate(self.attribute_names):
      out[i] = self.attribute_offsets[i] + self._value_index(i, values[name])
    return out

  def _value_index(self, i: int, value) -> int:
    name = self.attribute_names[i]
    names = self.attribute_values[i]
    if names is not None and str(value) in names:
      return names.index(str(value))
    if names is None:
      try:
        v = int(value)
      except (TypeError, ValueError):
        v = -1
      if 0 <= v < self.attribute_sizes[i]:
        return v
      raise ValueError(f'unknown value {value!r} for attribute {name!r}; valid '
                       f'values are integers 0..{self.attribute_sizes[i] - 1}')
    raise ValueError(f'unknown value {value!r} for attribute {name!r}; valid '
                     f'values are {list(names)}')

  def decode_prompt(self, ids) -> dict[str, str]:
    labels = self.attribute_labels(np.asarray(ids).reshape(1, -1))[0]
    return {name: self.value_names(i)[labels[i]]
            for i, name in enumerate(self.attribute_names)}

  def attribute_labels(self, prompt_NxC) -> np.ndarray:
    """Per-attribute class indices int32 [N, C] (prompt ids minus offsets)."""
    prompt_NxC = np.asarray(prompt_NxC)
    offsets_C = np.asarray(self.attribute_offsets, prompt_NxC.dtype)
    labels_NxC = prompt_NxC - offsets_C
    bad = (labels_NxC < 0) | (labels_NxC >= np.asarray(self.attribute_sizes))
    if bad.any():
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f'prompt id {prompt_NxC[idx]} at index {idx} is outside '
                       f'attribute {self.attribute_names[idx[-1]]!r}')
    return labels_NxC.astype(np.int32)
