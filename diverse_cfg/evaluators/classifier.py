"""The prompt-adherence classifier: the quality score (the MuLan-adherence analogue).

Given a token sequence it predicts every prompt attribute (one softmax per
attribute). The quality of a generation for a prompt is the mean over
attributes of the probability the classifier gives the prompt's value.
Trained on real sequences with their real prompts only.

Attributes come from the dataset's metadata: per-attribute sizes and prompt-id
offsets; a dataset whose prompt positions share one vocabulary (imported,
shared_prompt_vocab, all offsets 0) has one attribute per prompt position with
prompt_vocab_size classes each.

    python -m diverse_cfg.main --stage=classifier --config=configs/essen.py:cpu --workdir=DIR
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diverse_cfg import checkpoints
from diverse_cfg import config_lib
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import packing
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import training
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import pipeline
from diverse_cfg.evaluators import embedder as embedder_lib
from diverse_cfg.evaluators import encoder
from diverse_cfg.evaluators import interface
from diverse_cfg.evaluators import metrics
from diverse_cfg.evaluators import stage

BATCH_KEYS = ('tokens', 'prompt')


def attributes_of(meta) -> dict[str, tuple]:
  """The classifier's targets for a dataset: classes, prompt offsets, names per attribute."""
  shared = bool(meta.metadata.get('shared_prompt_vocab', False))
  c = meta.prompt_len
  if shared:  # one vocabulary at every position: each position is a prompt_vocab_size-way label
    return {'num_classes': (meta.prompt_vocab_size,) * c, 'prompt_offsets': (0,) * c,
            'attribute_names': tuple(meta.attribute_names)}
  return {'num_classes': tuple(meta.attribute_sizes),
          'prompt_offsets': tuple(meta.attribute_offsets),
          'attribute_names': tuple(meta.attribute_names)}


def fill_attributes(config: ml_collections.ConfigDict, meta) -> None:
  """Sets classifier.{num_classes, prompt_offsets, attribute_names} from the data (if empty)."""
  want = attributes_of(meta)
  cl = config.classifier
  for field, value in want.items():
    have = tuple(cl[field])
    if not have:
      cl[field] = value
    elif have != value:
      raise config_lib.ConfigError(
          f'config.classifier.{field}={have} but dataset {meta.name!r} gives {value}; leave it '
          'empty to take it from the data')
  if not want['num_classes']:
    raise config_lib.ConfigError(f'dataset {meta.name!r} has no prompt attributes to classify')


def build_net(config: ml_collections.ConfigDict) -> encoder.ClassifierNet:
  cl = config.classifier
  # Anchors: the classifier reads whole sequences, whose first and last events matter.
  enc = encoder.EncoderConfig.from_section(cl, config.model.vocab_size, anchors=True)
  return encoder.ClassifierNet(enc, num_classes=tuple(int(k) for k in cl.num_classes))


def labels_of(prompt_BxC, offsets_C, num_classes_C):
  """Class index per attribute; clipped so that a malformed prompt cannot index out of range."""
  labels = prompt_BxC - jnp.asarray(offsets_C, prompt_BxC.dtype)
  return jnp.clip(labels, 0, jnp.asarray(num_classes_C) - 1)


# Rows of the training split that class_weights counts (the first ones, in source order).
CLASS_COUNT_ROWS = 100_000


def class_weights(labels_NxA, num_classes_A, balance: float) -> np.ndarray:
  """[A, K_max] loss weights: (class frequency)^-balance, mean 1 over the given labels.

  Frequencies are counted with one pseudo-count per class, so an unseen class gets a
  finite weight; padding entries (k >= num_classes[a]) are 0.
  """
  k_max = max(num_classes_A)
  w_AxK = np.zeros((len(num_classes_A), k_max), np.float64)
  for a, k in enumerate(num_classes_A):
    freq_K = (np.bincount(labels_NxA[:, a], minlength=k)[:k] + 1.0) / (len(labels_NxA) + k)
    w_K = freq_K ** -balance
    w_AxK[a, :k] = w_K / np.sum(freq_K * w_K)
  return w_AxK.astype(np.float32)


def _prompt_probs(net, offsets_C, params, tokens_BxT, prompt_BxC):
  logp_BxAxK = net.apply({'params': params}, tokens_BxT)
  labels_BxA = labels_of(prompt_BxC, offsets_C, net.num_classes)
  return jnp.exp(jnp.take_along_axis(logp_BxAxK, labels_BxA[..., None], axis=-1)[..., 0])


def _predict(net, offsets_C, params, tokens_BxT):
  logp_BxAxK = net.apply({'params': params}, tokens_BxT)
  return jnp.argmax(logp_BxAxK, axis=-1).astype(jnp.int32) + jnp.asarray(offsets_C, jnp.int32)


