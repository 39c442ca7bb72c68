"""Finetuning a student: on-policy CFG distillation + diversity reward (DESIGN.md 1).

Each step, in one jitted, sharded function: P prompts x k samples from the
student (no CFG, temperature finetune.temperature); the frozen base model's
guided log-probs (gamma = finetune.teacher_gamma, plausibility =
guidance.plausibility: exactly the distribution the CFG sampler draws from) on
the same sequences from one teacher-forced pass over [cond; uncond] rows;
student and teacher both under the dataset's length bounds; the exact per-position KL summed
over each sequence; the frozen embedder's pairwise diversity reward with the
unbiased leave-one-out baseline; loss = mean KL - beta * surrogate. The
scoring and the update run over the rollouts packed several per row
(finetune.packed_rows, diverse_cfg/packing.py) whenever they fit.

    python -m diverse_cfg.main --stage=finetune --config=configs/essen.py:cpu --workdir=DIR
(one student per value in finetune.betas, under DIR/students/beta_<beta>; the frozen
evaluators from DIR/embedder and DIR/classifier)
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diverse_cfg import checkpoints
from diverse_cfg import convergence
from diverse_cfg import evaluators
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import measure
from diverse_cfg import model as model_lib
from diverse_cfg import objectives
from diverse_cfg import packing
from diverse_cfg import pretrain
from diverse_cfg import sampling
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import training
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import pipeline


def position_terms(kl: str, logp_xV, teacher_xV, targets_x):
  """Per position: the KL to the teacher, the target's log-prob, the entropy."""
  return (objectives.kl_per_position(kl, logp_xV, teacher_xV),
          jnp.take_along_axis(logp_xV, targets_x[..., None], -1)[..., 0],
          objectives.entropy_per_position(logp_xV))


def own_row_terms(cfg: model_lib.ModelConfig, kl: str, guidance, bounds, params, teacher,
                  tokens_BxT, prompt_BxC):
  """position_terms of sequences in their own rows: the teacher's guided log-probs and the
  student's, both under the length bounds, from teacher-forced passes."""
  teacher_BxTxV = sampling.score(cfg, teacher, tokens_BxT, prompt_BxC, guidance, bounds)['cfg']
  logits = model_lib.forward(cfg, params, tokens_BxT, prompt_BxC,
                             jnp.zeros(tokens_BxT.shape[:1], bool))
  return position_terms(kl, sampling.bounded_log_probs(logits, bounds), teacher_BxTxV, tokens_BxT)


def packed_terms(cfg: model_lib.ModelConfig, kl: str, guidance, bounds, params, teacher,
                 layout: packing.Layout, packed: packing.Packed, plan: packing.Plan):
  """own_row_terms of sequences packed several per row, unpacked to their own rows."""
  teacher_RxWxV = sampling.score_packed(cfg, teacher, packed, guidance, bounds)['cfg']
  logits = model_lib.forward_packed(cfg, params, packed)
  logp_RxWxV = sampling.bounded_log_probs(logits, bounds, packed.positions - cfg.prompt_len)
  return tuple(layout.unpack(x_RxW, plan, cfg.prompt_len, cfg.seq_len)
               for x_RxW in position_terms(kl, logp_RxWxV, teacher_RxWxV, packed.targets))


