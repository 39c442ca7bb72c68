"""Pretraining the conditional base model (with prompt dropout, for CFG later).

    python -m diverse_cfg.main --stage=pretrain --config=configs/essen.py:smoke --workdir=/tmp/run
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diverse_cfg import experiment as experiment_lib
from diverse_cfg import model as model_lib
from diverse_cfg import packing
from diverse_cfg import sampling
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import training
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import pipeline

BATCH_KEYS = ('tokens', 'prompt')


def lm_loss(cfg: model_lib.ModelConfig, params, tokens_BxT, prompt_BxC, null_B):
  logits = model_lib.forward(cfg, params, tokens_BxT, prompt_BxC, null_B)
  return training.cross_entropy(logits, tokens_BxT, sampling.token_mask(tokens_BxT))


def lm_loss_packed(cfg: model_lib.ModelConfig, params, packed: packing.Packed):
  """lm_loss of the same sequences laid out in packed rows: the same value."""
  logits = model_lib.forward_packed(cfg, params, packed)
  return training.cross_entropy(logits, packed.targets, sampling.token_mask(packed.targets))


def train_step_fn(cfg: model_lib.ModelConfig, tx, schedule, seed: int,
                  pack: packing.Layout | None = None):
  """The pure step: (state, batch, step) -> (state, metrics), with prompt dropout.

  pack: the batch is trained in the fewest of the layout's packed row counts that
  hold its sequences (metrics `packed`: they fit; `rows`: the rows computed on), else
  in its own rows.
  """

  def train_step(state, batch, step):
    key = jax.random.fold_in(jax.random.key(seed), step)
    tokens_BxT, prompt_BxC = batch['tokens'], batch['prompt']
    null_B = jax.random.bernoulli(key, cfg.prompt_dropout, tokens_BxT.shape[:1])
    grad_fn = jax.value_and_grad(lambda p: lm_loss(cfg, p, tokens_BxT, prompt_BxC, null_B)[0])
    metrics = {}
    if pack is None:
      loss, grads = grad_fn(state['params'])
    else:
      plan = pack.plan(tokens_BxT, cfg.prompt_len)

      def packed_grad_fn(layout, params):
        packed = layout.pack(plan, tokens_BxT, prompt_BxC, null_B)
        return jax.value_and_grad(lambda p: lm_loss_packed(cfg, p, packed)[0])(params)

      loss, grads = pack.run(plan, packed_grad_fn, grad_fn, state['params'])
      metrics = pack.metrics(plan, tokens_BxT.shape[0])
    grad_norm = optax.global_norm(grads)
    flags = training.finite_flags(loss=loss, grad_norm=grad_norm)
    state = training.apply_gradients(tx, state, grads, jnp.all(jnp.stack(list(flags.values()))))
    return state, {'loss': loss, 'perplexity': jnp.exp(loss), 'grad_norm': grad_norm,
                   'lr': schedule(step), 'real_tokens': training.real_tokens(tokens_BxT),
                   **metrics, **flags}

  return train_step


def init_state_fn(cfg: model_lib.ModelConfig, tx):
  return training.init_state_fn(functools.partial(model_lib.init_params, cfg), tx)


def make_task(exp: experiment_lib.Experiment) -> training.Task:
  cfg, t, seed = exp.model_cfg, exp.config.train, exp.config.seed
  tx, schedule = training.make_optimizer(t)

  batch_sharding = pipeline.batch_sharding(exp.mesh, sharding_lib.BATCH_AXES)
  eval_loss = jax.jit(functools.partial(_eval_sums, cfg))

  def evaluate(state, step):
    """Validation NLL per token with the prompt and with the null prompt."""
    sums = np.zeros(3)
    batches = pipeline.make_eval_batches(exp.sources['validation'], t.batch_size,
                                         sharding=batch_sharding, keys=BATCH_KEYS)
    for batch in itertools.islice(batches, t.eval_batches or None):
      sums += np.asarray(jax.device_get(eval_loss(state['params'], batch['tokens'],
                                                  batch['prompt'], batch['mask'])))
    cond, uncond = sums[0] / sums[2], sums[1] / sums[2]
    return {'val/loss': cond, 'val/perplexity': float(np.exp(cond)), 'val/loss_null_prompt': uncond}

  batches = pipeline.make_train_iterator(exp.sources['train'], t.batch_size, seed, batch_sharding,
                                        keys=BATCH_KEYS)
  tokens_per_step = t.batch_size * cfg.seq_len
  return training.Task(
      name='pretrain', init_state=init_state_fn(cfg, tx),
      train_step=train_step_fn(cfg, tx, schedule, seed,
                               exp.packing(t.batch_size, t)), batches=batches,
      batch_shardings=batch_sharding, evaluate=evaluate, tokens_per_step=tokens_per_step,
      flops_per_step=tokens_per_step * training.decoder_flops_per_token(cfg, training=True))


def _eval_sums(cfg, params, tokens_BxT, prompt_BxC, mask_B):
  mask_BxT = sampling.token_mask(tokens_BxT) * mask_B[:, None]
  out = []
  for null in (False, True):
    logits = model_lib.forward(cfg, params, tokens_BxT, prompt_BxC,
                               jnp.full(tokens_BxT.shape[:1], null))
    nll, count = training.cross_entropy(logits, tokens_BxT, mask_BxT)
    out.append(nll * count)
  return jnp.stack([out[0], out[1], jnp.sum(mask_BxT)])


def run(config, workdir: workdir_lib.WorkDir | str, devices=None,
        progress: bool = True) -> training.RunResult:
  """Trains the base model in DIR/pretrain."""
  exp = experiment_lib.prepare(config, devices)
  return training.run(make_task(exp), exp.config.train, exp.config,
                      workdir_lib.of(workdir).pretrain, exp.mesh, exp.rules, progress=progress)
