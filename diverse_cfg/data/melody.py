"""A reversible event vocabulary for monophonic melodies.

One token per event, event = (pitch or rest) x (duration class):

    token = NUM_SPECIAL + slot * NUM_DURATIONS + duration_index
    slot  = midi_pitch - PITCH_LOW   for a note, in [0, NUM_PITCHES)
          = REST_SLOT                for a rest

Because a token carries both halves of an event, there is no grammar to break:
every sequence of event ids is a melody (the alternating pitch/duration design
loses well-formedness under strong guidance, see DESIGN.md section 5).

Canonical form (what `stream_to_tokens` and `midi_to_tokens` produce, and what
makes tokens -> MIDI -> tokens exact):
  * tied notes are merged into one note (MIDI has no ties);
  * silence between notes becomes rest events, split greedily into the largest
    rest classes that fit (MIDI has no rests, only gaps);
  * silence before the first and after the last note is dropped.
Token rows that are not canonical (two rests in a row, a leading rest) still
decode; they just come back canonicalised from MIDI.

Durations are quarterLength classes taken from what the Essen collection
contains (no tuplets occur there). Pitches are MIDI 48..95; Essen uses 48..85.
"""

from __future__ import annotations

import fractions
import wave
from typing import Iterable, Sequence

import numpy as np

from diverse_cfg import specials

Fraction = fractions.Fraction

PITCH_LOW = 48
NUM_PITCHES = 48  # MIDI 48..95
REST_SLOT = NUM_PITCHES
NUM_SLOTS = NUM_PITCHES + 1

# Every class is a multiple of 1/8: any gap on the 1/8 grid splits into rests.
DURATIONS = tuple(
    Fraction(d)
    for d in ('1/8', '1/4', '3/8', '1/2', '3/4', '1', '5/4', '3/2', '7/4', '2',
              '5/2', '3', '7/2', '4', '5', '6', '8', '12'))
NUM_DURATIONS = len(DURATIONS)
DURATION_GRID = Fraction(1, 8)
_DURATION_INDEX = {d: i for i, d in enumerate(DURATIONS)}

NUM_EVENTS = NUM_SLOTS * NUM_DURATIONS
VOCAB_SIZE = specials.NUM_SPECIAL + NUM_EVENTS  # 885, specials included

DEFAULT_TEMPO_QPM = 120.0


class UnsupportedMelodyError(ValueError):
  """A stream that the vocabulary cannot represent; `reason` is a short tag.

  Reasons: 'polyphonic', 'grace_note', 'duration', 'rest_duration',
  'pitch_range', 'empty'. The Essen builder counts skipped tunes by reason.
  """

  def __init__(self, reason: str, message: str):
    super().__init__(f'{reason}: {message}')
    self.reason = reason


# ---------------------------------------------------------------------------
# Events <-> token ids.


def encode_event(midi_pitch: int | None, duration) -> int:
  """Token id of one note (midi_pitch) or rest (None) of a quarterLength."""
  d = Fraction(duration)
  if d not in _DURATION_INDEX:
    raise UnsupportedMelodyError('duration', f'{d} not in {_names(DURATIONS)}')
  if midi_pitch is None:
    slot = REST_SLOT
  else:
    slot = int(midi_pitch) - PITCH_LOW
    if not 0 <= slot < NUM_PITCHES:
      raise UnsupportedMelodyError(
          'pitch_range',
          f'MIDI {midi_pitch} outside [{PITCH_LOW}, {PITCH_LOW + NUM_PITCHES})')
  return specials.NUM_SPECIAL + slot * NUM_DURATIONS + _DURATION_INDEX[d]


def decode_event(token: int) -> tuple[int | None, Fraction]:
  """(midi pitch or None for a rest, quarterLength) of one event token."""
  e = int(token) - specials.NUM_SPECIAL
  if not 0 <= e < NUM_EVENTS:
    raise ValueError(f'token {token} is not an event id')
  slot, d = divmod(e, NUM_DURATIONS)
  pitch = None if slot == REST_SLOT else PITCH_LOW + slot
  return pitch, DURATIONS[d]


