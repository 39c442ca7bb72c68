"""Bach chorales (music21's corpus) -> an .npz with 4 tokens per event.

Source: the Bach chorale harmonisations shipped inside music21 (installed with
the project; checked with music21 10.5.1): every non-.rntxt file that
`music21.corpus.getComposer('bach')` lists (music21/corpus/bach/bwv*.mxl,
.xml, .krn) and that has Soprano, Alto, Tenor and Bass parts; other pieces are
skipped and counted (the WTC prelude bwv846, and the three .krn files, whose
parts are unnamed and which duplicate .mxl files of the same BWV number).
music21 is BSD-3-Clause; music21/corpus/license.txt says the corpus works are
out of US copyright or licensed for use, possibly not for commercial use,
with no licence stated for the Bach files themselves. Nothing is downloaded.

Tokenisation: time runs on an eighth-note grid (STEP = 0.5 quarter lengths).
Each step is one event of GROUP_SIZE = 4 tokens, S A T B in that order, from
one vocabulary shared by the four voices:
  0 = REST (nothing sounds), 1 = HOLD (the note sounding at the previous step
  goes on; ties are merged first), 2 + (midi - PITCH_MIN) = a note starting at
  or sounding from this step, for midi in [PITCH_MIN, PITCH_MAX].
The first step of every row spells its pitches out (never HOLD), so a row
stands alone. What sounds at the grid point is what counts: notes shorter than
an eighth that cover no grid point (some ornaments and passing sixteenths) are
dropped and counted; a chord inside one part keeps its highest note.

Rows: each chorale is cut into windows of `window` steps (default 32 = four
4/4 bars), the first lengthened by the pickup so that the later windows start
on a downbeat, and a tail shorter than `min_steps` (default 8) merged into
the window before it, so the last window always holds the final cadence. Rows
vary in length (always a multiple of 4 tokens) and are padded with pad_id = -1;
EOS then means "window ends" or, for the last window, "the chorale ends".

Prompt, three attributes (row counts of the full default build):
  mode      major 864 / minor 648: the mode of the first Key in the file
            (MusicXML <mode>; all 409 files have one), else music21's key
            analysis of the whole chorale. A window may modulate away from it.
  meter     duple 1313 / triple 199: three beats a bar in the first time
            signature (3/4, 3/2) or not (4/4, and the one 12/8 chorale).
  position  start 405 / middle 708 / end 399 (first / other / last window);
            a chorale with a single window counts as start.

Full default build: 409 chorales (271 distinct tune keys), 1512 rows (35
exact duplicate rows dropped: repeats within a chorale, and files holding the
same harmonisation), T = 152 tokens (38 steps), row lengths 32-152 tokens
(mean 121), vocab 51, split 1190/160/162 rows; 1248 of about 95k notes
(1.3%) fall between grid points and are dropped.

Split: given, by tune rather than by file, so that windows of one chorale and
other harmonisations of the same melody (the corpus holds several) never
straddle train and test: the key is the soprano's first 12 onsets as
intervals from its first note (transposition-invariant), hashed (sha256) to
80/10/10 train/validation/test.

Parsing the 413 files takes 1.5-2 minutes on 2 cores (progress is printed);
the build is deterministic (sorted files, no randomness).

Usage: python -m examples.bach_chorales --out=/work/datasets/bach_chorales.npz
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import math
import os
import sys
import time

import numpy as np

STEP = 0.5  # quarter lengths per event (an eighth note)
GROUP_SIZE = 4
VOICES = ('soprano', 'alto', 'tenor', 'bass')
REST, HOLD = 0, 1
NUM_CONTROL = 2
PITCH_MIN, PITCH_MAX = 36, 84  # C2..C6 covers the chorales' SATB ranges
VOCAB_SIZE = NUM_CONTROL + PITCH_MAX - PITCH_MIN + 1
PAD_ID = -1
MODES = ('major', 'minor')
METERS = ('duple', 'triple')
POSITIONS = ('start', 'middle', 'end')
ATTRIBUTES = (('mode', MODES), ('meter', METERS), ('position', POSITIONS))
SPLIT_KEY_NOTES = 12
SPLIT_PERCENT = (80, 10, 10)  # train, validation, test
_EPS = 1e-6  # grid arithmetic is on float quarter lengths


@dataclasses.dataclass
class Chorale:
  """What one file contributes; plain data so a parse runs once."""
  chorale_id: str
  step_tokens: np.ndarray  # int32 [steps, 4], HOLD where a note goes on
  pitch_steps: np.ndarray  # int32 [steps, 4]: midi sounding, -1 for rest
  pickup_steps: int
  mode: str
  mode_source: str  # 'file' or 'analysis'
  meter: str
  split_key: bytes
  dropped_notes: int
  chords: int


class SkipChorale(Exception):
  """A file that cannot become SATB rows; str(e) is the counted reason."""


def chorale_paths(max_files: int | None = None) -> list[str]:
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  paths = sorted((str(p) for p in corpus.getComposer('bach')
                  if not str(p).endswith('.rntxt')), key=os.path.basename)
  return paths[:max_files] if max_files is not None else paths


def _voice_part(score, voice: str):
  for part in score.parts:
    name = (part.partName or '').strip().lower()
    if name.startswith(voice) or name == voice[0]:
      return part
  raise SkipChorale(f'no {voice} part')


def _notes(part) -> tuple[list[tuple[float, float, int]], int]:
  """(start, end, midi) of a part with ties merged; and chords seen."""
  notes, chords = [], 0
  for n in part.stripTies().flatten().notes:
    if n.isChord:
      chords += 1
      midi = max(p.midi for p in n.pitches)
    else:
      midi = n.pitch.midi
    start = float(n.offset)
    notes.append((start, start + float(n.duration.quarterLength), midi))
  return notes, chords


def voice_grid(notes, n_steps: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Per step: midi (-1 rest), id of the sounding note (-1), dropped count."""
  pitch = np.full(n_steps, -1, np.int32)
  note_id = np.full(n_steps, -1, np.int32)
  dropped = 0
  for i, (start, end, midi) in enumerate(notes):
    # The grid points a note covers: start <= k * STEP < end.
    first = math.ceil(start / STEP - _EPS)
    stop = min(math.ceil(end / STEP - _EPS), n_steps)
    if first >= stop:
      dropped += 1
      continue
    pitch[first:stop] = midi
    note_id[first:stop] = i
  return pitch, note_id, dropped


