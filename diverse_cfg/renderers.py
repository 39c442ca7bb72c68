"""How a generation is shown: one renderer per dataset, chosen by evaluate.renderer.

A renderer is fn(tokens_KxT, meta, stem) -> {extension: path}: it writes files
named stem + '.' + extension for the K generations of one prompt and returns
them. The report plays '.wav', shows '.png' and links everything else.

    auto     melody for melody datasets, tokens otherwise
    melody   MIDI and WAV of generation 0, a piano roll of generations 0 and 1
             (evaluate's report; `sample` renders each generation alone)
    tokens   a picture of the token rows (any dataset): one row per generation,
             one colour per token id, EOS black, PAD blank
    pkg.module:function   a user's own renderer with the signature above
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from diverse_cfg import specials

Renderer = Callable[[np.ndarray, object, str], dict]


def melody_files(tokens_KxT: np.ndarray, meta, stem: str) -> dict[str, str]:
  from diverse_cfg.data import melody  # pylint: disable=g-import-not-at-top
  del meta
  melody.write_midi(tokens_KxT[0], stem + '.mid')
  melody.write_wav(tokens_KxT[0], stem + '.wav')
  shown = min(2, len(tokens_KxT))
  melody.piano_roll_png(list(tokens_KxT[:shown]), stem + '.png',
                        titles=[f'sample {i}' for i in range(shown)])
  return {ext: f'{stem}.{ext}' for ext in ('mid', 'wav', 'png')}


def token_files(tokens_KxT: np.ndarray, meta, stem: str) -> dict[str, str]:
  """One image row per generation: token ids as colours up to EOS (black), PAD left blank."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  tokens_KxT = np.asarray(tokens_KxT)
  after_eos_KxT = np.cumsum(tokens_KxT == specials.EOS, axis=1) > 0
  events_KxT = np.ma.masked_where(after_eos_KxT | (tokens_KxT < specials.NUM_SPECIAL),
                                  tokens_KxT)
  # Trim the shared tail of PAD so short rows are readable.
  used = np.flatnonzero((tokens_KxT != specials.PAD).any(axis=0))
  width = int(used[-1]) + 1 if used.size else 1
  k = len(tokens_KxT)
  fig, ax = plt.subplots(figsize=(min(12, 2 + 0.12 * width), 0.35 * k + 1))
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
  vocab = getattr(meta, 'vocab_size', None) or int(tokens_KxT.max()) + 1
  ax.imshow(events_KxT[:, :width], aspect='auto', cmap=cmap, interpolation='nearest',
            vmin=specials.NUM_SPECIAL, vmax=max(vocab - 1, specials.NUM_SPECIAL + 1))
  eos_k, eos_t = np.nonzero((tokens_KxT == specials.EOS) & (np.cumsum(
      tokens_KxT == specials.EOS, axis=1) == 1))
  ax.scatter(eos_t[eos_t < width], eos_k[eos_t < width], marker='s', color='black', s=12,
             label='EOS')
  ax.set_yticks(range(k))
  ax.set_yticklabels([f'sample {i}' for i in range(k)], fontsize=7)
  ax.set_xlabel('position')
  fig.tight_layout()
  fig.savefig(stem + '.png', dpi=80)
  plt.close(fig)
  return {'png': stem + '.png'}


BUILTIN = {'melody': melody_files, 'tokens': token_files}


def resolve(name: str, meta) -> Renderer:
  """The renderer named by evaluate.renderer (see the module docstring)."""
  if name == 'auto':
    return melody_files if meta.is_melody else token_files
  if name in BUILTIN:
    if name == 'melody' and not meta.is_melody:
      raise ValueError(f"evaluate.renderer='melody' but dataset {meta.name!r} is not a melody "
                       "dataset; use 'tokens', 'auto' or your own 'pkg.module:function'")
    return BUILTIN[name]
  module, sep, fn = name.partition(':')
  if not sep or not module or not fn:
    raise ValueError(f"evaluate.renderer={name!r}: expected 'auto', 'melody', 'tokens' or "
                     "'pkg.module:function'")
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'evaluate.renderer={name!r} cannot be loaded: {e}') from e
