"""Early-exit decoding vs the fixed-length loop, side by side on a trained model.

The base model of a work directory samples the evaluation's test prompts
(evaluate.num_prompts x evaluate.k rows, the data's length bounds) as the
student sampler and as the CFG teacher (finetune.teacher_gamma, the config's
plausibility), once with decoding stopped when every row is done and once
running all seq_len steps; the calls are timed interleaved. Reports real
tokens/s (events and EOS) for both, the speed-up, the decode steps the early
exit needed (the longest row) and whether the tokens agree bit for bit.

    python -m benchmarks.early_exit --config=configs/essen.py:cpu --workdir=DIR [--repeats=5]
"""

from __future__ import annotations

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from benchmarks.common import time_interleaved
from diverse_cfg import checkpoints
from diverse_cfg import evaluate
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import measure
from diverse_cfg import sampling
from diverse_cfg import specials
from diverse_cfg import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A work directory with a pretrain stage.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls of each program.')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON output path.')


def run(config, workdir: str, repeats: int) -> list[dict]:
  exp = experiment_lib.prepare(config)
  cfg, e = exp.model_cfg, exp.config.evaluate
  params, _ = checkpoints.restore_model_params(
      workdir_lib.checkpoints(workdir_lib.WorkDir(workdir).pretrain), cfg, exp.mesh, exp.rules)
  prompt_BxC = jnp.asarray(measure.repeat_prompts(evaluate.evaluation_prompts(exp), e.k))
  key = jax.random.key(exp.config.seed + 1234)
  bounds = sampling.as_traced(exp.length_bounds)
  out = []
  for name, guided, guidance in (
      ('student', False, sampling.Guidance()),
      ('cfg', True, sampling.Guidance(exp.config.finetune.teacher_gamma,
                                      exp.config.guidance.plausibility))):
    fns = {}
    for early in (True, False):
      jitted = jax.jit(functools.partial(sampling.generate, cfg, cfg.seq_len, guided,
                                         early_exit=early))
      fns[early] = functools.partial(jitted, params, prompt_BxC, key, sampling.as_traced(guidance),
                                     jnp.float32(e.temperature), jnp.int32(0), bounds)
    times = time_interleaved({'early_exit': fns[True], 'fixed': fns[False]}, repeats)
    tokens = {k: np.asarray(fns[k]()[0]) for k in (True, False)}
    real = int((tokens[True] != specials.PAD).sum())
    longest = int(((tokens[True] != specials.PAD).sum(axis=1)).max())
    row = {'sampler': name, 'rows': int(prompt_BxC.shape[0]), 'seq_len': cfg.seq_len,
           'real_tokens': real, 'decode_steps_needed': longest,
           'same_tokens': bool(np.array_equal(tokens[True], tokens[False])),
           **{f'{k}_s': t['median_s'] for k, t in times.items()},
           **{f'{k}_tokens_per_s': real / t['median_s'] for k, t in times.items()}}
    row['speedup'] = row['fixed_s'] / row['early_exit_s']
    out.append(row)
    print(f"{name:>8}: {row['rows']} rows, longest {longest}/{cfg.seq_len} tokens, real tokens "
          f"{real}; early exit {row['early_exit_s']:.3f} s ({row['early_exit_tokens_per_s']:.0f} "
          f"tok/s) vs fixed {row['fixed_s']:.3f} s ({row['fixed_tokens_per_s']:.0f} tok/s): "
          f"{row['speedup']:.2f}x, same tokens: {row['same_tokens']}")
  return out


def main(_):
  rows = run(_CONFIG.value, _WORKDIR.value, _REPEATS.value)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
