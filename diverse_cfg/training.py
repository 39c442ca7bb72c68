"""The training loop every stage shares (pretraining, evaluators, finetuning).

A stage supplies a `Task`: how to build its (boxed, logically named) state, a
pure train step, an optional evaluation, and a checkpointable batch iterator.
The loop does the rest the same way for all: sharded init or automatic resume
from the work directory, one jitted step with explicit shardings and donated
state, metrics as JSON lines + TensorBoard + a progress bar (process 0 only),
async keep-N checkpoints, a checkpoint on SIGTERM, and a stop with the step and
quantity named when a loss or gradient goes non-finite (the step skips such an
update, so no non-finite state is ever saved).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
import tqdm

from diverse_cfg import checkpoints
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg import workdir as workdir_lib


log = logging.getLogger('diverse_cfg')


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN/Inf; the message names the step and quantity."""


def make_optimizer(t: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with linear warmup and cosine decay (until decay_steps, 0 = num_steps; held at its
  end value after), after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.decay_steps or t.num_steps, t.warmup_steps + 1),
      end_value=t.lr * t.min_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip),
                   optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
  return tx, schedule


def init_state_fn(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
  """key -> {'params', 'opt_state'}; the optimiser state inherits the params' logical names."""
  def init_state(key):
    params = init_params(key)
    return {'params': params, 'opt_state': tx.init(params)}
  return init_state


def apply_gradients(tx, state: dict, grads, finite) -> dict:
  """One optimiser update, skipped (state kept) when `finite` is False."""
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new = {'params': params, 'opt_state': opt_state}
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)


def finite_flags(**quantities) -> dict[str, jax.Array]:
  return {f'finite/{k}': jnp.all(jnp.isfinite(v)) for k, v in quantities.items()}


