"""The quality/diversity comparison of every system, and the report.

Systems, all sampled on the same held-out (test split) prompts with k
generations each and the same keys:
  base     the base model without guidance (1 forward pass per token)
  cfg      the base model with CFG at each gamma in evaluate.gammas (2 passes)
  student  each finetuned student (beta in finetune.betas; 1 pass)
  merge    LERP of the beta-min and beta-max students over evaluate.lambdas (1 pass)
For each: quality (mean adherence probability, and per attribute), embedding
diversity, the same over length-matched pairs (prefix_diversity: a change of
length alone cannot raise it), a model-free diversity (1 - shared n-gram
fraction), the model-free
fidelity to the data (unseen 2-/3-grams against the training split, the gap
and Wasserstein-1 distance between generated and held-out lengths), the share
of well-formed generations (melodies) and of generations that ended with EOS,
forward passes per token and measured tokens/s (real tokens: events and EOS,
not the PAD after it). CFG rows guide with
guidance.plausibility; every system samples under the data's length bounds.
Every figure has a bootstrap interval over prompts (evaluate.level); the
paper's four claims are decided from paired draws (claims.py). Written to
DIR/evaluate/: claims.json, results.csv, results.json (each figure with _lo /
_hi), front.png (quality vs diversity per family, with whiskers), curves.png
(the students' training curves), samples/ (through evaluate.renderer: MIDI,
WAV and piano rolls for melodies, a picture of the token rows otherwise) and
report.html. Measuring is measure.py, presenting report.py.

    python -m diverse_cfg.main --stage=evaluate --config=configs/essen.py:cpu --workdir=DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from diverse_cfg import checkpoints
from diverse_cfg import claims as claims_lib
from diverse_cfg import convergence
from diverse_cfg import evaluators
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import measure
from diverse_cfg import merge as merge_lib
from diverse_cfg import report
from diverse_cfg import sampling
from diverse_cfg import specials
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.evaluators import bootstrap


def evaluation_prompts(exp: experiment_lib.Experiment) -> np.ndarray:
  """The evaluation's prompts: the first evaluate.num_prompts of the test split (else validation)."""
  src = exp.sources.get('test') or exp.sources['validation']
  n = min(exp.config.evaluate.num_prompts, len(src))
  return np.stack([np.asarray(src[i]['prompt']) for i in range(n)]).astype(np.int32)




@dataclasses.dataclass
class System:
  name: str
  family: str  # base | cfg | student | merge
  setting: float  # gamma, beta or lambda
  params: Any
  guidance: sampling.Guidance = sampling.Guidance()  # used when guided
  guided: bool = False

  @property
  def passes_per_token(self) -> int:
    return 2 if self.guided else 1


def build_systems(exp: experiment_lib.Experiment, wd: workdir_lib.WorkDir) -> list[System]:
  e = exp.config.evaluate
  restore = lambda run_dir: checkpoints.restore_model_params(
      workdir_lib.checkpoints(run_dir), exp.model_cfg, exp.mesh, exp.rules)[0]
  base = restore(wd.pretrain)
  systems = [System('base', 'base', 1.0, base)]
  alpha = float(exp.config.guidance.plausibility)
  systems += [System(f'cfg gamma={g:g}', 'cfg', float(g), base,
                     guidance=sampling.Guidance(float(g), alpha), guided=True) for g in e.gammas]
  students = {}
  for beta in sorted(float(b) for b in exp.config.finetune.betas):
    students[beta] = restore(wd.student(beta))
    systems.append(System(f'student beta={beta:g}', 'student', beta, students[beta]))
  lo, hi = min(students), max(students)
  if hi > lo:
    for lam in e.lambdas:
      systems.append(System(f'merge lambda={lam:g}', 'merge', float(lam),
                            merge_lib.merge_params(students[lo], students[hi], float(lam))))
  return systems