def grid_tokens(pitch: np.ndarray, note_id: np.ndarray) -> np.ndarray:
  """REST / HOLD / pitch token per step (HOLD: same note as the step before)."""
  tokens = np.where(pitch < 0, REST, pitch - PITCH_MIN + NUM_CONTROL)
  held = np.zeros(len(pitch), bool)
  held[1:] = (note_id[1:] == note_id[:-1]) & (note_id[1:] >= 0)
  return np.where(held, HOLD, tokens).astype(np.int32)


def _pickup_steps(part) -> int:
  """Steps before the first downbeat (0 when the first bar is complete)."""
  measures = list(part.getElementsByClass('Measure'))
  if not measures:
    return 0
  first = measures[0]
  bar = first.barDuration.quarterLength
  length = first.duration.quarterLength
  if 0 < length < bar - _EPS:
    return int(round(length / STEP))
  return 0


def _mode(score) -> tuple[str, str]:
  keys = list(score.flatten().getElementsByClass('Key'))
  if keys and keys[0].mode in MODES:
    return keys[0].mode, 'file'
  analysed = score.analyze('key')
  if analysed.mode not in MODES:
    raise SkipChorale(f'mode {analysed.mode}')
  return analysed.mode, 'analysis'


def _meter(score) -> str:
  """triple: 3 beats a bar (3/4, 3/2, 9/8); duple: the rest (4/4, 12/8...)."""
  signatures = list(score.flatten().getElementsByClass('TimeSignature'))
  if not signatures:
    raise SkipChorale('no time signature')
  return 'triple' if signatures[0].numerator in (3, 9) else 'duple'


def split_key(soprano_pitch: np.ndarray, soprano_ids: np.ndarray) -> bytes:
  """The soprano's first onsets as intervals from its first note."""
  onsets = [int(p) for k, p in enumerate(soprano_pitch)
            if p >= 0 and (k == 0 or soprano_ids[k] != soprano_ids[k - 1])]
  onsets = onsets[:SPLIT_KEY_NOTES]
  return np.asarray([p - onsets[0] for p in onsets], np.int32).tobytes()


def parse_chorale(path: str) -> Chorale:
  """Parses one file (the slow part: music21) into a Chorale."""
  from music21 import corpus  # pylint: disable=g-import-not-at-top
  score = corpus.parse(path)
  parts = [_voice_part(score, v) for v in VOICES]
  n_steps = int(math.ceil(float(score.highestTime) / STEP - _EPS))
  pitches, tokens, dropped, chords = [], [], 0, 0
  soprano = None
  for part in parts:
    notes, part_chords = _notes(part)
    pitch, note_id, part_dropped = voice_grid(notes, n_steps)
    soprano = (pitch, note_id) if soprano is None else soprano
    pitches.append(pitch)
    tokens.append(grid_tokens(pitch, note_id))
    dropped += part_dropped
    chords += part_chords
  pitch_steps = np.stack(pitches, 1)
  sounding = pitch_steps[pitch_steps >= 0]
  if sounding.size == 0:
    raise SkipChorale('no notes')
  if sounding.min() < PITCH_MIN or sounding.max() > PITCH_MAX:
    raise SkipChorale('pitch out of range')
  mode, mode_source = _mode(score)
  return Chorale(
      chorale_id=os.path.basename(path), step_tokens=np.stack(tokens, 1),
      pitch_steps=pitch_steps, pickup_steps=_pickup_steps(parts[0]),
      mode=mode, mode_source=mode_source, meter=_meter(score),
      split_key=split_key(*soprano), dropped_notes=dropped, chords=chords)