def heldout_kl_fn(cfg: model_lib.ModelConfig, kl: str, guidance: sampling.Guidance,
                  bounds: sampling.LengthBounds, pack: packing.Layout | None = None):
  """(params, teacher, tokens_NxT, prompt_NxC) -> kl_N: the distillation KL of each fixed sequence.

  The finetuning objective's KL (summed over the sequence), teacher-forced on the
  same held-out data sequences every time: a function of the student's parameters
  alone, free of the rollouts' sampling noise. The convergence criterion reads
  its mean and takes its interval over the sequences (diverse_cfg/convergence.py).
  pack: scored packed several per row when they fit in its rows.
  """
  guidance, bounds = sampling.as_traced(guidance), sampling.as_traced(bounds)

  def heldout_kl(params, teacher, tokens_NxT, prompt_NxC):
    def own_rows(p):
      return own_row_terms(cfg, kl, guidance, bounds, p, teacher, tokens_NxT, prompt_NxC)[0]

    if pack is None:
      kl_NxT = own_rows(params)
    else:
      plan = pack.plan(tokens_NxT, cfg.prompt_len)

      def packed_rows(layout, p):
        packed = layout.pack(plan, tokens_NxT, prompt_NxC, jnp.zeros(tokens_NxT.shape[:1], bool))
        return packed_terms(cfg, kl, guidance, bounds, p, teacher, layout, packed, plan)[0]

      kl_NxT = pack.run(plan, packed_rows, own_rows, params)
    return jnp.sum(kl_NxT * sampling.token_mask(tokens_NxT), -1)

  return jax.jit(heldout_kl)


def rollout_kl_fn(cfg: model_lib.ModelConfig, kl: str, temperature: float,
                  guidance: sampling.Guidance, bounds: sampling.LengthBounds,
                  pack: packing.Layout | None = None, min_rows: int = 0):
  """(params, teacher, prompt_NxC, key) -> (kl_N, tokens_NxT): the distillation KL of each of
  the student's rollouts, and the rollouts.

  The finetuning objective itself (on-policy: the student samples the sequences it is scored
  on, as in a training step). Read with the same prompts and key at two checkpoints, the
  rollouts share their uniforms (common random numbers) and differ only where the students
  do (benchmarks/objective_change.py). pack, min_rows: as heldout_kl_fn's and
  sampling.generate's.
  """
  score = heldout_kl_fn(cfg, kl, guidance, bounds, pack)
  bounds = sampling.as_traced(bounds)

  @jax.jit
  def rollouts(params, prompt_NxC, key):
    return sampling.generate(cfg, cfg.seq_len, False, params, prompt_NxC, key, sampling.Guidance(),
                             temperature, jnp.int32(0), bounds, min_rows=min_rows)[0]

  def rollout_kl(params, teacher, prompt_NxC, key):
    tokens_NxT = rollouts(params, prompt_NxC, key)
    return score(params, teacher, tokens_NxT, prompt_NxC), tokens_NxT

  return rollout_kl


def objective_by_prompt(rollout_kl, params, teacher, prompt_PxC, k: int, rows: int, key,
                        place=lambda x: x) -> tuple[np.ndarray, float]:
  """(the mean KL of each prompt's k rollouts, the rollouts' mean length): `rows` rollouts per
  rollout_kl call, the call's key fold_in(key, its index), so that the same prompts and key
  give the same draws at any checkpoint (common random numbers). place: lays a call's prompts
  out (e.g. on the mesh)."""
  prompt_BxC = np.repeat(np.asarray(prompt_PxC), k, axis=0)
  kl, lengths = [], []
  for i, start in enumerate(range(0, len(prompt_BxC), rows)):
    kl_R, tokens_RxT = rollout_kl(params, teacher, place(prompt_BxC[start:start + rows]),
                                  jax.random.fold_in(key, i))
    kl.append(np.asarray(kl_R, np.float64))
    lengths.append(np.asarray(sampling.token_mask(tokens_RxT)).sum(-1))
  return np.concatenate(kl).reshape(-1, k).mean(1), float(np.concatenate(lengths).mean())


def objective_steps(f) -> tuple[int, ...]:
  """The steps the finetune stage reads its objective at: the first logged step of the
  convergence window (the last plateau_window of the steps) and the last step; () if not read."""
  if not f.objective_prompts:
    return ()
  first = math.ceil(convergence.window_start(f.num_steps, f.plateau_window) / f.log_every)
  return tuple(sorted({min(max(first, 1) * f.log_every, f.num_steps), int(f.num_steps)}))


