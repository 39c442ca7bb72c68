"""Packing, side by side in one run: real (non-PAD) tokens/s of the pretraining, finetuning and
classifier steps.

On a pipeline run's work directory (its dataset, base model and embedder):
* pretraining step, real batches from the train split, for each
  batch:packed_rows[:packed_shapes] in --pretrain (shapes: the config's when not
  given): seconds per step (median over --steps distinct batches), real tokens
  per step and per second, the share of batches that fit the packed rows, the
  mean rows computed on;
* finetuning step (rollout + teacher scoring + student update from the base
  model, or with --from_student from the trained student, of one beta) for
  each packed_rows[:packed_shapes][@rollout_min_rows] in --finetune (the
  rollout compacted down to that many rows; 0 = not): the same; and
  the rollout alone (packing does not touch it), on the same prompts;
* the classifier's training step (the evaluators' encoder, real batches) for
  each packed_rows[:packed_shapes] in --classifier;
* the finetune stage's held-out KL probe (finetune.heldout_kl_fn on the first N
  validation sequences, the base model as student) for each N[:packed_rows] in
  --heldout (packed_rows 0 = each sequence in its own row).
An empty list skips its table.
Compilation is excluded, every timed call ends with block_until_ready, and
the settings are timed interleaved (A B C A B C ...), so a change in the
machine's load hits them alike. The speed-up is against each table's first row.

  python -m benchmarks.packing --config=configs/essen.py:cpu --workdir=DIR \
      --config.data.data_dir=DIR/data
"""

from __future__ import annotations

import functools
import itertools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from benchmarks.common import time_interleaved
from diverse_cfg import checkpoints
from diverse_cfg import evaluators
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import finetune
from diverse_cfg import pretrain
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import training
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.evaluators import classifier

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A pipeline run (pretrain + embedder done).')
_PRETRAIN = flags.DEFINE_string('pretrain', '32:0,32:0.5:1,32:0.5',
                                'batch:packed_rows[:packed_shapes] for the pretraining step.')
_FINETUNE = flags.DEFINE_string(
    'finetune', '0,0.5:1,0.5', 'packed_rows[:packed_shapes][@rollout_min_rows] for the finetuning '
    'step.')
_CLASSIFIER = flags.DEFINE_string('classifier', '0,0.5:1,0.5',
                                  'packed_rows[:packed_shapes] for the classifier step.')
_HELDOUT = flags.DEFINE_string(
    'heldout', '32:0,128:0,128:0.5', 'N[:packed_rows] for the held-out KL probe (0 = own rows).')
_BETA = flags.DEFINE_float('beta', 8.0, 'The student whose step is timed.')
_FROM_STUDENT = flags.DEFINE_bool(
    'from_student', False, "Time the finetuning step from the work directory's trained student "
    'of --beta (its rollouts, e.g. shorter ones), not from the base model.')
_STEPS = flags.DEFINE_integer('steps', 12, 'Distinct batches (timed calls) per setting.')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON output path.')


def program(task: training.Task, state, steps: int, frozen=()):
  """A no-argument call of the jitted step on the next of `steps` batches, and its metrics."""
  step_fn = jax.jit(task.train_step)
  batches = [next(task.batches) if task.batches is not None else None for _ in range(steps)]
  calls = itertools.count()
  metrics = []

  def call():
    i = next(calls)
    out = step_fn(state, batches[i % steps], jnp.int32(i % steps), *frozen)[1]
    if i:  # the first call compiles and is not timed
      metrics.append(out)
    return out

  return call, metrics


def summarise(batch: int, packing: tuple, timing: dict, metrics: list) -> dict:
  metrics = jax.device_get(metrics)
  real = float(np.mean([m['real_tokens'] for m in metrics]))
  return {'batch': batch, 'packed_rows': packing[0], 'packed_shapes': packing[1],
          'rollout_min_rows': packing[2] if len(packing) > 2 else 0,
          'packed_share': float(np.mean([bool(m.get('packed', False)) for m in metrics])),
          'rows': float(np.mean([m.get('rows', batch) for m in metrics])),
          'sec_per_step': timing['median_s'], 'real_tokens_per_step': real,
          'real_tokens_per_sec': real / timing['median_s']}


