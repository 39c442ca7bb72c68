"""The CFG teacher over a grid of gamma x plausibility (alpha), on a trained work directory.

What chose `guidance.plausibility`'s default (docs/guidance.md): for each
(gamma, alpha), the base model's CFG samples on the evaluation's test prompts
(same prompts and keys for every cell), scored like an evaluation row:
quality, embedding diversity, and the model-free fidelity to the data (unseen
2-/3-grams against the training split, length gap and Wasserstein-1).

    python -m benchmarks.guidance_sweep --config=configs/essen.py:cpu --workdir=DIR \
        --gammas=1,3,5 --alphas=0,0.05,0.1,0.2 --out=sweep.json [--config.data.name=...]

DIR needs the pretrain, embedder and classifier stages.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from diverse_cfg import checkpoints
from diverse_cfg import evaluate
from diverse_cfg import evaluators
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import measure
from diverse_cfg import sampling
from diverse_cfg import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A work directory with pretrain/embedder/classifier.')
_GAMMAS = flags.DEFINE_list('gammas', ['1', '3', '5'], 'CFG strengths.')
_ALPHAS = flags.DEFINE_list('alphas', ['0', '0.05', '0.1', '0.2'], 'Plausibility thresholds.')
_LENGTHS = flags.DEFINE_enum('length_bounds', 'data', ['data', 'none'],
                             "data: the dataset's bounds (as every stage samples); none: "
                             'EOS anywhere (how CFG behaved before the bounds existed).')
_OUT = flags.DEFINE_string('out', None, 'JSON output path (default: DIR/guidance_sweep.json).')

COLUMNS = ('quality', 'diversity', 'length', 'length_gap', 'length_w1', 'length_off_grid',
           'unseen_2gram', 'unseen_3gram')


def sweep(config, workdir: str, gammas, alphas, data_bounds: bool = True) -> list[dict]:
  exp = experiment_lib.prepare(config)
  e = exp.config.evaluate
  wd = workdir_lib.WorkDir(workdir)
  embedder, quality_model = evaluators.frozen_models(wd)
  base, _ = checkpoints.restore_model_params(workdir_lib.checkpoints(wd.pretrain), exp.model_cfg,
                                             exp.mesh, exp.rules)
  prompts_PxC = evaluate.evaluation_prompts(exp)
  sampler = sampling.Sampler(exp.model_cfg, exp.model_cfg.seq_len, exp.mesh, exp.rules)
  reference = measure.fidelity_reference(exp)
  key = jax.random.key(exp.config.seed + 1234)  # the evaluation's key
  bounds = exp.length_bounds if data_bounds else sampling.LengthBounds()
  rows = []
  for gamma in gammas:
    for alpha in (alphas if gamma != 1.0 else alphas[:1]):  # gamma = 1 ignores alpha
      fn = lambda p, k, g=gamma, a=alpha: sampler.sample_cfg(
          base, p, k, gamma=g, plausibility=a, temperature=e.temperature,
          bounds=bounds)
      start = time.perf_counter()
      tokens, _ = measure.sample_k(fn, prompts_PxC, e.k, key)
      metrics = measure.score_samples(tokens, prompts_PxC, embedder, quality_model, e.ngram,
                                      reference=reference)
      rows.append({'dataset': exp.meta.name, 'gamma': gamma, 'plausibility': alpha,
                   'length_bounds': tuple(int(b) for b in bounds),
                   'seconds': time.perf_counter() - start, **metrics})
      print(f'{exp.meta.name} gamma={gamma:g} alpha={alpha:g}: ' +
            ', '.join(f'{c}={metrics[c]:.3f}' for c in COLUMNS if c in metrics), flush=True)
  return rows


def markdown(rows: list[dict]) -> str:
  """The sweep as a markdown table (docs/guidance.md)."""
  cols = [c for c in COLUMNS if c in rows[0]]
  lines = ['| gamma | alpha | ' + ' | '.join(cols) + ' |', '|' + '---:|' * (len(cols) + 2)]
  lines += [f"| {r['gamma']:g} | {r['plausibility']:g} | " +
            ' | '.join(f'{r[c]:.3f}' for c in cols) + ' |' for r in rows]
  return '\n'.join(lines)


def main(argv):
  del argv
  gammas = [float(g) for g in _GAMMAS.value]
  alphas = [float(a) for a in _ALPHAS.value]
  rows = sweep(_CONFIG.value, _WORKDIR.value, gammas, alphas, _LENGTHS.value == 'data')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'guidance_sweep.json')
  with open(out, 'w') as f:
    json.dump(rows, f, indent=1)
  print(markdown(rows))
  print('written to', out)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