def make_quality_model(config: ml_collections.ConfigDict, params) -> interface.QualityModel:
  cl, net = config.classifier, build_net(config)
  offsets = tuple(int(o) for o in cl.prompt_offsets)
  return interface.QualityModel(apply=functools.partial(_prompt_probs, net, offsets), params=params,
                                predict=functools.partial(_predict, net, offsets),
                                attribute_names=tuple(cl.attribute_names))


# The encoder fields that must agree for the embedder's encoder weights to mean the same here.
_SHARED_ENCODER_FIELDS = ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'mlp_dim',
                          'rope_base')


def embedder_encoder_params(exp: experiment_lib.Experiment, embedder_dir: str):
  """The trained embedder's encoder params, laid out on exp's mesh, if its encoder fits ours."""
  field = 'config.classifier.init_from_embedder'
  try:
    emb_config, params = stage.restore(
        embedder_dir, lambda c: encoder.init_fn(embedder_lib.build_net(c)), exp.mesh, exp.rules)
  except checkpoints.CheckpointError as e:
    raise config_lib.ConfigError(
        f'{field}=True needs the trained embedder of this work directory: {e}. Run '
        '--stage=embedder first, or set it to False') from None
  ours, theirs = build_net(exp.config).cfg, encoder.EncoderConfig.from_section(
      emb_config.embedder, emb_config.model.vocab_size)
  pairs = {f: (getattr(ours, f), getattr(theirs, f)) for f in _SHARED_ENCODER_FIELDS}
  pairs['token_features'] = (exp.config.classifier.token_features,
                             emb_config.embedder.get('token_features', 'none'))
  differ = [f'{f}: classifier {a!r} vs embedder {b!r}' for f, (a, b) in pairs.items() if a != b]
  if differ:
    raise config_lib.ConfigError(
        f'{field}=True but the embedder in {embedder_dir} has another encoder ('
        + '; '.join(differ) + '); give config.classifier the embedder\'s sizes or set it to False')
  return params['encoder']


def make_task(exp: experiment_lib.Experiment, embedder_dir: str | None = None) -> training.Task:
  """embedder_dir: where the trained embedder is, for config.classifier.init_from_embedder."""
  config, cl = exp.config, exp.config.classifier
  net = build_net(config)
  offsets, names = tuple(cl.prompt_offsets), tuple(cl.attribute_names)
  tx, schedule = training.make_optimizer(cl)
  init_state = training.init_state_fn(encoder.init_fn(net), tx)
  if cl.init_from_embedder and embedder_dir is None:
    raise ValueError('config.classifier.init_from_embedder=True: pass embedder_dir')

  def from_embedder(state):  # a fresh run only: the encoder is the embedder's, the heads new
    return {'params': {**state['params'], 'encoder': embedder_encoder_params(exp, embedder_dir)},
            'opt_state': state['opt_state']}

  weights_AxK = None
  if cl.class_balance:
    train_labels = labels_of(
        stage.split_arrays(exp.sources['train'], ('prompt',), CLASS_COUNT_ROWS)['prompt'],
        offsets, net.num_classes)
    weights_AxK = jnp.asarray(class_weights(np.asarray(train_labels), net.num_classes,
                                            cl.class_balance))

  layout = packing_layout(exp, net.cfg, cl.batch_size, cl)

  def train_step(state, batch, step):
    labels_BxA = labels_of(batch['prompt'], offsets, net.num_classes)

    def loss_fn(params, packing):
      logp_BxAxK = net.apply({'params': params}, batch['tokens'], packing)
      nll_BxA = -jnp.take_along_axis(logp_BxAxK, labels_BxA[..., None], axis=-1)[..., 0]
      if weights_AxK is not None:
        nll_BxA = nll_BxA * weights_AxK[jnp.arange(len(offsets)), labels_BxA]
      return jnp.mean(nll_BxA), logp_BxAxK

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # real_tokens: the slots the encoder reads (events, and the anchors), not PAD
    slots_B, width = encoder.sequence_slots(net.cfg, batch['tokens'])
    extra = {'real_tokens': jnp.sum(slots_B).astype(jnp.float32)}
    if layout is None:
      (loss, logp_BxAxK), grads = grad_fn(state['params'], None)
    else:  # the sequences packed when they fit the rows, else in their own rows: same loss
      plan = layout.plan_slots(slots_B, width)
      (loss, logp_BxAxK), grads = layout.run(
          plan, lambda fewest, p: grad_fn(p, (fewest, plan)), lambda p: grad_fn(p, None),
          state['params'])
      extra.update(layout.metrics(plan, slots_B.shape[0]))
    acc_A = jnp.mean(jnp.argmax(logp_BxAxK, -1) == labels_BxA, axis=0)
    grad_norm = optax.global_norm(grads)
    flags = training.finite_flags(loss=loss, grad_norm=grad_norm)
    state = training.apply_gradients(tx, state, grads, jnp.all(jnp.stack(list(flags.values()))))
    return state, {'loss': loss, **{f'acc/{n}': acc_A[i] for i, n in enumerate(names)},
                   'grad_norm': grad_norm, 'lr': schedule(step), **extra, **flags}

  val = None
  if 'validation' in exp.sources:
    val = stage.split_arrays(exp.sources['validation'], BATCH_KEYS, stage.validation_rows(cl))

  def evaluate(state, step):
    del step
    if val is None or not len(val['tokens']):
      return {}
    qm = make_quality_model(config, state['params'])
    acc = metrics.classifier_accuracy(qm, val['tokens'], val['prompt'], cl.batch_size)
    probs = metrics.in_batches(
        lambda t, p: qm(t, p), [val['tokens'], val['prompt']], cl.batch_size)
    return {'val/quality': float(np.mean(probs)),
            'val/loss': float(np.mean(-np.log(np.maximum(probs, 1e-30)))),
            **{f'val/acc/{n}': a['accuracy'] for n, a in acc.items()}}

  batch_sharding = pipeline.batch_sharding(exp.mesh, sharding_lib.BATCH_AXES)
  batches = pipeline.make_train_iterator(exp.sources['train'], cl.batch_size, config.seed,
                                        batch_sharding, keys=BATCH_KEYS)
  tokens_per_step = cl.batch_size * config.model.seq_len
  return training.Task(
      name='classifier', init_state=init_state,
      warm_start=from_embedder if cl.init_from_embedder else None,
      train_step=train_step, batches=batches,
      batch_shardings=batch_sharding, evaluate=evaluate, tokens_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * net.cfg.flops_per_token(config.model.seq_len, True))