def finetune_step_fn(cfg: model_lib.ModelConfig, f, tx, schedule, beta: float, seed: int,
                     embed_apply, guidance: sampling.Guidance,
                     bounds: sampling.LengthBounds = sampling.LengthBounds(),
                     pack: packing.Layout | None = None):
  """The pure step: (state, batch, step, frozen) -> (state, metrics).

  guidance is the teacher's (gamma, plausibility); bounds the dataset's
  length bounds, applied to the rollout, the teacher and the student alike.
  pack: the teacher's scoring and the student's pass run over the rollouts in the
  fewest of the layout's packed row counts that hold them (metrics `packed`, `rows`),
  else over their own rows.
  """
  k = f.k
  guidance, bounds = sampling.as_traced(guidance), sampling.as_traced(bounds)

  def terms_in_own_rows(params, frozen, tokens_BxT, prompt_BxC):
    return own_row_terms(cfg, f.kl, guidance, bounds, params, frozen['teacher'], tokens_BxT,
                         prompt_BxC)

  def terms_in_packed_rows(params, frozen, layout, packed, plan):
    return packed_terms(cfg, f.kl, guidance, bounds, params, frozen['teacher'], layout, packed,
                        plan)

  def train_step(state, batch, step, frozen):
    prompt_PxC = batch['prompt']
    num_prompts = prompt_PxC.shape[0]
    prompt_BxC = jnp.repeat(prompt_PxC, k, axis=0)  # row p * k + i: sample i of prompt p
    key = jax.random.fold_in(jax.random.key(seed), step)
    tokens_BxT, _ = sampling.generate(cfg, cfg.seq_len, False, state['params'], prompt_BxC, key,
                                      sampling.Guidance(), f.temperature, jnp.int32(0), bounds,
                                      min_rows=int(f.get('rollout_min_rows', 0)))
    mask_BxT = sampling.token_mask(tokens_BxT)
    emb_BxD = embed_apply(frozen['embedder'], tokens_BxT)
    r_PxKxK = evaluators.pairwise_dissimilarity(emb_BxD.reshape(num_prompts, k, -1),
                                                tokens_BxT.reshape(num_prompts, k, -1))
    adv_PxK = objectives.loo_advantages(r_PxKxK)

    def loss_fn(params, terms_fn, *args):
      kl_BxT, tok_logp_BxT, ent_BxT = terms_fn(params, frozen, *args)
      kl_B = jnp.sum(kl_BxT * mask_BxT, -1)
      seq_logp_PxK = jnp.sum(tok_logp_BxT * mask_BxT, -1).reshape(num_prompts, k)
      surrogate = objectives.policy_gradient_surrogate(adv_PxK, seq_logp_PxK)
      loss = jnp.mean(kl_B) - beta * surrogate
      return loss, (kl_B, objectives.masked_mean(ent_BxT, mask_BxT))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    metrics = {}
    if pack is None:
      (loss, (kl_B, ent)), grads = grad_fn(state['params'], terms_in_own_rows, tokens_BxT,
                                           prompt_BxC)
    else:
      plan = pack.plan(tokens_BxT, cfg.prompt_len)

      def packed_grad_fn(layout, params):
        packed = layout.pack(plan, tokens_BxT, prompt_BxC, jnp.zeros(tokens_BxT.shape[:1], bool))
        return grad_fn(params, terms_in_packed_rows, layout, packed, plan)

      (loss, (kl_B, ent)), grads = pack.run(
          plan, packed_grad_fn,
          lambda p: grad_fn(p, terms_in_own_rows, tokens_BxT, prompt_BxC), state['params'])
      metrics = pack.metrics(plan, tokens_BxT.shape[0])
    grad_norm = optax.global_norm(grads)
    flags = training.finite_flags(loss=loss, grad_norm=grad_norm)
    state = training.apply_gradients(tx, state, grads, jnp.all(jnp.stack(list(flags.values()))))
    return state, {
        'loss': loss, 'kl': jnp.mean(kl_B), 'kl_per_token': jnp.sum(kl_B) / jnp.sum(mask_BxT),
        'real_tokens': training.real_tokens(tokens_BxT),
        'entropy': ent, 'reward/diversity': jnp.mean(objectives.mean_reward_per_sample(r_PxKxK)),
        'advantage/mean': jnp.mean(adv_PxK), 'advantage/std': jnp.std(adv_PxK),
        'advantage/abs_mean': jnp.mean(jnp.abs(adv_PxK)), 'length': jnp.mean(jnp.sum(mask_BxT, -1)),
        'grad_norm': grad_norm, 'lr': schedule(step), **metrics, **flags}

  return train_step


