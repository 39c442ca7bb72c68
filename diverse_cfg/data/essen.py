"""`essen_folk`: the Essen folk-song collection shipped inside music21, as TFDS.

Source: `music21/corpus/essenFolksong/*.abc` (31 files, 8514 tunes); nothing
is downloaded. Each tune is parsed with music21's ABC reader, tokenised with
`melody` (one token per pitch x duration event), and given a prompt of three
attributes read from its headers:

  region  O: origin, grouped by ordered keyword rules (REGION_RULES) into
          german_speaking (Germany, Lorraine, Luxembourg, Austria,
          Switzerland), china, eastern_europe, and 'other' for the rest.
          Version 1.0.0 split the German-speaking group by origin
          (lorraine, luxembourg, germany, alpine); those are one repertoire
          that neither the classifier nor a tree probe on hand-made features
          told apart well (7-way accuracy 0.75-0.78 against a majority rate
          of 0.65; README, "Results"), so a prompt naming one of them asked
          for something the quality score could hardly check.
  meter   M: header: 2/4, 3/4, 4/4, 6/8, else 'other' (incl. 'none', 3/8, 4/2).
  mode    K: in Essen is a key signature, not a key (only 16 of 8514 headers
          name a mode), so the mode is the degree of the tune's final note in
          the signature's major scale: 1 major, 6 minor, 2 dorian, 3 phrygian,
          5 mixolydian, anything else 'other'.

Examples: `tokens` int32 [seq_len] (events, EOS, PAD...), `prompt` int32 [3]
(flattened with per-attribute offsets, see meta.py), `length` int32 (events
before EOS), `tune_id` text '<file stem>/<X number>'.

Skipped and counted by reason (info.metadata['stats']['skipped']): tunes music21
cannot parse, durations outside melody.DURATIONS, tunes longer than seq_len - 1
events (skipped, not truncated: every example is a whole tune whose EOS means
"the tune ends here"), and exact duplicates (same tokens and prompt).

Split: a stable hash of the transposition-invariant melody (pitch relative to
the first note, duration class) -> 90/5/5 train/validation/test, so transposed
copies of a tune never straddle splits (meta.hash_split).

Parsing all files takes over a minute (music21 is slow: 75 s wall on 2 cores
for the full set, without its engraving beams; BENCHMARKS.md), so the build
parses files in spawned worker processes and
is cached under data_dir: only the first call pays. Spawned workers re-import
the caller's __main__, so call it from under `if __name__ == '__main__':` (or
pass num_workers=1). Configs with files/max_files/max_tunes build small
subsets in seconds for tests.
"""

from __future__ import annotations

import collections
from concurrent import futures
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from diverse_cfg import specials
from diverse_cfg.data import melody
from diverse_cfg.data import meta

DATASET_NAME = 'essen_folk'

# Ordered: the first rule whose keyword occurs in the lower-cased O: header
# wins, so 'Deutschland / Polen, Schlesien' is german_speaking.
REGION_RULES = (
    ('german_speaking', ('deutschland', 'lothring', 'luxemb', 'oesterreich',
                         'schweiz', 'tirol', 'steiermark', 'kaernten',
                         'salzburg', 'vorarlberg')),
    ('china', ('china', 'taiwan', 'yunnan', 'hunan')),
    ('eastern_europe', ('osteuropa', 'suedosteuropa', 'jugoslaw', 'udssr',
                        'ungarn', 'tschech', 'rumaen', 'polen', 'russ')),
)
REGIONS = tuple(r for r, _ in REGION_RULES) + ('other',)
METERS = ('2/4', '3/4', '4/4', '6/8', 'other')
MODES = ('major', 'minor', 'dorian', 'phrygian', 'mixolydian', 'other')
ATTRIBUTES = (('region', REGIONS), ('meter', METERS), ('mode', MODES))

# Semitones above the signature's major tonic -> mode of a tune ending there.
_FINAL_DEGREE_MODE = {0: 'major', 9: 'minor', 2: 'dorian', 4: 'phrygian',
                      7: 'mixolydian'}


def region_of(origin: str) -> str:
  o = origin.lower()
  for region, keywords in REGION_RULES:
    if any(k in o for k in keywords):
      return region
  return 'other'


def meter_of(meter_header: str) -> str:
  m = meter_header.strip().rstrip(']').strip()
  return m if m in METERS else 'other'


def mode_of(sharps: int, final_midi: int) -> str:
  major_tonic = (7 * sharps) % 12
  return _FINAL_DEGREE_MODE.get((final_midi - major_tonic) % 12, 'other')