def packing_layout(exp: experiment_lib.Experiment, cfg: encoder.EncoderConfig, batch: int,
                   section) -> packing.Layout | None:
  """How a training batch of `batch` sequences packs for the encoder on this mesh (a config
  section's packed_rows, packed_shapes, packed_spacing), or None."""
  anchors = 2 if cfg.anchors else 0
  width = exp.model_cfg.seq_len + anchors
  min_slots = min(width, int(exp.length_bounds.min) + anchors)
  return packing.configured(section, batch, sharding_lib.batch_shards(exp.mesh), width, min_slots)


def heldout_figures(qm: interface.QualityModel, tokens_NxT, prompt_NxC, batch_size: int,
                    seed: int = 0) -> dict:
  """Per-attribute accuracy vs the majority rate, and quality with own vs shuffled prompts."""
  out = {'accuracy': metrics.classifier_accuracy(qm, tokens_NxT, prompt_NxC, batch_size),
         'num_examples': len(tokens_NxT)}
  shuffled = np.asarray(prompt_NxC)[np.random.default_rng(seed).permutation(len(prompt_NxC))]
  for name, prompts in (('own_prompts', prompt_NxC), ('shuffled_prompts', shuffled)):
    q = metrics.in_batches(lambda t, p: qm.quality(t, p), [tokens_NxT, prompts], batch_size)
    out.setdefault('quality', {})[name] = float(np.mean(q))
  return out


def prepare(config, devices=None) -> experiment_lib.Experiment:
  exp = experiment_lib.prepare(config, devices)
  with exp.config.unlocked():
    fill_attributes(exp.config, exp.meta)
    stage.fill_token_features(exp.config.classifier, 'classifier', exp.meta)
  config_lib.validate_classifier(exp.config.classifier)
  return exp


def run(config, workdir: workdir_lib.WorkDir | str, devices=None,
        progress: bool = True) -> training.RunResult:
  """Trains in DIR/classifier (init_from_embedder reads DIR/embedder); held-out figures to
  its heldout.json."""
  wd = workdir_lib.of(workdir)
  exp = prepare(config, devices)
  result = training.run(make_task(exp, wd.embedder), exp.config.classifier, exp.config,
                        wd.classifier, exp.mesh, exp.rules, progress=progress)
  if not result.preempted:
    split = stage.heldout_split(exp.sources)
    data = stage.split_arrays(exp.sources[split], BATCH_KEYS)
    figures = {'split': split, **heldout_figures(
        make_quality_model(exp.config, result.state['params']), data['tokens'], data['prompt'],
        exp.config.classifier.batch_size, exp.config.seed)}
    stage.write_heldout(wd.classifier, result.step, figures)
    result.history.append({'step': result.step, **stage.flatten(figures, 'test/')})
  return result


def load_quality_model(run_dir: str, mesh=None, rules=None) -> interface.QualityModel:
  """The trained classifier of its run directory (DIR/classifier) as a QualityModel."""
  config, params = stage.restore(run_dir, lambda c: encoder.init_fn(build_net(c)), mesh, rules)
  return make_quality_model(config, params)