class MetricsWriter:
  """JSON lines + TensorBoard scalars, written by process 0 only."""

  def __init__(self, run_dir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(run_dir, exist_ok=True)
    self.jsonl = open(workdir_lib.metrics_file(run_dir), 'a')
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(workdir_lib.tensorboard(run_dir))
    except ImportError:  # TensorBoard is optional; JSON lines always work
      self.tb = None

  def write(self, step: int, metrics: dict[str, float | list[float]]) -> None:
    """One row; list values (a figure's per-item values) go to the JSON lines only."""
    if not self.active:
      return
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if not isinstance(v, list):
          self.tb.add_scalar(k, v, step)
      self.tb.flush()

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


class Preemption:
  """SIGTERM sets a flag; the loop saves at the current step and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning('SIGTERM received: checkpointing at the current step, then exiting')
    self.requested = True

  def stop_now(self, step: int, every: int) -> bool:
    """Whether to checkpoint and stop after `step`.

    With several processes all must decide alike: SIGTERM reaches a pod's hosts
    at different moments, and one process stopping alone would leave the others
    blocked in the next collective. So the flags are all-gathered, every `every`
    steps (a host sync the metrics flush does there anyway).
    """
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class Task:
  """What a stage plugs into the loop."""
  name: str
  # key -> boxed state {'params', 'opt_state'} (logical names drive the shardings).
  init_state: Callable[[jax.Array], dict]
  # (state, batch, step[, frozen]) -> (state, metrics); metrics are scalars. A 'real_tokens'
  # metric (the step's non-PAD tokens, see real_tokens) makes the log's tokens_per_sec count
  # those; tokens_per_step (rows x row length) gives padded_tokens_per_sec; flops_per_step
  # the MFU (of the real tokens' share of those FLOPs when real_tokens is logged).
  train_step: Callable[..., tuple[dict, dict]]
  batches: Iterator[dict] | None  # grain iterator (checkpointed) or None if the step makes its data
  batch_shardings: Any = None
  evaluate: Callable[[dict, int], dict[str, float]] | None = None
  # (state, step) -> {name: float or list of floats}: figures of the current state, logged with
  # each log row (the probe picks its steps and returns {} at the others; e.g. finetuning's
  # held-out KL and objective); their time is not counted as training throughput.
  probe: Callable[[dict, int], dict[str, float | list[float]]] | None = None
  tokens_per_step: int = 0
  flops_per_step: float = 0.0
  # Replaces the random init on a fresh run (e.g. a student starting from the base model).
  warm_start: Callable[[dict], dict] | None = None
  # Frozen arrays the step reads (teacher, embedder): passed as a 4th jit argument, sharded,
  # rather than closed over (which would bake them into the program as constants).
  frozen: Any = None
  frozen_shardings: Any = None


@dataclasses.dataclass
class RunResult:
  step: int
  state: dict
  history: list[dict]
  preempted: bool = False


def run(task: Task, t: ml_collections.ConfigDict, config: ml_collections.ConfigDict, run_dir: str,
        mesh: jax.sharding.Mesh, rules, progress: bool = True) -> RunResult:
  """Trains `task` for t.num_steps steps in run_dir, resuming from its checkpoints if any."""
  os.makedirs(run_dir, exist_ok=True)
  ckpt = checkpoints.Checkpointer(workdir_lib.checkpoints(run_dir), keep=t.keep)
  init_fn = functools.partial(task.init_state)
  abstract = sharding_lib.abstract_sharded(init_fn, mesh, rules, jax.random.key(config.seed))
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  step, state = ckpt.restore_latest(abstract, task.batches)
  if step is not None:
    log.info('%s: resumed from step %d in %s', task.name, step, run_dir)
  else:
    state, _ = sharding_lib.create_sharded(init_fn, mesh, rules, jax.random.key(config.seed))
    if task.warm_start is not None:
      state = task.warm_start(state)
    step = 0

  repl = sharding_lib.replicated(mesh)
  with sharding_lib.activate(mesh, rules):
    in_shardings = (shardings, task.batch_shardings, repl)
    if task.frozen is not None:
      in_shardings += (task.frozen_shardings,)
    step_fn = jax.jit(task.train_step, in_shardings=in_shardings, out_shardings=(shardings, repl),
                      donate_argnums=0)
    frozen_args = () if task.frozen is None else (task.frozen,)

  writer = MetricsWriter(run_dir)
  preempt = Preemption()
  history: list[dict] = []
  pending: list[tuple[int, dict]] = []
  bar = tqdm.tqdm(total=t.num_steps, initial=step, desc=task.name, unit='step',
                  disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  window_start, window_steps = time.perf_counter(), 0
  num_devices = mesh.devices.size

  def flush():
    """Fetch queued metrics (one host sync per log interval), check, average, write."""
    nonlocal window_start, window_steps
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      bad = [k.split('/', 1)[1] for k, v in m.items() if k.startswith('finite/') and not v]
      if bad:
        raise NonFiniteError(f'{task.name}: non-finite {", ".join(bad)} at step {s}; the update '
                             f'was skipped and nothing non-finite was saved (last checkpoint: '
                             f'{ckpt.latest_step()})')
    elapsed = time.perf_counter() - window_start
    row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]
           if not k.startswith('finite/')}
    row['steps_per_sec'] = window_steps / elapsed
    real = float(sum(m['real_tokens'] for m in fetched)) if 'real_tokens' in row else None
    if real is not None:  # tokens_per_sec counts real (non-PAD) tokens only
      row['tokens_per_sec'] = real / elapsed
    if task.tokens_per_step:  # rows x row length: PAD included, labelled so
      row['padded_tokens_per_sec'] = task.tokens_per_step * window_steps / elapsed
    if task.flops_per_step:  # the FLOPs of real tokens only, where the step counts them
      flops = task.flops_per_step * window_steps
      if real is not None and task.tokens_per_step:
        flops = task.flops_per_step / task.tokens_per_step * real
      row['mfu'] = flops / elapsed / (t.peak_flops * num_devices)
    last = pending[-1][0]
    if task.probe is not None:
      row.update(task.probe(state, last))
    writer.write(last, row)
    history.append({'step': last, **row})
    bar.set_postfix({k: f'{row[k]:.4g}' for k in list(row)[:3]})
    pending.clear()
    window_start, window_steps = time.perf_counter(), 0

  try:
    stop = False
    while step < t.num_steps and not stop:
      batch = next(task.batches) if task.batches is not None else None
      state, metrics = step_fn(state, batch, jnp.int32(step), *frozen_args)
      step += 1
      window_steps += 1
      pending.append((step, metrics))
      bar.update(1)
      if step % t.log_every == 0 or step == t.num_steps:
        flush()
      if task.evaluate is not None and (step % t.eval_every == 0 or step == t.num_steps):
        flush()
        ev = task.evaluate(state, step)
        writer.write(step, ev)
        history.append({'step': step, **ev})
        window_start = time.perf_counter()  # evaluation time is not training throughput
      stop = preempt.stop_now(step, t.log_every)
      if step % t.ckpt_every == 0 or step == t.num_steps or stop:
        flush()  # never save a state whose step reported non-finite values
        ckpt.save(step, state, config, task.batches, extra={'task': task.name}, force=True)
        window_start = time.perf_counter()  # the save's blocking part is not step time
    flush()
  finally:
    bar.close()
    ckpt.close()  # waits for pending async saves
    writer.close()
    preempt.restore()
  return RunResult(step=step, state=state, history=history, preempted=stop)


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT) -> tuple[jax.Array, jax.Array]:
  """(mean NLL over mask, number of tokens)."""
  logp = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask_BxT)
  return jnp.sum(nll * mask_BxT) / jnp.maximum(count, 1.0), count


def real_tokens(tokens_BxT: jax.Array) -> jax.Array:
  """The non-PAD tokens of a batch (events and EOS): what tokens/s figures count."""
  return jnp.sum(tokens_BxT != specials.PAD).astype(jnp.float32)


def decoder_flops_per_token(cfg, training: bool) -> float:
  """Matmul FLOPs per target token, PaLM/MaxText-style (non-causal attention count)."""
  seq = cfg.prompt_len + cfg.seq_len
  dense = cfg.num_layers * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.mlp_dim)
  dense += cfg.vocab_size * cfg.d_model  # output head
  attn = 2 * cfg.num_layers * seq * cfg.d_model  # QK^T and AV, per token
  fwd = 2 * dense + 2 * attn
  return 3 * fwd if training else fwd