def melody_split_key(tokens) -> bytes:
  """Transposition-invariant bytes of a melody: (relative pitch, duration)."""
  rows = []
  first = None
  for t in melody.event_ids(tokens):
    e = int(t) - specials.NUM_SPECIAL
    slot, d = divmod(e, melody.NUM_DURATIONS)
    if slot == melody.REST_SLOT:
      rel = 1000  # a rest, distinct from every relative pitch
    else:
      first = slot if first is None else first
      rel = slot - first
    rows.append((rel, d))
  return np.asarray(rows, np.int32).tobytes()


def corpus_dir() -> str:
  import music21  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(music21.__file__), 'corpus',
                      'essenFolksong')


def abc_files(files=None, max_files=None) -> list[str]:
  names = sorted(f for f in os.listdir(corpus_dir()) if f.endswith('.abc'))
  if files is not None:
    missing = sorted(set(files) - set(names))
    if missing:
      raise ValueError(f'unknown Essen files {missing}; have {names}')
    names = [f for f in names if f in set(files)]
  return names[:max_files] if max_files is not None else names


def _read_text(path: str) -> str:
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError:  # the Essen files are mostly latin-1
    return raw.decode('latin-1')


@contextlib.contextmanager
def _without_beaming():
  """music21's ABC reader beams every tune's eighth notes for engraving (Stream.makeBeams),
  a quarter of the time a tune takes to parse; beams hold no pitch, onset or duration, so
  the tokens are the same without them (the full corpus gives identical records)."""
  from music21 import stream  # pylint: disable=g-import-not-at-top
  make_beams = stream.Stream.makeBeams
  stream.Stream.makeBeams = lambda self, *args, **kwargs: None
  try:
    yield
  finally:
    stream.Stream.makeBeams = make_beams


def parse_file(file_name: str, max_tunes: int | None = None) -> list[dict]:
  """Parses one ABC file tune by tune (one bad tune costs only itself).

  Returns one record per tune: headers, and either `tokens` with `sharps` and
  `final_midi`, or a `skip` reason. Runs in Pool workers: plain data out.
  """
  with _without_beaming():
    return _parse_tunes(file_name, max_tunes)


def _parse_tunes(file_name: str, max_tunes: int | None) -> list[dict]:
  from music21 import abcFormat  # pylint: disable=g-import-not-at-top
  from music21.abcFormat import translate  # pylint: disable=g-import-not-at-top
  stem = file_name[:-len('.abc')]
  handler = abcFormat.ABCFile().readstr(
      _read_text(os.path.join(corpus_dir(), file_name)))
  by_number = handler.splitByReferenceNumber()
  numbers = sorted(n for n in by_number if n is not None)
  if max_tunes is not None:
    numbers = numbers[:max_tunes]
  records = []
  for number in numbers:
    tune = by_number[number]
    headers = {}
    for tok in tune.tokens:
      if isinstance(tok, abcFormat.ABCMetadata) and tok.tag not in headers:
        headers[tok.tag] = tok.data.strip()
    rec = {'tune_id': f'{stem}/{number:04d}', 'origin': headers.get('O', ''),
           'meter_header': headers.get('M', ''),
           'key_header': headers.get('K', ''),
           'essen_code': headers.get('N', ''), 'skip': None}
    try:
      score = translate.abcToStreamScore(tune)
    except Exception as e:  # pylint: disable=broad-except
      # music21 raises many exception types on odd ABC; any of them = skip.
      rec['skip'] = 'parse_error'
      rec['error'] = repr(e)[:200]
      records.append(rec)
      continue
    try:
      rec['tokens'] = melody.stream_to_tokens(score, in_place=True)
    except melody.UnsupportedMelodyError as e:
      rec['skip'] = e.reason
      records.append(rec)
      continue
    signatures = list(score.flatten().getElementsByClass('KeySignature'))
    rec['sharps'] = signatures[0].sharps if signatures else None
    events = melody.tokens_to_events(rec['tokens'])  # canonical: ends on a note
    rec['final_midi'] = events[-1][0]
    records.append(rec)
  return records


def _parse_file_star(args):
  return parse_file(*args)


