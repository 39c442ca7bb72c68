"""The contrastive embedder: the diversity reward's 1 - cos lives in its space.

Training (real data only): from each piece of a batch, two non-overlapping
chunks at random positions (chunks.random_pair, deterministic per step) form a
positive pair; the other pieces of the batch are the negatives. The loss is
the symmetric InfoNCE over the [B, B] cosine matrix. At inference the whole
sequence (its events before EOS) is embedded.

    python -m diverse_cfg.main --stage=embedder --config=configs/essen.py:cpu --workdir=DIR
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diverse_cfg import experiment as experiment_lib
from diverse_cfg import model as model_lib
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import training
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import pipeline
from diverse_cfg.evaluators import chunks
from diverse_cfg.evaluators import encoder
from diverse_cfg.evaluators import interface
from diverse_cfg.evaluators import metrics
from diverse_cfg.evaluators import stage

MAX_SCALE = 100.0  # CLIP's cap on the learned 1/temperature: keeps the logits' range sane
REFERENCE_K = 4  # pieces per group for the real-data diversity reference figure


def build_net(config: ml_collections.ConfigDict) -> encoder.EmbedNet:
  e = config.embedder
  return encoder.EmbedNet(encoder.EncoderConfig.from_section(e, config.model.vocab_size),
                          emb_dim=e.emb_dim, learn_temperature=e.learn_temperature,
                          init_temperature=e.temperature)


def _embed(net: encoder.EmbedNet, params, tokens_BxT):
  return net.apply({'params': params}, tokens_BxT)


def make_embedder(net: encoder.EmbedNet, params) -> interface.Embedder:
  return interface.Embedder(apply=functools.partial(_embed, net), params=params)


def info_nce(a_BxE, b_BxE, scale, valid_B):
  """Symmetric InfoNCE: row i of a must pick b_i among the valid b's, and vice versa.

  Returns (mean loss over valid rows, top-1 in-batch accuracy a -> b).
  """
  logits_BxB = scale * jnp.einsum('ie,je->ij', a_BxE, b_BxE)
  pair_BxB = valid_B[:, None] & valid_B[None, :]  # invalid rows are neither queries nor keys
  logits_BxB = jnp.where(pair_BxB, logits_BxB, model_lib.NEG_INF)
  nll_a_B = -jnp.diagonal(jax.nn.log_softmax(logits_BxB, axis=1))  # a_i -> b_i
  nll_b_B = -jnp.diagonal(jax.nn.log_softmax(logits_BxB, axis=0))  # b_i -> a_i
  w_B = valid_B.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(w_B), 1.0)
  loss = jnp.sum(w_B * 0.5 * (nll_a_B + nll_b_B)) / count
  hit_B = jnp.argmax(logits_BxB, axis=1) == jnp.arange(a_BxE.shape[0])
  return loss, jnp.sum(w_B * hit_B) / count


def logit_scale(e: ml_collections.ConfigDict, params):
  if e.learn_temperature:
    return jnp.exp(jnp.minimum(params['log_scale'], jnp.log(MAX_SCALE)))
  return jnp.float32(1.0 / e.temperature)


def make_task(exp: experiment_lib.Experiment) -> training.Task:
  config, e = exp.config, exp.config.embedder
  net = build_net(config)
  tx, schedule = training.make_optimizer(e)
  init_state = training.init_state_fn(encoder.init_fn(net), tx)

  def train_step(state, batch, step):
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    first_BxC, second_BxC, valid_B = chunks.random_pair(key, batch['tokens'], e.chunk_len)
    both_2BxC = jnp.concatenate([first_BxC, second_BxC])  # one forward for both views

    def loss_fn(params):
      emb_2BxE = net.apply({'params': params}, both_2BxC)
      a_BxE, b_BxE = jnp.split(emb_2BxE, 2)
      return info_nce(a_BxE, b_BxE, logit_scale(e, params), valid_B)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    grad_norm = optax.global_norm(grads)
    flags = training.finite_flags(loss=loss, grad_norm=grad_norm)
    state = training.apply_gradients(tx, state, grads, jnp.all(jnp.stack(list(flags.values()))))
    temperature = 1.0 / logit_scale(e, state['params'])
    return state, {'loss': loss, 'batch_top1': acc, 'temperature': temperature,
                   'grad_norm': grad_norm, 'lr': schedule(step), **flags}

  val_tokens = None
  if 'validation' in exp.sources:
    val_tokens = stage.split_arrays(exp.sources['validation'], ('tokens',),
                                    stage.validation_rows(e))['tokens']

  def evaluate(state, step):
    del step
    if val_tokens is None or len(val_tokens) < 2:
      return {}
    r = metrics.retrieval_accuracy(make_embedder(net, state['params']), val_tokens, e.chunk_len,
                                   e.batch_size)
    return {'val/retrieval_top1': r['top1'], 'val/retrieval_top5': r['top5'],
            'val/retrieval_chance': r['chance']}

  batch_sharding = pipeline.batch_sharding(exp.mesh, sharding_lib.BATCH_AXES)
  batches = pipeline.make_train_iterator(exp.sources['train'], e.batch_size, config.seed,
                                        batch_sharding, keys=('tokens',))
  tokens_per_step = 2 * e.batch_size * e.chunk_len
  return training.Task(
      name='embedder', init_state=init_state, train_step=train_step, batches=batches,
      batch_shardings=batch_sharding, evaluate=evaluate, tokens_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * net.cfg.flops_per_token(e.chunk_len, training=True))


def heldout_figures(embedder: interface.Embedder, tokens_NxT, chunk_len: int, batch_size: int,
                    seed: int = 0) -> dict:
  """Retrieval on held-out pieces, and the diversity of real pieces for scale.

  real_diversity: mean pairwise (1 - cos) within random groups of REFERENCE_K
  different held-out pieces, the value a perfectly varied generator would
  reach on this data (identical generations score 0).
  """
  out = {'retrieval': metrics.retrieval_accuracy(embedder, tokens_NxT, chunk_len, batch_size)}
  n_groups = len(tokens_NxT) // REFERENCE_K
  if n_groups:
    order = np.random.default_rng(seed).permutation(len(tokens_NxT))[:n_groups * REFERENCE_K]
    emb_NxE = metrics.embed_all(embedder, np.asarray(tokens_NxT)[order], batch_size)
    emb_PxKxE = jnp.asarray(emb_NxE).reshape(n_groups, REFERENCE_K, -1)
    d_PxKxK = metrics.pairwise_dissimilarity(emb_PxKxE)
    out['real_diversity'] = {'value': float(jnp.mean(metrics.mean_off_diagonal(d_PxKxK))),
                             'k': REFERENCE_K, 'groups': n_groups}
  return out


def prepare(config, devices=None) -> experiment_lib.Experiment:
  exp = experiment_lib.prepare(config, devices)
  stage.fill_token_features(exp.config.embedder, 'embedder', exp.meta)
  return exp


def run(config, workdir: workdir_lib.WorkDir | str, devices=None,
        progress: bool = True) -> training.RunResult:
  """Trains in DIR/embedder; held-out figures to its heldout.json."""
  run_dir = workdir_lib.of(workdir).embedder
  exp = prepare(config, devices)
  result = training.run(make_task(exp), exp.config.embedder, exp.config, run_dir, exp.mesh,
                        exp.rules, progress=progress)
  if not result.preempted:
    split = stage.heldout_split(exp.sources)
    tokens = stage.split_arrays(exp.sources[split], ('tokens',))['tokens']
    e = exp.config.embedder
    trained = make_embedder(build_net(exp.config), result.state['params'])
    figures = {'split': split, **heldout_figures(trained, tokens, e.chunk_len, e.batch_size,
                                                 exp.config.seed)}
    stage.write_heldout(run_dir, result.step, figures)
    result.history.append({'step': result.step, **stage.flatten(figures, 'test/')})
  return result


def load_embedder(run_dir: str, mesh=None, rules=None) -> interface.Embedder:
  """The trained embedder of its run directory (DIR/embedder), params laid out on `mesh`.

  mesh=None: one device. The returned apply is pure and jittable.
  """
  config, params = stage.restore(run_dir, lambda c: encoder.init_fn(build_net(c)), mesh, rules)
  return make_embedder(build_net(config), params)