def run(config, workdir: workdir_lib.WorkDir | str, devices=None, *, embedder=None,
        quality_model=None) -> list[dict]:
  """Samples and scores every system, decides the claims, writes DIR/evaluate.

  embedder / quality_model: the frozen evaluators (default: the work directory's).
  """
  wd = workdir_lib.of(workdir)
  embedder, quality_model = evaluators.frozen_models(wd, embedder, quality_model)
  exp = experiment_lib.prepare(config, devices)
  e = exp.config.evaluate
  out_dir = wd.evaluate
  os.makedirs(out_dir, exist_ok=True)
  prompts_PxC = evaluation_prompts(exp)
  sampler = sampling.Sampler(exp.model_cfg, exp.model_cfg.seq_len, exp.mesh, exp.rules)
  key = jax.random.key(exp.config.seed + 1234)  # the same key for every system
  well_formed = measure.well_formed_check(exp.meta)

  bounds = exp.length_bounds
  reference = measure.fidelity_reference(exp)

  def sample_fn(system):
    if system.guided:
      return lambda rows, k: sampler.sample_cfg(
          system.params, rows, k, gamma=system.guidance.gamma,
          plausibility=system.guidance.plausibility, temperature=e.temperature, bounds=bounds)
    return lambda rows, k: sampler.sample(system.params, rows, k, temperature=e.temperature,
                                          bounds=bounds)

  systems = build_systems(exp, wd)
  # Compile both samplers once, so the timings below measure sampling only.
  for s in (systems[0], systems[1]):
    measure.sample_k(sample_fn(s), prompts_PxC, e.k, key)
  idx_RxP = bootstrap.resample(len(prompts_PxC), e.bootstrap_resamples, exp.config.seed)
  rows, samples, figures, done = [], {}, {}, {}
  for s in systems:
    # The same arrays, the same samples: a merge at lambda 0 or 1 is its student (merge_params).
    same = (tuple(map(id, jax.tree.leaves(s.params))), s.guided, s.guidance)
    if same not in done:
      tokens, seconds = measure.sample_k(sample_fn(s), prompts_PxC, e.k, key)
      done[same] = tokens, seconds, measure.score_figures(
          tokens, prompts_PxC, embedder, quality_model, e.ngram, well_formed, reference)
    tokens, seconds, figures[s.name] = done[same]
    samples[s.name] = tokens
    rows.append({'system': s.name, 'family': s.family, 'setting': s.setting,
                 'plausibility': float(s.guidance.plausibility) if s.guided else 0.0,
                 'passes_per_token': s.passes_per_token,
                 'tokens_per_sec': float((tokens != specials.PAD).sum()) / seconds,  # real
                 **measure.with_intervals(figures[s.name], idx_RxP, e.level)})
    if jax.process_index() == 0:  # every process has the same row
      print(f"{s.name:>22}: " + ', '.join(
          f'{k}={v:.4g}' for k, v in rows[-1].items() if isinstance(v, float) and '/' not in k
          and not k.endswith(('_lo', '_hi'))))
  claims = claims_lib.decide(rows, figures, idx_RxP, exp.config.finetune.teacher_gamma,
                             e.level, e.match_margin)
  if jax.process_index() == 0:  # every process computed the same rows; one writes them
    print('\n'.join(claims_lib.headline(claims)))
    with open(os.path.join(out_dir, 'claims.json'), 'w') as f:
      json.dump({'level': e.level, 'num_prompts': len(prompts_PxC), 'k': e.k,
                 'bootstrap_resamples': e.bootstrap_resamples, 'claims': claims}, f, indent=1)
    report.write_table(rows, out_dir)
    report.plot_front(rows, os.path.join(out_dir, 'front.png'))
    rendered = report.render_samples(exp.meta, samples, prompts_PxC, e.render_prompts,
                                     out_dir, e.renderer)
    runs = {b: convergence.run_metrics(wd.student(b))
            for b in sorted(float(b) for b in exp.config.finetune.betas)}
    curves = report.plot_curves(runs, os.path.join(out_dir, 'curves.png'))
    converged = [convergence.describe(f'student beta={b:g}',
                                      convergence.check(rows_b, exp.config.finetune))
                 for b, rows_b in runs.items()]
    report.write_report(rows, rendered, exp.meta, prompts_PxC, out_dir, claims,
                        curves and os.path.basename(curves), converged, exp.config)
  return rows