def teacher_guidance(config) -> sampling.Guidance:
  """The finetuning teacher: the base model guided at finetune.teacher_gamma."""
  return sampling.Guidance(float(config.finetune.teacher_gamma),
                           float(config.guidance.plausibility))


def finetune_flops(cfg: model_lib.ModelConfig, rows: int) -> float:
  """Rollout (1 forward/token) + teacher scoring (2 rows/token) + student fwd+bwd (3)."""
  fwd = rows * cfg.seq_len * training.decoder_flops_per_token(cfg, training=False)
  return fwd * (1 + 2 + 3)


def make_task(exp: experiment_lib.Experiment, workdir: workdir_lib.WorkDir, beta: float,
              embedder, evaluate_fn=None) -> training.Task:
  cfg, f = exp.model_cfg, exp.config.finetune
  tx, schedule = training.make_optimizer(f)
  teacher, teacher_shardings = checkpoints.restore_model_params(
      workdir_lib.checkpoints(workdir.pretrain), cfg, exp.mesh, exp.rules)

  def warm_start(state):  # the student starts as the base model
    return {'params': jax.tree.map(jnp.copy, teacher), 'opt_state': state['opt_state']}

  batch_sharding = pipeline.batch_sharding(exp.mesh, sharding_lib.BATCH_AXES)
  repl = sharding_lib.replicated(exp.mesh)
  prompts = pipeline.make_train_iterator(exp.sources['train'], f.batch_size, exp.config.seed,
                                         batch_sharding, keys=('prompt',))
  rows = f.batch_size * f.k
  heldout = heldout_examples(exp, f.heldout_sequences)
  heldout_kl = heldout_kl_fn(cfg, f.kl, teacher_guidance(exp.config), exp.length_bounds,
                             heldout_layout(exp, len(heldout['tokens']), f.packed_rows))
  heldout = {k: sharding_lib.to_global(v, repl) for k, v in heldout.items()}

  read_objective, objective_at = objective_fn(exp, teacher), objective_steps(f)

  def probe(state, step):
    out = {}
    if step % f.heldout_every == 0 or step == f.num_steps:
      out.update(convergence.reading('kl_heldout', heldout_kl(
          state['params'], teacher, heldout['tokens'], heldout['prompt'])))
    if read_objective is not None and step in objective_at:
      out.update(convergence.reading('objective', read_objective(state['params'])))
    return out

  return training.Task(
      name=f'finetune beta={beta:g}', init_state=pretrain.init_state_fn(cfg, tx),
      warm_start=warm_start,
      train_step=finetune_step_fn(cfg, f, tx, schedule, beta, exp.config.seed, embedder.apply,
                                  teacher_guidance(exp.config), exp.length_bounds,
                                  exp.packing(rows, f)),
      batches=prompts, batch_shardings=batch_sharding, evaluate=evaluate_fn, probe=probe,
      # The embedder's params sit on one device per process: laid out on the mesh here.
      frozen={'teacher': teacher, 'embedder': sharding_lib.to_global(embedder.params, repl)},
      frozen_shardings={'teacher': teacher_shardings,
                        'embedder': jax.tree.map(lambda _: repl, embedder.params)},
      tokens_per_step=rows * cfg.seq_len, flops_per_step=finetune_flops(cfg, rows))