def event_ids(tokens) -> np.ndarray:
  """The event ids of a row, read the way the decoder reads them.

  Reading stops at the first EOS; PAD and BOS before it carry no event and are
  skipped (the model never emits them; see is_well_formed to detect them).
  """
  row = np.asarray(tokens).reshape(-1)
  eos = np.flatnonzero(row == specials.EOS)
  if eos.size:
    row = row[:eos[0]]
  is_event = (row >= specials.NUM_SPECIAL) & (row < VOCAB_SIZE)
  return row[is_event].astype(np.int32)


def tokens_to_events(tokens) -> list[tuple[int | None, Fraction]]:
  return [decode_event(t) for t in event_ids(tokens)]


def is_well_formed(tokens) -> bool:
  """True iff the row is events, EOS, anything; or a full row of events.

  With this vocabulary every event sequence decodes, so the only ways to be
  ill-formed are specials in the wrong place (PAD/BOS before EOS, out-of-range
  ids) or a row that stops (PAD) without an EOS.
  """
  row = np.asarray(tokens).reshape(-1)
  eos = np.flatnonzero(row == specials.EOS)
  body = row[:eos[0]] if eos.size else row
  return bool(np.all((body >= specials.NUM_SPECIAL) & (body < VOCAB_SIZE)))


# ---------------------------------------------------------------------------
# music21 streams <-> tokens.


def _names(durations: Iterable[Fraction]) -> str:
  return ','.join(str(d) for d in durations)


def _split_gap(gap: Fraction) -> list[int]:
  """Rest tokens for a silence: greedy largest-first, the canonical split."""
  if gap % DURATION_GRID:
    raise UnsupportedMelodyError('rest_duration', f'gap {gap} off the 1/8 grid')
  out = []
  for d in reversed(DURATIONS):
    while gap >= d:
      out.append(encode_event(None, d))
      gap -= d
  return out


def _fold(midi_pitch: int) -> int:
  while midi_pitch < PITCH_LOW:
    midi_pitch += 12
  while midi_pitch >= PITCH_LOW + NUM_PITCHES:
    midi_pitch -= 12
  return midi_pitch


def notes_to_tokens(notes: Sequence[tuple[int, Fraction, Fraction]],
                    fold_octaves: bool = False) -> np.ndarray:
  """Canonical tokens from (midi, onset, duration) triples sorted by onset."""
  out = []
  prev_end = None
  for midi_pitch, onset, dur in notes:
    if prev_end is not None:
      if onset < prev_end:
        raise UnsupportedMelodyError('polyphonic', f'note at {onset} overlaps')
      out.extend(_split_gap(onset - prev_end))
    if fold_octaves:
      midi_pitch = _fold(midi_pitch)
    out.append(encode_event(midi_pitch, dur))
    prev_end = onset + dur
  if not out:
    raise UnsupportedMelodyError('empty', 'no notes')
  return np.asarray(out, np.int32)


def _notes_of(stream, in_place: bool = False) -> list[tuple[int, Fraction, Fraction]]:
  """(midi, onset, duration) of every note, ties merged, sorted by onset.

  in_place: merge the ties in the stream itself instead of in a deep copy (which
  took about a third of parsing a tune); for streams the caller throws away.
  """
  parts = [p for p in getattr(stream, 'parts', []) if p.flatten().notes]
  if len(parts) > 1:
    raise UnsupportedMelodyError('polyphonic', f'{len(parts)} parts with notes')
  if in_place:
    stream.stripTies(inPlace=True)
  else:
    stream = stream.stripTies(inPlace=False)
  flat = stream.flatten()
  notes = []
  for n in flat.notes:
    if n.isChord:
      raise UnsupportedMelodyError('polyphonic', f'chord at {n.offset}')
    if n.duration.isGrace or n.quarterLength == 0:
      raise UnsupportedMelodyError('grace_note', f'grace note at {n.offset}')
    notes.append((n.pitch.midi, Fraction(n.offset), Fraction(n.quarterLength)))
  notes.sort(key=lambda x: x[1])
  return notes