def window_bounds(n_steps: int, pickup: int, window: int,
                  min_steps: int) -> list[tuple[int, int]]:
  """[start, stop) steps: the first holds the pickup, a short tail merges."""
  cuts = [0] + list(range(pickup + window, n_steps, window)) + [n_steps]
  bounds = list(zip(cuts[:-1], cuts[1:]))
  if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_steps:
    bounds[-2:] = [(bounds[-2][0], n_steps)]
  return bounds


def window_tokens(chorale: Chorale, start: int, stop: int) -> np.ndarray:
  """Flat S A T B tokens of steps [start, stop); the first step spelt out."""
  steps = chorale.step_tokens[start:stop].copy()
  first_pitch = chorale.pitch_steps[start]
  steps[0] = np.where(first_pitch < 0, REST,
                      first_pitch - PITCH_MIN + NUM_CONTROL)
  return steps.reshape(-1)


def split_of(key: bytes) -> int:
  bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], 'big') % 100
  train, validation, _ = SPLIT_PERCENT
  return 0 if bucket < train else 1 if bucket < train + validation else 2


def parse_all(paths, log=print) -> tuple[list[Chorale], collections.Counter]:
  chorales, skipped = [], collections.Counter()
  start = time.time()
  for i, path in enumerate(paths):
    try:
      chorales.append(parse_chorale(path))
    except SkipChorale as e:
      skipped[str(e)] += 1
    if log and ((i + 1) % 25 == 0 or i + 1 == len(paths)):
      log(f'parsed {i + 1}/{len(paths)} files, {len(chorales)} kept, '
          f'{time.time() - start:.0f}s')
  return chorales, skipped


def rows_of(chorales, window: int = 32, min_steps: int = 8):
  """The importer's arrays, plus per-row chorale ids; and duplicates dropped."""
  rows, prompts, splits, ids = [], [], [], []
  seen, duplicates = set(), 0
  for ch in chorales:
    bounds = window_bounds(len(ch.step_tokens), ch.pickup_steps, window,
                           min_steps)
    for w, (start, stop) in enumerate(bounds):
      position = ('start' if w == 0 else
                  'end' if w == len(bounds) - 1 else 'middle')
      row = window_tokens(ch, start, stop)
      prompt = (MODES.index(ch.mode), METERS.index(ch.meter),
                POSITIONS.index(position))
      # Repeated sections and files that hold the same harmonisation give
      # identical rows; keep the first, so no row is in two splits.
      key = (row.tobytes(), prompt)
      if key in seen:
        duplicates += 1
        continue
      seen.add(key)
      rows.append(row)
      prompts.append(prompt)
      splits.append(split_of(ch.split_key))
      ids.append(ch.chorale_id)
  width = max(len(r) for r in rows)
  tokens = np.full((len(rows), width), PAD_ID, np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  return {
      'tokens': tokens,
      'prompts': np.asarray(prompts, np.int32),
      'vocab_size': np.int32(VOCAB_SIZE),
      'prompt_vocab_size': np.asarray([len(v) for _, v in ATTRIBUTES],
                                      np.int32),
      'attribute_names': np.asarray([a for a, _ in ATTRIBUTES]),
      'pad_id': np.int32(PAD_ID),
      'split': np.asarray(splits, np.int32),
      'chorale_id': np.asarray(ids),
      'group_size': np.int32(GROUP_SIZE),
  }, duplicates


def build(window: int = 32, min_steps: int = 8, max_files: int | None = None,
          log=print) -> tuple[dict[str, np.ndarray], dict]:
  """(arrays to save, stats) for the first max_files files (all: None)."""
  if window < 1 or not 1 <= min_steps <= window:
    raise ValueError(f'need window >= 1, 1 <= min_steps <= window; got '
                     f'{window}, {min_steps}')
  chorales, skipped = parse_all(chorale_paths(max_files), log)
  if not chorales:
    raise ValueError(f'no chorale kept; skipped {dict(skipped)}')
  arrays, duplicates = rows_of(chorales, window, min_steps)
  stats = {
      'chorales': len(chorales), 'skipped': dict(skipped),
      'duplicate_rows_dropped': duplicates,
      'tunes': len({c.split_key for c in chorales}),
      'mode_source': dict(collections.Counter(c.mode_source
                                              for c in chorales)),
      'dropped_notes': sum(c.dropped_notes for c in chorales),
      'chords_in_parts': sum(c.chords for c in chorales),
  }
  return arrays, stats


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='.npz to write')
  parser.add_argument('--window', type=int, default=32,
                      help='steps (eighth notes) per row')
  parser.add_argument('--min-steps', type=int, default=8,
                      help='a shorter tail joins the window before it')
  parser.add_argument('--max-files', type=int, default=None,
                      help='small subsets for tests')
  args = parser.parse_args(argv)
  start = time.time()
  arrays, stats = build(args.window, args.min_steps, args.max_files)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **arrays)
  print(f'wrote {args.out}: tokens {arrays["tokens"].shape} '
        f'(group size {GROUP_SIZE}), vocab {VOCAB_SIZE}, {stats}, '
        f'{time.time() - start:.0f}s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