def objective_fn(exp: experiment_lib.Experiment, teacher):
  """params -> the finetuning objective of each of the first finetune.objective_prompts
  validation prompts (rounded down to a multiple of batch_size, so that each call holds a
  training step's prompts), from objective_rollouts // prompts rollouts each (>= 1):
  objective_by_prompt with the same key every time. None when not read (objective_prompts = 0,
  or too few validation prompts)."""
  f = exp.config.finetune
  prompt_PxC = heldout_examples(exp, f.objective_prompts)['prompt']
  prompt_PxC = prompt_PxC[:len(prompt_PxC) // f.batch_size * f.batch_size]
  if len(prompt_PxC) < 2:
    return None
  k = max(1, f.objective_rollouts // len(prompt_PxC))
  rows = f.batch_size * k
  rollout_kl = rollout_kl_fn(exp.model_cfg, f.kl, f.temperature, teacher_guidance(exp.config),
                             exp.length_bounds, heldout_layout(exp, rows, f.packed_rows),
                             int(f.rollout_min_rows))
  repl = sharding_lib.replicated(exp.mesh)
  key = jax.random.key(exp.config.seed + 11)
  return lambda params: objective_by_prompt(
      rollout_kl, params, teacher, prompt_PxC, k, rows, key,
      lambda x: sharding_lib.to_global(x, repl))[0]


def heldout_layout(exp: experiment_lib.Experiment, count: int,
                   packed_rows: float) -> packing.Layout | None:
  """How `count` replicated sequences are scored (the probe's fixed tunes, or rollouts): one
  packed shape, in packed_rows of their rows, each call falling back to their own rows when its
  sequences do not fit; None (own rows) for 0 or when they never can."""
  return packing.layout(count, 1, packed_rows, *packing.row_slots(exp.model_cfg, exp.length_bounds))


def heldout_examples(exp: experiment_lib.Experiment, count: int | None = None,
                     split: str = 'validation') -> dict[str, np.ndarray]:
  """{'tokens', 'prompt'} of the first `count` (default finetune.eval_prompts) examples of a
  held-out split (deterministic)."""
  src = exp.sources.get(split) or exp.sources['test']
  n = min(exp.config.finetune.eval_prompts if count is None else count, len(src))
  return {key: np.stack([np.asarray(src[i][key]) for i in range(n)]).astype(np.int32)
          for key in ('tokens', 'prompt')}


def run(config, workdir: workdir_lib.WorkDir | str, devices=None, *, embedder=None,
        quality_model=None, progress=True, betas=None) -> dict[float, training.RunResult]:
  """Trains one student per beta (default: finetune.betas); returns their results.

  embedder / quality_model: the frozen evaluators; with neither given, the work
  directory's (the quality model only scores the periodic evaluation).
  """
  wd = workdir_lib.of(workdir)
  embedder, quality_model = evaluators.frozen_models(wd, embedder, quality_model)
  exp = experiment_lib.prepare(config, devices)
  results = {}
  f = exp.config.finetune
  sampler = sampling.Sampler(exp.model_cfg, exp.model_cfg.seq_len, exp.mesh, exp.rules)
  prompts = heldout_examples(exp)['prompt']
  reference = measure.fidelity_reference(exp)
  for beta in (f.betas if betas is None else betas):
    def evaluate_fn(state, step):
      return measure.measure_system(
          lambda p, key: sampler.sample(state['params'], p, key, bounds=exp.length_bounds),
          prompts, f.eval_k, embedder,
          quality_model, jax.random.key(exp.config.seed + 7), ngram=exp.config.evaluate.ngram,
          reference=reference)
    task = make_task(exp, wd, float(beta), embedder, evaluate_fn)
    out_dir = wd.student(beta)
    results[beta] = training.run(task, f, exp.config, out_dir, exp.mesh, exp.rules,
                                 progress=progress)
    report_convergence(out_dir, task.name, f)
  return results


def report_convergence(out_dir: str, name: str, f) -> dict:
  """Whether the student's KL has plateaued: printed and written to out_dir/convergence.json."""
  verdict = convergence.check(convergence.run_metrics(out_dir), f)
  if jax.process_index() == 0:
    print(convergence.describe(name, verdict))
    with open(workdir_lib.convergence_file(out_dir), 'w') as fh:
      json.dump(verdict, fh, indent=1)
  return verdict