def stream_to_tokens(stream, fold_octaves: bool = False, in_place: bool = False) -> np.ndarray:
  """Canonical event tokens (int32, no EOS) of a monophonic music21 stream.

  Raises UnsupportedMelodyError (a ValueError with `.reason`) when a duration
  is not a class, a gap is off the 1/8 grid, notes overlap, or a pitch is out of
  range (fold_octaves=True moves such pitches by octaves into range instead).
  in_place=True merges the stream's ties in the stream itself (faster; the
  stream is changed).
  """
  return notes_to_tokens(_notes_of(stream, in_place), fold_octaves)


def tokens_to_stream(tokens, tempo_qpm: float = DEFAULT_TEMPO_QPM):
  """A flat music21 Stream (tempo, notes, rests); stops at EOS, skips PAD."""
  from music21 import note, stream, tempo  # pylint: disable=g-import-not-at-top
  s = stream.Stream()
  s.append(tempo.MetronomeMark(number=tempo_qpm))
  for pitch, dur in tokens_to_events(tokens):
    s.append(note.Rest(quarterLength=dur) if pitch is None else
             note.Note(pitch, quarterLength=dur))
  return s


def write_midi(tokens, path, tempo_qpm: float = DEFAULT_TEMPO_QPM) -> None:
  tokens_to_stream(tokens, tempo_qpm).write('midi', fp=str(path))


def midi_to_tokens(path, fold_octaves: bool = False) -> np.ndarray:
  """Canonical tokens of a monophonic MIDI file, parsed with music21.

  Onsets and ends are snapped to the 1/8 grid (music21's own quantiser knows
  nothing of our classes); for files written by write_midi the snap is a no-op.
  """
  from music21 import converter  # pylint: disable=g-import-not-at-top
  score = converter.parse(str(path), format='midi', quantizePost=False)
  snapped = []
  for midi_pitch, onset, dur in _notes_of(score, in_place=True):
    start = _snap(onset)
    end = _snap(onset + dur)
    if end > start:
      snapped.append((midi_pitch, start, end - start))
  return notes_to_tokens(snapped, fold_octaves)


def _snap(x: Fraction) -> Fraction:
  return Fraction(round(x / DURATION_GRID)) * DURATION_GRID


# ---------------------------------------------------------------------------
# Listening and looking.


def _timed_notes(tokens) -> tuple[list[tuple[int, float, float]], float]:
  """(midi, onset, duration) in quarter notes, and the total length."""
  t = 0.0
  notes = []
  for pitch, dur in tokens_to_events(tokens):
    if pitch is not None:
      notes.append((pitch, t, float(dur)))
    t += float(dur)
  return notes, t