def table(rows: list[dict], title: str) -> str:
  base = rows[0]['real_tokens_per_sec']
  lines = [f'### {title}', '',
           '| batch | packed_rows | shapes [@ rollout_min_rows] | packed batches | rows (mean) | s/step (median) | '
           'real tokens/step | real tokens/s | speed-up |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    compact = f" @{r['rollout_min_rows']}" if r['rollout_min_rows'] else ''
    lines.append(f"| {r['batch']} | {r['packed_rows']:g} | {r['packed_shapes']}{compact} | "
                 f"{r['packed_share']:.2f} | {r['rows']:.1f} | "
                 f"{r['sec_per_step']:.3f} | {r['real_tokens_per_step']:.0f} | "
                 f"{r['real_tokens_per_sec']:.0f} | {r['real_tokens_per_sec'] / base:.2f}x |")
  return '\n'.join(lines)


def measure(settings: dict, steps: int, extra=None) -> dict:
  """settings: name -> (batch, (packed_rows, packed_shapes), mesh, rules, call, metrics); timed
  interleaved with the `extra` calls, whose median seconds are returned as {name: seconds}."""
  calls = dict(extra or {})
  for name, (_, _, mesh, rules, call, _) in settings.items():
    def activated(call=call, mesh=mesh, rules=rules):
      with sharding.activate(mesh, rules):
        return call()
    calls[name] = activated
  timing = time_interleaved(calls, steps)
  return {**{name: timing[name]['median_s'] for name in extra or {}},
          **{name: summarise(b, f, timing[name], m)
             for name, (b, f, _, _, _, m) in settings.items()}}


def items(flag_value: str) -> list[str]:
  return [x for x in flag_value.split(',') if x]


def packing_setting(section, item: str) -> tuple[float, int]:
  """Sets a config section's packed_rows[:packed_shapes] from `item`; returns both."""
  fraction, *shapes = item.split(':')
  section.packed_rows = float(fraction)
  if shapes:
    section.packed_shapes = int(shapes[0])
  return section.packed_rows, section.packed_shapes


def heldout_probe(config, wd: workdir_lib.WorkDir, settings: list[str], steps: int) -> list:
  """Seconds per held-out KL reading (the probe the finetune stage runs every
  finetune.heldout_every steps) for each N[:packed_rows], timed interleaved."""
  exp = experiment_lib.prepare(config)
  cfg, f = exp.model_cfg, exp.config.finetune
  teacher = checkpoints.restore_model_params(workdir_lib.checkpoints(wd.pretrain), cfg, exp.mesh,
                                             exp.rules)[0]
  guidance = finetune.teacher_guidance(exp.config)
  calls, sums = {}, {}
  with sharding.activate(exp.mesh, exp.rules):
    for item in settings:
      n, _, fraction = item.partition(':')
      n, fraction = int(n), float(fraction or 0)
      data = finetune.heldout_examples(exp, n)
      fn = finetune.heldout_kl_fn(cfg, f.kl, guidance, exp.length_bounds,
                                  finetune.heldout_layout(exp, len(data['tokens']), fraction))
      calls[item] = functools.partial(fn, teacher, teacher, data['tokens'], data['prompt'])
      sums[item] = float(calls[item]().sum())  # compiles
    timing = time_interleaved(calls, steps)
  rows = [{'setting': item, 'sec': timing[item]['median_s'], 'kl_sum': sums[item]}
          for item in settings]
  print('\n### Held-out KL probe (finetune.heldout_kl_fn; the base model as student)\n')
  print('| sequences : packed_rows | s per reading (median) | sum of the KLs |\n|---|---:|---:|')
  for r in rows:
    print(f"| {r['setting']} | {r['sec']:.3f} | {r['kl_sum']:.2f} |")
  return rows


def main(_):
  config, workdir, steps = _CONFIG.value, _WORKDIR.value, _STEPS.value
  print(f'devices: {jax.devices()}')
  wd = workdir_lib.WorkDir(workdir)
  out = {}
  settings = {}
  for item in items(_PRETRAIN.value):
    batch, setting = item.split(':', 1)
    c = config.copy_and_resolve_references()
    c.train.batch_size = batch = int(batch)
    fraction = packing_setting(c.train, setting)
    exp = experiment_lib.prepare(c)
    task = pretrain.make_task(exp)
    state, _ = sharding.create_sharded(task.init_state, exp.mesh, exp.rules, jax.random.key(0))
    settings[item] = (batch, fraction, exp.mesh, exp.rules, *program(task, state, steps))
  if settings:
    out['pretrain'] = list(measure(settings, steps).values())
    print(table(out['pretrain'], 'Pretraining step (real batches of the train split)'), '\n')

  settings = {}
  for item in items(_CLASSIFIER.value):
    c = config.copy_and_resolve_references()
    fraction = packing_setting(c.classifier, item)
    exp = classifier.prepare(c)
    task = classifier.make_task(exp, wd.embedder)
    state, _ = sharding.create_sharded(task.init_state, exp.mesh, exp.rules, jax.random.key(0))
    settings[item] = (c.classifier.batch_size, fraction, exp.mesh, exp.rules,
                      *program(task, state, steps))
  if settings:
    out['classifier'] = list(measure(settings, steps).values())
    print(table(out['classifier'], "Classifier step (the evaluators' encoder; real batches)"),
          '\n')

  settings = {}
  embedder = evaluators.load_embedder(wd.embedder) if _FINETUNE.value else None
  for item in items(_FINETUNE.value):
    c = config.copy_and_resolve_references()
    setting, _, min_rows = item.partition('@')
    if min_rows:  # else the config's
      c.finetune.rollout_min_rows = int(min_rows)
    fraction = (*packing_setting(c.finetune, setting), c.finetune.get('rollout_min_rows', 0))
    exp = experiment_lib.prepare(c)
    task = finetune.make_task(exp, wd, _BETA.value, embedder)
    state, _ = sharding.create_sharded(task.init_state, exp.mesh, exp.rules, jax.random.key(0))
    state = task.warm_start(state)
    if _FROM_STUDENT.value:
      state = {**state, 'params': checkpoints.restore_model_params(
          workdir_lib.checkpoints(wd.student(_BETA.value)), exp.model_cfg, exp.mesh,
          exp.rules)[0]}
    settings[item] = (c.finetune.batch_size * c.finetune.k, fraction, exp.mesh, exp.rules,
                      *program(task, state, steps, (task.frozen,)))
  if settings:
    # The rollout alone (the student sampling its k rollouts of the same prompts): no packing.
    rollout = jax.jit(functools.partial(sampling.generate, exp.model_cfg, exp.model_cfg.seq_len,
                                        False))
    prompts = [jnp.repeat(next(task.batches)['prompt'], c.finetune.k, axis=0)
               for _ in range(steps)]
    calls = itertools.count()
    bounds = sampling.as_traced(exp.length_bounds)
    params = state['params']

    def rollout_call():
      i = next(calls)
      return rollout(params, prompts[i % steps], jax.random.key(i % steps), sampling.Guidance(),
                     jnp.float32(c.finetune.temperature), jnp.int32(0), bounds)

    fine = measure(settings, steps, {'rollout': rollout_call})
    out['rollout_s'] = fine.pop('rollout')
    out['finetune'] = list(fine.values())
    start = 'its trained student' if _FROM_STUDENT.value else 'the base model'
    print(table(out['finetune'], f'Finetuning step from {start} (beta {_BETA.value:g}, '
                                 'batch = prompts x k rollouts)'))
    print(f'\nthe rollout alone (student sampling, no packing): {out["rollout_s"]:.3f} s (median)')
  if _HELDOUT.value:
    out['heldout'] = heldout_probe(config, wd, items(_HELDOUT.value), steps)
  if _OUT.value:
    with open(_OUT.value, 'w') as fh:
      json.dump(out, fh, indent=1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