def parse_corpus(files: list[str], max_tunes=None, num_workers: int = 2):
  """Records of all files, in (file, X) order whatever the worker timing."""
  jobs = [(f, max_tunes) for f in files]
  if num_workers > 1 and len(files) > 1:
    # Largest files first so the workers finish together. Spawn rather than
    # fork because the parent may already run JAX threads; spawn re-imports the
    # caller's __main__, and a ProcessPoolExecutor fails fast (where a Pool
    # would respawn crashing workers forever) if that main is unguarded.
    sizes = {f: os.path.getsize(os.path.join(corpus_dir(), f)) for f in files}
    jobs.sort(key=lambda j: -sizes[j[0]])
    ctx = multiprocessing.get_context('spawn')
    try:
      with futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        results = list(pool.map(_parse_file_star, jobs))
    except futures.process.BrokenProcessPool as e:
      raise RuntimeError(
          'essen_folk parse workers died; if this runs from a script, call it '
          "under `if __name__ == '__main__':` (workers are spawned), or build "
          'with num_workers=1') from e
  else:
    results = [_parse_file_star(j) for j in jobs]
  records = [r for recs in results for r in recs]
  records.sort(key=lambda r: r['tune_id'])
  return records


def _encode_attrs(values: dict) -> np.ndarray:
  out = []
  offset = 0
  for name, names in ATTRIBUTES:
    out.append(offset + names.index(values[name]))
    offset += len(names)
  return np.asarray(out, np.int32)


def select_examples(records: list[dict], seq_len: int):
  """Examples per split and the statistics of what was kept and why not."""
  skipped = collections.Counter(r['skip'] for r in records if r['skip'])
  splits = {s: [] for s in meta.SPLITS}
  seen = set()
  kept_attrs = {name: collections.Counter() for name, _ in ATTRIBUTES}
  origins = collections.defaultdict(collections.Counter)
  lengths = []
  for r in records:
    if r['skip']:
      continue
    events = r['tokens']
    if len(events) > seq_len - 1:
      skipped['too_long'] += 1
      continue
    if r['sharps'] is None:
      skipped['no_key_signature'] += 1
      continue
    attrs = {'region': region_of(r['origin']),
             'meter': meter_of(r['meter_header']),
             'mode': mode_of(r['sharps'], r['final_midi'])}
    prompt = _encode_attrs(attrs)
    dedup_key = events.tobytes() + prompt.tobytes()
    if dedup_key in seen:
      skipped['duplicate'] += 1
      continue
    seen.add(dedup_key)
    tokens = np.full((seq_len,), specials.PAD, np.int32)
    tokens[:len(events)] = events
    tokens[len(events)] = specials.EOS
    split = meta.hash_split(melody_split_key(events))
    splits[split].append((r['tune_id'], {
        'tokens': tokens, 'prompt': prompt, 'length': np.int32(len(events)),
        'tune_id': r['tune_id']}))
    for name, _ in ATTRIBUTES:
      kept_attrs[name][attrs[name]] += 1
    origins[attrs['region']][r['origin']] += 1
    lengths.append(len(events))
  lengths = np.asarray(lengths or [0])
  stats = {
      'tunes_seen': len(records),
      'parsed': sum(r['skip'] != 'parse_error' for r in records),
      'kept': int(sum(len(v) for v in splits.values())),
      'skipped': dict(sorted(skipped.items())),
      'split_sizes': {s: len(v) for s, v in splits.items()},
      'attribute_counts': {
          k: dict(c.most_common()) for k, c in kept_attrs.items()},
      'top_origins_per_region': {
          reg: dict(c.most_common(5)) for reg, c in sorted(origins.items())},
      'length_percentiles': {
          str(q): float(np.percentile(lengths, q))
          for q in (0, 5, 25, 50, 75, 95, 100)},
      'length_mean': float(lengths.mean()),
  }
  return splits, stats


@dataclasses.dataclass(eq=False)
class EssenFolkConfig(tfds.core.BuilderConfig):
  """seq_len includes the EOS; files/max_files/max_tunes select a subset."""
  seq_len: int = 128
  files: tuple[str, ...] | None = None
  max_files: int | None = None
  max_tunes: int | None = None  # per file, in X order
  num_workers: int = 2  # does not change the data, only the build time


def config_name(seq_len=128, files=None, max_files=None, max_tunes=None) -> str:
  """Name that identifies the data a config produces (its cache directory)."""
  name = f'seq{seq_len}'
  if files is not None:
    name += '_' + '_'.join(f[:-len('.abc')] for f in sorted(files))
  if max_files is not None:
    name += f'_files{max_files}'
  if max_tunes is not None:
    name += f'_tunes{max_tunes}'
  return name