def write_wav(tokens, path, sample_rate: int = 16000,
              tempo_qpm: float = DEFAULT_TEMPO_QPM) -> None:
  """Renders a melody with a small additive synth into a 16-bit mono WAV.

  No library renders MIDI without a soundfont we would have to download, so:
  four harmonics with 1/k amplitudes under an attack/decay/release envelope.
  """
  sec_per_quarter = 60.0 / tempo_qpm
  notes, total = _timed_notes(tokens)
  n_total = int(np.ceil((total * sec_per_quarter + 0.25) * sample_rate)) + 1
  audio = np.zeros(n_total, np.float64)
  attack, release = 0.01, 0.04  # seconds; short enough for 1/8 notes at 120 qpm
  for pitch, onset, dur in notes:
    start = int(round(onset * sec_per_quarter * sample_rate))
    n = int(round(dur * sec_per_quarter * sample_rate))
    if n < 2:
      continue
    t = np.arange(n) / sample_rate
    freq = 440.0 * 2.0 ** ((pitch - 69) / 12.0)
    tone = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 5))
    env = np.minimum(1.0, t / attack) * np.exp(-1.5 * t)
    env *= np.clip((t[-1] - t) / release, 0.0, 1.0)  # no click at note off
    audio[start:start + n] += tone * env
  peak = np.max(np.abs(audio)) if audio.size else 0.0
  if peak > 0:
    audio *= 0.8 / peak
  pcm = np.round(audio * 32767).astype('<i2')
  with wave.open(str(path), 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(pcm.tobytes())


def piano_roll_png(rows, path, titles: Sequence[str] | None = None) -> None:
  """One piano-roll panel per token row (x: quarter notes, y: MIDI pitch)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = list(rows)
  fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.8 * len(rows) + 0.4),
                           squeeze=False)
  for i, (ax, row) in enumerate(zip(axes[:, 0], rows)):
    notes, total = _timed_notes(row)
    for pitch, onset, dur in notes:
      ax.add_patch(matplotlib.patches.Rectangle(
          (onset, pitch - 0.4), dur, 0.8, color='tab:blue'))
    pitches = [p for p, _, _ in notes] or [60]
    ax.set_xlim(0, max(total, 1.0))
    ax.set_ylim(min(pitches) - 2, max(pitches) + 2)
    ax.set_ylabel('MIDI')
    if titles is not None:
      ax.set_title(titles[i], fontsize=9)
  axes[-1, 0].set_xlabel('quarter notes')
  fig.tight_layout()
  fig.savefig(str(path), dpi=80)
  plt.close(fig)


def _event_parts():
  """Per token id: (is a special, is a rest, pitch slot, duration index) of its event."""
  event_V = np.arange(VOCAB_SIZE) - specials.NUM_SPECIAL
  slot_V = event_V // NUM_DURATIONS
  return event_V < 0, slot_V == REST_SLOT, slot_V, event_V % NUM_DURATIONS


def token_features() -> dict[str, list[int]]:
  """What each token id is made of, for encoders that embed the parts too.

  {feature: value per token id}: pitch class (12 = rest), octave (0-3 above
  PITCH_LOW; 4 = rest) and duration class; the specials get a value of their
  own in each. Both halves of an event share one token, so without these an
  encoder must learn separately that 864 ids hold 12 pitch classes.
  """
  special_V, rest_V, slot_V, dur_V = _event_parts()
  out = {'pitch_class': np.where(rest_V, 12, (slot_V + PITCH_LOW) % 12),
         'octave': np.where(rest_V, NUM_PITCHES // 12, slot_V // 12),
         'duration': dur_V}
  return {name: np.where(special_V, values_V[~special_V].max() + 1, values_V).tolist()
          for name, values_V in out.items()}


def token_steps() -> dict[str, list[int]]:
  """Ordinal values whose step from one event to the next an encoder can embed.

  {'pitch': pitch slot 0..NUM_PITCHES-1 per token id, -1 for rests and specials}:
  the step between two notes is their interval in semitones (across a rest, to
  the note before it), which no single token holds.
  """
  special_V, rest_V, slot_V, _ = _event_parts()
  return {'pitch': np.where(special_V | rest_V, -1, slot_V).tolist()}


def describe_vocab() -> dict:
  """JSON-ready description stored in dataset metadata."""
  return {
      'kind': 'melody_pitch_x_duration',
      'vocab_size': VOCAB_SIZE,
      'num_special': specials.NUM_SPECIAL,
      'pitch_low': PITCH_LOW,
      'num_pitches': NUM_PITCHES,
      'rest_slot': REST_SLOT,
      'durations_quarter_length': [str(d) for d in DURATIONS],
      'rule': 'token = num_special + slot * num_durations + duration_index; '
              'slot = midi - pitch_low, or rest_slot for a rest',
  }
