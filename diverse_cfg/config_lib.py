"""The one schema every config follows, and its validation.

Config files under `configs/` start from `base_config()` and change values;
`validate()` runs before any work starts and names the offending field. A key
that is not in the schema is an error (a typo must not silently do nothing).
"""

from __future__ import annotations

from typing import Any

import ml_collections

FROM_DATA = -1  # model sizes taken from the dataset's metadata
# Guidance's plausibility threshold alpha (DESIGN.md 6) where a config or checkpoint names
# none; chosen by measurement on three datasets (docs/guidance.md).
DEFAULT_PLAUSIBILITY = 0.1


class ConfigError(ValueError):
  """A config value is wrong; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = FROM_DATA  # incl. PAD/BOS/EOS
  m.prompt_vocab_size = FROM_DATA
  m.prompt_len = FROM_DATA  # C condition tokens; 0 = unconditional model
  m.seq_len = FROM_DATA  # T target tokens (events, EOS, PAD)
  m.num_layers = 2
  m.d_model = 64
  m.num_heads = 4
  m.mlp_dim = 256
  m.tie_embeddings = True
  m.prompt_dropout = 0.2  # P(prompt -> learned null prompt) in training
  m.dtype = 'float32'  # activations; parameters stay float32
  m.rope_base = 10_000.0
  m.remat = 'none'  # 'none' | 'full' | 'dots'
  m.scan_layers = False

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = 1
  ms.fsdp = -1  # -1: whatever the devices leave
  ms.tensor = 1
  # Logical axis name -> mesh axes. Order matters (first match wins per dim).
  ms.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('vocab', 'tensor'),
      ('prompt_vocab', None),
      ('prompt_len', None),
      ('kv', None),
      ('length', None),
      ('cache_len', None),
      ('layers', None),
  )

  c.data = d = ml_collections.ConfigDict()
  d.name = 'essen_folk'  # 'essen_folk' | 'imported' (then npz_path) | an imported dataset's name
  d.data_dir = ''  # '' = $DIVERSE_CFG_DATA_DIR or ~/tensorflow_datasets
  d.npz_path = ''
  # Imported data: 'auto' records it as fixed-length when every row has the same number of
  # events (samplers then end every row there); 'yes' requires it, 'no' turns it off.
  # Read when the dataset is first imported.
  d.fixed_length = 'auto'
  d.seq_len = 128  # Essen builder: target length T (events + EOS)
  d.max_files = 0  # Essen builder subset for smoke runs; 0 = all
  d.max_tunes = 0

  # Base-model pretraining.
  c.train = _loop_section(batch_size=32, num_steps=2000, lr=1e-3, warmup_steps=100,
                          min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, log_every=20,
                          eval_every=200, eval_batches=8, ckpt_every=200, keep=3)
  # Train in packed rows (diverse_cfg/packing.py) this fraction of the batch's rows, several
  # sequences per row, whenever the batch's sequences fit them (else in its own rows): the
  # same loss and gradients, compute on real tokens. 0 = never pack. Each step computes on
  # the fewest of packed_shapes row counts (each packed_spacing of the batch's rows fewer
  # than the next; every one compiles) that hold its sequences.
  c.train.packed_rows = 0.5
  c.train.packed_shapes = 4
  c.train.packed_spacing = 1 / 32

  # CFG distillation + diversity reward. batch_size = prompts per step (P); each step samples
  # P * k sequences. eval_batches is unused (the evaluation uses eval_prompts).
  c.finetune = f = _loop_section(batch_size=8, num_steps=300, lr=1e-4, warmup_steps=10,
                                 min_lr_ratio=1.0, weight_decay=0.0, b1=0.9, b2=0.99,
                                 log_every=10, eval_every=100, eval_batches=0, ckpt_every=100,
                                 keep=2)
  # The rollouts' scoring and update, as train.packed_*: wider spacing, since a diversity
  # reward can shorten the rollouts by a third (Essen).
  f.packed_rows, f.packed_shapes, f.packed_spacing = 0.5, 4, 1 / 16
  # > 0: the rollout moves its running rows into half-size batches (down to this many) once
  # half of them are done (sampling.generate): faster on a CPU, same draws, log-probs equal
  # up to float rounding. 0 = one batch throughout.
  f.rollout_min_rows = 0
  f.betas = (0.0, 8.0)  # one student per beta: beta = 0 (quality) and beta > 0 (diversity)
  f.teacher_gamma = 3.0  # the frozen base model with CFG at this strength is the teacher
  f.kl = 'student_teacher'  # KL(student || teacher) (paper) | 'teacher_student'
  f.k = 4  # on-policy samples per prompt (>= 2; k = 2 uses other prompts as baseline)
  f.temperature = 1.0  # student sampling temperature during finetuning (1 = on-policy)
  f.eval_prompts = 32  # held-out prompts for the periodic quality/diversity evaluation
  f.eval_k = 4
  # Converged? The 90 % interval of the objective's change over the last plateau_window of the
  # steps lies within +-plateau_tol of its mean (diverse_cfg/convergence.py); reported, never
  # enforced. The objective (the on-policy KL on the first objective_prompts validation prompts,
  # rounded down to a multiple of batch_size, with objective_rollouts // prompts rollouts each
  # (at least 1), the same keys each time: fewer prompts, more rollouts each) is read at the
  # window's first logged step and the last; objective_prompts = 0: not read,
  # and the verdict falls back on the proxies: the held-out KL (teacher-forced every
  # heldout_every steps, a multiple of log_every, on the first heldout_sequences validation
  # sequences) and the per-step on-policy KL.
  f.objective_prompts, f.objective_rollouts = 256, 1024
  f.heldout_sequences, f.heldout_every = 128, 20
  f.plateau_window = 0.5
  f.plateau_tol = 0.1

  # How the CFG teacher guides, wherever it appears: finetuning's teacher scoring, the
  # evaluation's CFG sweep (and `sample`'s default, through the checkpoint's config).
  c.guidance = g = ml_collections.ConfigDict()
  # alpha in [0, 1): only tokens with p_cond >= alpha * max p_cond are guided, the others keep
  # their conditional log-prob; 0 = plain CFG (every token guided).
  g.plausibility = DEFAULT_PLAUSIBILITY

  c.evaluate = e = ml_collections.ConfigDict()  # the quality/diversity comparison
  e.gammas = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)  # CFG sweep on the base model
  e.lambdas = (0.0, 0.25, 0.5, 0.75, 1.0)  # LERP merges of the beta-min and beta-max students
  e.num_prompts = 64  # held-out (test split) prompts
  e.k = 4  # generations per prompt
  e.temperature = 1.0
  e.render_prompts = 3  # prompts whose samples are shown in the report
  # How samples are shown (diverse_cfg/report.py): auto | melody | tokens | pkg.module:function
  e.renderer = 'auto'
  e.ngram = 2  # n for the model-free shared n-gram diversity measure
  e.level = 0.95  # confidence of every interval and claim verdict (diverse_cfg/claims.py)
  e.bootstrap_resamples = 1000  # bootstrap draws over prompts (seeded by the config's seed)
  e.match_margin = 0.02  # claim 2: the student "matches" CFG if its quality is > CFG's - margin

  # The frozen evaluators, trained on real data only (diverse_cfg/evaluators/).
  c.embedder = em = _evaluator_section()  # contrastive embedder: the diversity reward
  em.emb_dim = 64  # output (unit vector) size
  em.chunk_len = 32  # events per contrastive chunk (less when a piece is shorter than 2x this)
  em.temperature = 0.1  # InfoNCE temperature (the initial one if learned)
  em.learn_temperature = True

  c.classifier = cl = _evaluator_section()  # prompt-adherence classifier: the quality score
  # Filled from the dataset (leave empty): classes per attribute, the attributes'
  # prompt-id offsets and names. Stored in the checkpoint's config so that the
  # classifier loads without the dataset.
  cl.num_classes = ()
  cl.prompt_offsets = ()
  cl.attribute_names = ()
  # Start the encoder from the trained embedder's (DIR/embedder; same encoder sizes): the
  # contrastive pretraining on the same real data helps most where labels are few.
  cl.init_from_embedder = True
  # Class weights in the loss, (training frequency)^-class_balance, normalised to mean 1 over
  # the training labels: 0 = plain cross-entropy, 1 = every class weighs as much in total.
  cl.class_balance = 0.0
  # Train on sequences packed several per row into this fraction of the batch's rows whenever
  # they fit (attention within a sequence; the same loss and gradients), as train.packed_*.
  cl.packed_rows, cl.packed_shapes, cl.packed_spacing = 0.5, 4, 1 / 32
  return c



def _loop_section(*, batch_size, num_steps, lr, warmup_steps, min_lr_ratio, weight_decay, b1, b2,
                  log_every, eval_every, eval_batches, ckpt_every, keep, grad_clip=1.0,
                  peak_flops=150e9, decay_steps=0) -> ml_collections.ConfigDict:
  """The optimiser and loop fields every training stage has (training.run reads them).

  batch_size is global; the schedule is linear warmup then cosine decay to
  lr * min_lr_ratio at step decay_steps (0: num_steps), held there after it;
  eval_batches = 0 means the whole validation split;
  peak_flops is per device, for MFU (default: a 2048^2 f32 matmul measured here).
  """
  return ml_collections.ConfigDict(dict(
      batch_size=batch_size, num_steps=num_steps, lr=lr, warmup_steps=warmup_steps,
      min_lr_ratio=min_lr_ratio, decay_steps=decay_steps, weight_decay=weight_decay, b1=b1,
      b2=b2, grad_clip=grad_clip,
      log_every=log_every, eval_every=eval_every, eval_batches=eval_batches,
      ckpt_every=ckpt_every, keep=keep, peak_flops=peak_flops))


def _evaluator_section() -> ml_collections.ConfigDict:
  """Encoder sizes + the loop fields (one optimiser per evaluator)."""
  s = _loop_section(batch_size=64, num_steps=1000, lr=1e-3, warmup_steps=50, min_lr_ratio=0.1,
                    weight_decay=0.05, b1=0.9, b2=0.98, log_every=20, eval_every=250,
                    eval_batches=0, ckpt_every=250, keep=2)
  s.num_layers = 2
  s.d_model = 64
  s.num_heads = 4
  s.mlp_dim = 256
  s.dtype = 'float32'
  s.rope_base = 10_000.0
  # Token features embedded besides each token (data.meta.TOKEN_FEATURES): '' = the
  # dataset's own ('melody_steps' for Essen: pitch class, octave, duration, and the interval
  # from the previous note; 'melody' without the interval), or 'none'.
  s.token_features = ''
  return s

_DTYPES = ('float32', 'bfloat16')
_REMAT = ('none', 'full', 'dots')


def _check_keys(cfg: Any, ref: Any, path: str) -> None:
  if not isinstance(ref, ml_collections.ConfigDict):
    return
  if not isinstance(cfg, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f'config{path} must be a section, got {cfg!r}')
  unknown = sorted(set(cfg.keys()) - set(ref.keys()))
  if unknown:
    raise ConfigError(
        f'unknown config key(s) {", ".join("config" + path + "." + k for k in unknown)}; '
        f'valid keys in config{path or " (top level)"}: {", ".join(sorted(ref.keys()))}')
  for k in ref.keys():
    if k in cfg:
      _check_keys(cfg[k], ref[k], f'{path}.{k}')


def _require(cond: bool, field: str, msg: str, value: Any) -> None:
  if not cond:
    raise ConfigError(f'config.{field}={value!r}: {msg}')


def validate_model(m: ml_collections.ConfigDict, *, sizes_known: bool = True) -> None:
  if sizes_known:
    for f in ('vocab_size', 'prompt_vocab_size', 'seq_len'):
      _require(m[f] > 0, f'model.{f}', 'must be positive (or set from the dataset)', m[f])
    _require(m.prompt_len >= 0, 'model.prompt_len', 'must be >= 0', m.prompt_len)
  for f in ('num_layers', 'd_model', 'num_heads', 'mlp_dim'):
    _require(m[f] > 0, f'model.{f}', 'must be positive', m[f])
  _require(m.d_model % m.num_heads == 0, 'model.num_heads',
           f'must divide config.model.d_model={m.d_model}', m.num_heads)
  _require((m.d_model // m.num_heads) % 2 == 0, 'model.num_heads',
           'head dim d_model/num_heads must be even for rotary positions', m.num_heads)
  _require(0.0 <= m.prompt_dropout < 1.0, 'model.prompt_dropout', 'must be in [0, 1)',
           m.prompt_dropout)
  _require(m.dtype in _DTYPES, 'model.dtype', f'must be one of {_DTYPES}', m.dtype)
  _require(m.remat in _REMAT, 'model.remat', f'must be one of {_REMAT}', m.remat)


def validate_train(t: ml_collections.ConfigDict, section: str = 'train') -> None:
  for f in ('batch_size', 'num_steps', 'log_every', 'eval_every', 'ckpt_every', 'keep'):
    _require(t[f] > 0, f'{section}.{f}', 'must be positive', t[f])
  _require(t.lr > 0, f'{section}.lr', 'must be positive', t.lr)
  _require(0 <= t.warmup_steps, f'{section}.warmup_steps', 'must be >= 0', t.warmup_steps)
  _require(t.decay_steps == 0 or t.warmup_steps < t.decay_steps <= t.num_steps,
           f'{section}.decay_steps', f'must be 0 (decay until num_steps) or in '
           f'({section}.warmup_steps, {section}.num_steps]', t.decay_steps)
  _require(0 <= t.min_lr_ratio <= 1, f'{section}.min_lr_ratio', 'must be in [0, 1]', t.min_lr_ratio)
  _require(t.grad_clip > 0, f'{section}.grad_clip', 'must be positive', t.grad_clip)
  _require(t.eval_batches >= 0, f'{section}.eval_batches', 'must be >= 0', t.eval_batches)
  if 'packed_rows' in t:
    _require(0 <= t.packed_rows <= 1, f'{section}.packed_rows',
             'must be in [0, 1] (a fraction of the batch\'s rows; 0 = never pack)', t.packed_rows)
  if 'packed_shapes' in t:
    _require(isinstance(t.packed_shapes, int) and t.packed_shapes >= 1, f'{section}.packed_shapes',
             'must be an integer >= 1 (packed row counts that compile)', t.packed_shapes)
  if 'packed_spacing' in t:
    _require(0 < t.packed_spacing <= 1, f'{section}.packed_spacing',
             'must be in (0, 1] (a fraction of the batch\'s rows)', t.packed_spacing)


def validate_finetune(f: ml_collections.ConfigDict) -> None:
  validate_train(f, 'finetune')
  min_rows = f.get('rollout_min_rows', 0)
  _require(isinstance(min_rows, int) and min_rows >= 0, 'finetune.rollout_min_rows',
           'must be an integer >= 0 (0 = no compaction)', min_rows)
  betas = tuple(f.betas)
  _require(len(betas) >= 1 and all(b >= 0 for b in betas), 'finetune.betas',
           'must be a non-empty tuple of values >= 0', betas)
  _require(f.teacher_gamma >= 0, 'finetune.teacher_gamma', 'CFG strength must be >= 0',
           f.teacher_gamma)
  _require(f.kl in ('student_teacher', 'teacher_student'), 'finetune.kl',
           "must be 'student_teacher' (KL(student||teacher), the paper's) or 'teacher_student'",
           f.kl)
  _require(f.k >= 2, 'finetune.k', 'the diversity reward needs >= 2 samples per prompt', f.k)
  _require(0 < f.plateau_window <= 1, 'finetune.plateau_window', 'must lie in (0, 1]',
           f.plateau_window)
  _require(f.plateau_tol > 0, 'finetune.plateau_tol', 'must be > 0', f.plateau_tol)
  _require(f.objective_prompts >= 0, 'finetune.objective_prompts', 'must be >= 0 (0: not read)',
           f.objective_prompts)
  _require(f.objective_rollouts >= 1, 'finetune.objective_rollouts', 'must be >= 1',
           f.objective_rollouts)
  _require(f.heldout_sequences >= 2, 'finetune.heldout_sequences',
           'must be >= 2 (the held-out KL\'s interval comes from their spread)',
           f.heldout_sequences)
  _require(f.heldout_every > 0 and f.heldout_every % f.log_every == 0, 'finetune.heldout_every',
           f'must be a positive multiple of finetune.log_every ({f.log_every})', f.heldout_every)
  _require(f.k >= 3 or f.batch_size >= 2, 'finetune.batch_size',
           'k = 2 needs >= 2 prompts per step (their pairs form the baseline)', f.batch_size)
  _require(f.temperature > 0, 'finetune.temperature', 'must be > 0', f.temperature)
  _require(f.eval_prompts > 0 and f.eval_k >= 2, 'finetune.eval_k',
           'evaluation needs eval_prompts > 0 and eval_k >= 2', (f.eval_prompts, f.eval_k))


def validate_evaluate(e: ml_collections.ConfigDict) -> None:
  _require(all(g >= 0 for g in e.gammas), 'evaluate.gammas', 'CFG strengths must be >= 0',
           tuple(e.gammas))
  _require(all(0 <= l <= 1 for l in e.lambdas), 'evaluate.lambdas', 'must lie in [0, 1]',
           tuple(e.lambdas))
  _require(e.num_prompts > 0, 'evaluate.num_prompts', 'must be positive', e.num_prompts)
  _require(e.k >= 2, 'evaluate.k', 'diversity needs >= 2 generations per prompt', e.k)
  _require(e.temperature > 0, 'evaluate.temperature', 'must be > 0', e.temperature)
  _require(e.ngram >= 1, 'evaluate.ngram', 'must be >= 1', e.ngram)
  _require(e.renderer in ('auto', 'melody', 'tokens') or ':' in e.renderer, 'evaluate.renderer',
           "must be 'auto', 'melody', 'tokens' or 'pkg.module:function'", e.renderer)
  _require(0 < e.level < 1, 'evaluate.level', 'must lie in (0, 1)', e.level)
  _require(e.bootstrap_resamples >= 100, 'evaluate.bootstrap_resamples',
           'an interval needs >= 100 draws', e.bootstrap_resamples)
  _require(e.match_margin >= 0, 'evaluate.match_margin', 'must be >= 0', e.match_margin)



def _validate_encoder(s: ml_collections.ConfigDict, section: str) -> None:
  validate_train(s, section)
  for f in ('num_layers', 'd_model', 'num_heads', 'mlp_dim'):
    _require(s[f] > 0, f'{section}.{f}', 'must be positive', s[f])
  _require(s.d_model % s.num_heads == 0, f'{section}.num_heads',
           f'must divide config.{section}.d_model={s.d_model}', s.num_heads)
  _require((s.d_model // s.num_heads) % 2 == 0, f'{section}.num_heads',
           'head dim d_model/num_heads must be even for rotary positions', s.num_heads)
  _require(s.dtype in _DTYPES, f'{section}.dtype', f'must be one of {_DTYPES}', s.dtype)


def validate_embedder(e: ml_collections.ConfigDict) -> None:
  _validate_encoder(e, 'embedder')
  _require(e.emb_dim > 0, 'embedder.emb_dim', 'must be positive', e.emb_dim)
  _require(e.chunk_len >= 1, 'embedder.chunk_len', 'must be >= 1', e.chunk_len)
  _require(e.temperature > 0, 'embedder.temperature', 'must be > 0', e.temperature)
  _require(e.batch_size >= 2, 'embedder.batch_size', 'contrastive training needs >= 2 pieces '
           'per batch (the others are the negatives)', e.batch_size)


def validate_classifier(c: ml_collections.ConfigDict) -> None:
  _validate_encoder(c, 'classifier')
  n = len(c.num_classes)
  _require(all(k >= 1 for k in c.num_classes), 'classifier.num_classes',
           'must be >= 1 per attribute (leave empty: taken from the dataset)', tuple(c.num_classes))
  _require(len(c.prompt_offsets) == n and len(c.attribute_names) in (0, n),
           'classifier.prompt_offsets', f'needs one entry per attribute ({n}); leave '
           'num_classes, prompt_offsets and attribute_names empty to take them from the dataset',
           tuple(c.prompt_offsets))
  _require(c.class_balance >= 0, 'classifier.class_balance',
           'must be >= 0 (0 = plain cross-entropy, 1 = classes weigh equally)', c.class_balance)

def validate_batch(batch_size: int, field: str, mesh_cfg, num_devices: int) -> None:
  shards = 1
  for a in ('data', 'fsdp'):
    n = mesh_cfg[a]
    shards *= num_devices // _fixed_product(mesh_cfg) if n == -1 else n
  _require(batch_size % shards == 0, field,
           f'must be a multiple of the data*fsdp mesh size {shards}', batch_size)


def _fixed_product(mesh_cfg) -> int:
  out = 1
  for a in ('data', 'fsdp', 'tensor'):
    out *= max(mesh_cfg[a], 1)
  return out


FIXED_LENGTH_OPTIONS = {'auto': None, 'yes': True, 'no': False}


def validate_data(d: ml_collections.ConfigDict) -> None:
  _require(d.fixed_length in FIXED_LENGTH_OPTIONS, 'data.fixed_length',
           f'must be one of {sorted(FIXED_LENGTH_OPTIONS)}', d.fixed_length)


def validate_guidance(g: ml_collections.ConfigDict) -> None:
  _require(0.0 <= g.plausibility < 1.0, 'guidance.plausibility',
           'must be in [0, 1) (0 = plain CFG: every token guided)', g.plausibility)


def validate_mesh(ms: ml_collections.ConfigDict, num_devices: int) -> None:
  sizes = {a: ms[a] for a in ('data', 'fsdp', 'tensor')}
  for a, n in sizes.items():
    _require(n == -1 or n >= 1, f'mesh.{a}', 'must be >= 1 or -1', n)
  free = [a for a, n in sizes.items() if n == -1]
  _require(len(free) <= 1, 'mesh', f'at most one mesh axis may be -1 ({" and ".join(free)} are)',
           dict(sizes))
  fixed = _fixed_product(ms)
  if free:
    _require(num_devices % fixed == 0, f'mesh.{free[0]}',
             f'cannot fill {num_devices} devices: the other axes take {fixed}', -1)
  else:
    _require(fixed == num_devices, 'mesh',
             f'data*fsdp*tensor = {fixed} does not match the {num_devices} devices present',
             dict(sizes))


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, *,
             sizes_known: bool = True, reference: ml_collections.ConfigDict | None = None) -> None:
  """Raises ConfigError naming the first bad field. Call before any work."""
  _check_keys(cfg, reference if reference is not None else base_config(), '')
  validate_model(cfg.model, sizes_known=sizes_known)
  validate_guidance(cfg.guidance)
  validate_data(cfg.data)
  validate_train(cfg.train)
  validate_finetune(cfg.finetune)
  validate_evaluate(cfg.evaluate)
  validate_embedder(cfg.embedder)
  validate_classifier(cfg.classifier)
  if num_devices is not None:
    validate_mesh(cfg.mesh, num_devices)
    validate_batch(cfg.train.batch_size, 'train.batch_size', cfg.mesh, num_devices)
    validate_batch(cfg.embedder.batch_size, 'embedder.batch_size', cfg.mesh, num_devices)
    validate_batch(cfg.classifier.batch_size, 'classifier.batch_size', cfg.mesh, num_devices)
    validate_batch(cfg.finetune.batch_size, 'finetune.batch_size', cfg.mesh, num_devices)
    validate_batch(cfg.finetune.eval_prompts * cfg.finetune.eval_k, 'finetune.eval_prompts',
                   cfg.mesh, num_devices)
    validate_batch(cfg.evaluate.num_prompts * cfg.evaluate.k, 'evaluate.num_prompts', cfg.mesh,
                   num_devices)
