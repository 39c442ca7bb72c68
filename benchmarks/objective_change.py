"""How much the finetuning objective moved between saved checkpoints of each student.

The objective is the on-policy distillation KL (finetune.rollout_kl_fn): the
student samples k rollouts from each of the first --prompts validation prompts
and the KL to the CFG teacher is summed over each rollout. Every checkpoint is
read on the same prompts with the same keys (common random numbers), so the
change between two checkpoints is paired by prompt: its 90 % t interval over
the prompts (convergence.LEVEL, the finetune stage's criterion) is printed as a
share of the two readings' mean. The finetune stage reads the objective the
same way at its convergence window's two ends (finetune.objective_prompts,
diverse_cfg/convergence.py); this reads it at any saved checkpoints, with any
number of prompts, rollouts and keys. CPU: 46 s for two students' two
checkpoints each at 256 x 4 on the `cpu` preset (start-up and compilation
included; BENCHMARKS.md):

  python -m benchmarks.objective_change --config=configs/essen.py:cpu --workdir=DIR \
      --config.data.data_dir=DIR/data --steps=150,300
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags

from benchmarks.common import write_json
from diverse_cfg import checkpoints
from diverse_cfg import convergence
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import finetune
from diverse_cfg import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:preset] of the run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A pipeline run with finetuned students.')
_BETAS = flags.DEFINE_list('betas', None, 'Students to read (default: finetune.betas).')
_STEPS = flags.DEFINE_list('steps', None, 'Checkpoint steps to read (default: every one kept).')
_PROMPTS = flags.DEFINE_integer('prompts', 256, 'Validation prompts (the first ones).')
_K = flags.DEFINE_integer('k', 4, 'Rollouts per prompt.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Rollouts per call.')
_SEED = flags.DEFINE_integer('seed', 1234, 'Seed of the rollouts\' keys (the same at every step).')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON output path.')


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/grain chatter off
  config = _CONFIG.value
  exp = experiment_lib.prepare(config)
  cfg, f = exp.model_cfg, exp.config.finetune
  wd = workdir_lib.of(_WORKDIR.value)
  teacher, shardings = checkpoints.restore_model_params(workdir_lib.checkpoints(wd.pretrain), cfg,
                                                        exp.mesh, exp.rules)
  abstract = checkpoints.abstract_like(teacher, shardings)
  prompt_PxC = finetune.heldout_examples(exp, _PROMPTS.value)['prompt']
  rows = min(_BATCH.value, len(prompt_PxC) * _K.value)
  if len(prompt_PxC) * _K.value % rows:
    raise app.UsageError(f'--batch={rows} must divide the {len(prompt_PxC)} prompts x --k='
                         f'{_K.value} rollouts (one compiled shape)')
  rollout_kl = finetune.rollout_kl_fn(cfg, f.kl, f.temperature,
                                      finetune.teacher_guidance(exp.config), exp.length_bounds,
                                      finetune.heldout_layout(exp, rows, f.packed_rows),
                                      int(f.rollout_min_rows))
  out = {'prompts': len(prompt_PxC), 'k': _K.value, 'level': convergence.LEVEL, 'students': {}}
  print(f'On-policy KL(student || teacher) per rollout, {len(prompt_PxC)} validation prompts x '
        f'{_K.value} rollouts, the same keys at every step; change: {convergence.LEVEL:.0%} '
        'interval over prompts\n')
  print('| student | step | objective | length | change from the previous step |')
  print('|---|---:|---:|---:|---|')
  for beta in (_BETAS.value or f.betas):
    ckpt_dir = workdir_lib.checkpoints(wd.student(float(beta)))
    saved = checkpoints.saved_steps(ckpt_dir)
    steps = [int(s) for s in _STEPS.value] if _STEPS.value else saved
    missing = sorted(set(steps) - set(saved))
    if not saved or missing:
      raise checkpoints.CheckpointError(
          f'student beta={float(beta):g}: ' + (f'no checkpoint of step(s) {missing} in {ckpt_dir} '
                                              f'(kept: {saved})' if saved else
                                              f'no checkpoints in {ckpt_dir}'))
    readings, previous = [], None
    for step in steps:
      params = checkpoints.restore_params(ckpt_dir, abstract, step)
      kl_P, length = finetune.objective_by_prompt(rollout_kl, params, teacher, prompt_PxC,
                                                  _K.value, rows, jax.random.key(_SEED.value))
      reading = {'step': step, 'objective': float(kl_P.mean()), 'length': length}
      moved = ''
      if previous is not None:
        reading['change'] = c = convergence.paired_change(previous, kl_P)
        lo, hi = c['relative_interval']
        moved = f'{c["relative"]:+.1%} [{lo:+.1%}, {hi:+.1%}]'
      print(f'| beta {float(beta):g} | {step} | {kl_P.mean():.3f} | {length:.1f} | {moved} |',
            flush=True)
      readings.append(reading)
      previous = kl_P
    out['students'][f'{float(beta):g}'] = readings
  write_json(_OUT.value, out)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