class EssenFolk(tfds.core.GeneratorBasedBuilder):
  """Essen folk songs: melody tokens with region/meter/mode prompts."""

  # TFDS's default code_path probes the optional `importlib_resources` backport
  # (absent here) for builders inside a package; it only locates checksums.
  code_path = epath.Path(__file__)

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'pitch x duration tokens, 3 attributes.',
      '2.0.0': 'region: the four German-speaking groups are one (7 -> 4 regions).',
  }
  BUILDER_CONFIGS = [EssenFolkConfig(name='seq128', seq_len=128),
                     EssenFolkConfig(name='seq64', seq_len=64)]
  DEFAULT_CONFIG_NAME = 'seq128'

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs would look for README,
    # CITATIONS etc. next to this module.
    seq_len = self.builder_config.seq_len
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'tokens': tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
            'prompt': tfds.features.Tensor(shape=(len(ATTRIBUTES),),
                                           dtype=np.int32),
            'length': tfds.features.Scalar(dtype=np.int32),
            'tune_id': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with music21
    cfg = self.builder_config
    files = abc_files(cfg.files, cfg.max_files)
    start = time.time()
    records = parse_corpus(files, cfg.max_tunes, cfg.num_workers)
    splits, stats = select_examples(records, cfg.seq_len)
    stats['files'] = files
    stats['parse_seconds'] = round(time.time() - start, 1)
    logging.info('essen_folk: parsed %d files in %.1fs; kept %d of %d tunes; '
                 'skipped %s; splits %s', len(files), stats['parse_seconds'],
                 stats['kept'], stats['tunes_seen'], stats['skipped'],
                 stats['split_sizes'])
    self.info.metadata.update(meta.metadata_dict(
        name=DATASET_NAME,
        vocab_size=melody.VOCAB_SIZE,
        seq_len=cfg.seq_len,
        attribute_names=[n for n, _ in ATTRIBUTES],
        attribute_sizes=[len(v) for _, v in ATTRIBUTES],
        attribute_values=[list(v) for _, v in ATTRIBUTES],
        is_melody=True,
        split_sizes=stats['split_sizes'],
        extra={
            'token_vocab': melody.describe_vocab(),
            'attribute_rules': {
                'region': {r: list(k) for r, k in REGION_RULES},
                'meter': 'M: header if in METERS else other',
                'mode': 'final note degree above the K: signature major tonic: '
                        + str(_FINAL_DEGREE_MODE) + ', else other',
            },
            'stats': stats,
        }))
    # TFDS refuses to write an empty split; a tiny subset may leave one empty.
    return {s: self._generate_examples(ex) for s, ex in splits.items() if ex}

  def _generate_examples(self, examples):
    yield from examples


def make_builder(data_dir: str, seq_len: int = 128, files=None,
                 max_files: int | None = None, max_tunes: int | None = None,
                 num_workers: int = 2) -> EssenFolk:
  """The builder for one subset/seq_len (its config name keys the cache)."""
  name = config_name(seq_len, files, max_files, max_tunes)
  predefined = EssenFolk.builder_configs.get(name)
  if predefined is not None:
    # TFDS forbids a custom config under a predefined name; the worker count
    # does not change the data, so setting it on the predefined one is safe.
    predefined.num_workers = num_workers
    return EssenFolk(config=name, data_dir=data_dir)
  return EssenFolk(data_dir=data_dir, config=EssenFolkConfig(
      name=name, version=EssenFolk.VERSION, seq_len=seq_len,
      files=None if files is None else tuple(sorted(files)),
      max_files=max_files, max_tunes=max_tunes, num_workers=num_workers))


def prepare(builder: EssenFolk) -> None:
  """download_and_prepare (a no-op once built) that leaves nothing else behind.

  Nothing is downloaded, so TFDS's downloads/ dir goes to a temporary place.
  After a failed build, the empty directories and the builder-level .config
  TFDS wrote are removed again (if no other config of essen_folk is built).
  """
  try:
    with tempfile.TemporaryDirectory() as tmp:
      builder.download_and_prepare(file_format='array_record', download_dir=tmp)
  except BaseException:
    builder_dir = os.path.join(str(builder.data_dir_root), builder.name)
    if os.path.isdir(builder_dir):
      for root, _, _ in os.walk(builder_dir, topdown=False):
        if root != builder_dir and not os.listdir(root):
          os.rmdir(root)
      if set(os.listdir(builder_dir)) <= {'.config'}:
        shutil.rmtree(builder_dir)
    raise
