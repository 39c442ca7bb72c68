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
report.html.

    python -m diverse_cfg.main --stage=evaluate --config=configs/essen.py:cpu --workdir=DIR
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diverse_cfg import claims as claims_lib
from diverse_cfg import convergence
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import finetune
from diverse_cfg import merge as merge_lib
from diverse_cfg import renderers
from diverse_cfg import sampling
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg.evaluators import bootstrap


def repeat_prompts(prompts_PxC: np.ndarray, k: int) -> np.ndarray:
  return np.repeat(np.asarray(prompts_PxC, np.int32), k, axis=0)


def score_figures(tokens_PxKxT, prompts_PxC, embedder, quality_model, ngram: int = 4,
                  well_formed_fn: Callable | None = None,
                  reference=None) -> dict[str, bootstrap.Figure]:
  """Every figure of P x K samples, as a bootstrap figure over the P prompts.

  quality (and per attribute), diversity (embedding), prefix_diversity (the
  embedding diversity over length-matched pairs), ngram_diversity (model-free),
  eos_rate, well_formed, length, and with a reference (an
  evaluators.FidelityReference) the fidelity figures.
  """
  from diverse_cfg import evaluators  # pylint: disable=g-import-not-at-top
  from diverse_cfg.evaluators import metrics  # pylint: disable=g-import-not-at-top
  tokens_PxKxT = np.asarray(tokens_PxKxT)
  p, k, t = tokens_PxKxT.shape
  flat_BxT = tokens_PxKxT.reshape(p * k, t)
  out = {'diversity': bootstrap.prompt_mean(
             metrics.diversity_per_prompt(embedder, jnp.asarray(tokens_PxKxT))),
         'prefix_diversity': bootstrap.prompt_mean(
             metrics.prefix_diversity_per_prompt(embedder, tokens_PxKxT)),
         'ngram_diversity': bootstrap.prompt_mean(
             1.0 - metrics.shared_ngram_fraction_per_prompt(tokens_PxKxT, n=ngram))}
  if quality_model is not None:
    mean_B, per_attr_BxA = evaluators.quality(quality_model, jnp.asarray(flat_BxT),
                                              jnp.asarray(repeat_prompts(prompts_PxC, k)))
    out['quality'] = bootstrap.row_mean(np.asarray(mean_B).reshape(p, k))
    for i, name in enumerate(getattr(quality_model, 'attribute_names', None) or
                             [str(a) for a in range(per_attr_BxA.shape[1])]):
      out[f'quality/{name}'] = bootstrap.row_mean(np.asarray(per_attr_BxA)[:, i].reshape(p, k))
  out['eos_rate'] = bootstrap.row_mean((tokens_PxKxT == specials.EOS).any(axis=-1))
  if well_formed_fn is not None:
    out['well_formed'] = bootstrap.row_mean(
        np.asarray([well_formed_fn(row) for row in flat_BxT], np.float64).reshape(p, k))
  out['length'] = bootstrap.row_mean((tokens_PxKxT != specials.PAD).sum(axis=-1))
  if reference is not None:
    out.update(metrics.fidelity_figures(tokens_PxKxT, reference))
  return out


def score_samples(tokens_PxKxT, prompts_PxC, embedder, quality_model, ngram: int = 4,
                  well_formed_fn: Callable | None = None,
                  reference=None) -> dict[str, float]:
  """The point values of score_figures."""
  return {name: f.point() for name, f in score_figures(
      tokens_PxKxT, prompts_PxC, embedder, quality_model, ngram, well_formed_fn,
      reference).items()}


def with_intervals(figures: dict[str, bootstrap.Figure], idx_RxP: np.ndarray,
                   level: float) -> dict[str, float]:
  """{name: point, name_lo, name_hi: its bootstrap interval at the level}."""
  out = {}
  for name, f in figures.items():
    s = bootstrap.summary(f.draws(idx_RxP), level)
    out.update({name: s['value'], f'{name}_lo': s['lo'], f'{name}_hi': s['hi']})
  return out


def fidelity_reference(exp: experiment_lib.Experiment):
  """The training split's n-grams and the held-out split's lengths (test, else validation)."""
  from diverse_cfg import evaluators  # pylint: disable=g-import-not-at-top
  from diverse_cfg.evaluators import stage  # pylint: disable=g-import-not-at-top
  tokens = lambda split: stage.split_arrays(exp.sources[split], ('tokens',))['tokens']
  return evaluators.FidelityReference.from_rows(tokens('train'),
                                                tokens(stage.heldout_split(exp.sources)))


def evaluation_prompts(exp: experiment_lib.Experiment) -> np.ndarray:
  """The evaluation's prompts: the first evaluate.num_prompts of the test split (else validation)."""
  src = exp.sources.get('test') or exp.sources['validation']
  n = min(exp.config.evaluate.num_prompts, len(src))
  return np.stack([np.asarray(src[i]['prompt']) for i in range(n)]).astype(np.int32)


def sample_k(sample_fn, prompts_PxC, k: int, key) -> tuple[np.ndarray, float]:
  """(tokens [P, K, T], seconds) for sample_fn(prompt_BxC, key) -> (tokens, logprobs)."""
  rows = jnp.asarray(repeat_prompts(prompts_PxC, k))
  start = time.perf_counter()
  tokens, _ = sample_fn(rows, key)
  tokens = sharding_lib.to_host(tokens)  # all-gathers when the rows span several processes
  seconds = time.perf_counter() - start
  return tokens.reshape(len(prompts_PxC), k, -1), seconds


def measure_system(sample_fn, prompts_PxC, k, embedder, quality_model, key,
                   ngram: int = 4, reference=None) -> dict[str, float]:
  """The periodic finetuning evaluation: sample, then score (prefixed eval/)."""
  tokens, _ = sample_k(sample_fn, prompts_PxC, k, key)
  return {f'eval/{k_}': v for k_, v in score_samples(
      tokens, prompts_PxC, embedder, quality_model, ngram, reference=reference).items()}


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


def build_systems(exp: experiment_lib.Experiment, workdir: str) -> list[System]:
  e = exp.config.evaluate
  base, _ = finetune.restore_model_params(finetune.base_dir(workdir), exp.model_cfg, exp.mesh,
                                          exp.rules)
  systems = [System('base', 'base', 1.0, base)]
  alpha = float(exp.config.guidance.plausibility)
  systems += [System(f'cfg gamma={g:g}', 'cfg', float(g), base,
                     guidance=sampling.Guidance(float(g), alpha), guided=True) for g in e.gammas]
  students = {}
  for beta in sorted(float(b) for b in exp.config.finetune.betas):
    d = os.path.join(finetune.student_dir(workdir, beta), 'checkpoints')
    students[beta], _ = finetune.restore_model_params(d, exp.model_cfg, exp.mesh, exp.rules)
    systems.append(System(f'student beta={beta:g}', 'student', beta, students[beta]))
  lo, hi = min(students), max(students)
  if hi > lo:
    for lam in e.lambdas:
      systems.append(System(f'merge lambda={lam:g}', 'merge', float(lam),
                            merge_lib.merge_params(students[lo], students[hi], float(lam))))
  return systems


def run(config, workdir: str, embedder, quality_model, devices=None) -> list[dict]:
  exp = experiment_lib.prepare(config, devices)
  e = exp.config.evaluate
  out_dir = os.path.join(workdir, 'evaluate')
  os.makedirs(out_dir, exist_ok=True)
  prompts_PxC = evaluation_prompts(exp)
  sampler = sampling.Sampler(exp.model_cfg, exp.model_cfg.seq_len, exp.mesh, exp.rules)
  key = jax.random.key(exp.config.seed + 1234)  # the same key for every system
  well_formed = None
  if exp.meta.is_melody:
    from diverse_cfg.data import melody  # pylint: disable=g-import-not-at-top
    well_formed = melody.is_well_formed

  bounds = exp.length_bounds
  reference = fidelity_reference(exp)

  def sample_fn(system):
    if system.guided:
      return lambda rows, k: sampler.sample_cfg(
          system.params, rows, k, gamma=system.guidance.gamma,
          plausibility=system.guidance.plausibility, temperature=e.temperature, bounds=bounds)
    return lambda rows, k: sampler.sample(system.params, rows, k, temperature=e.temperature,
                                          bounds=bounds)

  systems = build_systems(exp, workdir)
  # Compile both samplers once, so the timings below measure sampling only.
  for s in (systems[0], systems[1]):
    sample_k(sample_fn(s), prompts_PxC, e.k, key)
  idx_RxP = bootstrap.resample(len(prompts_PxC), e.bootstrap_resamples, exp.config.seed)
  rows, samples, figures = [], {}, {}
  for s in systems:
    tokens, seconds = sample_k(sample_fn(s), prompts_PxC, e.k, key)
    samples[s.name] = tokens
    figures[s.name] = score_figures(tokens, prompts_PxC, embedder, quality_model, e.ngram,
                                    well_formed, reference)
    rows.append({'system': s.name, 'family': s.family, 'setting': s.setting,
                 'plausibility': float(s.guidance.plausibility) if s.guided else 0.0,
                 'passes_per_token': s.passes_per_token,
                 'tokens_per_sec': float((tokens != specials.PAD).sum()) / seconds,  # real
                 **with_intervals(figures[s.name], idx_RxP, e.level)})
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
    write_table(rows, out_dir)
    plot_front(rows, os.path.join(out_dir, 'front.png'))
    rendered = render_samples(exp.meta, samples, prompts_PxC, e.render_prompts, out_dir,
                              e.renderer)
    runs = {b: convergence.run_metrics(finetune.student_dir(workdir, b))
            for b in sorted(float(b) for b in exp.config.finetune.betas)}
    curves = plot_curves(runs, os.path.join(out_dir, 'curves.png'))
    converged = [convergence.describe(f'student beta={b:g}',
                                      convergence.check(rows_b, exp.config.finetune))
                 for b, rows_b in runs.items()]
    write_report(rows, rendered, exp.meta, prompts_PxC, out_dir, claims,
                 curves and os.path.basename(curves), converged, exp.config)
  return rows


def write_table(rows: list[dict], out_dir: str) -> None:
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(out_dir, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


FAMILY_STYLE = {'cfg': ('tab:blue', 'o-'), 'merge': ('tab:red', 's-'),
                'student': ('tab:green', 'D'), 'base': ('black', 'x')}


def plot_front(rows: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  if not rows or 'quality' not in rows[0]:
    return
  fig, ax = plt.subplots(figsize=(7, 5))
  for family, (color, style) in FAMILY_STYLE.items():
    fam = [r for r in rows if r['family'] == family]
    if not fam:
      continue
    label = {'cfg': 'CFG (gamma)', 'merge': 'LERP merge (lambda)', 'student': 'students (beta)',
             'base': 'base, no CFG'}[family]
    ax.plot([r['diversity'] for r in fam], [r['quality'] for r in fam], style, color=color,
            label=label)
    if 'quality_lo' in fam[0]:  # the bootstrap intervals as whiskers
      whisker = lambda m: np.abs(np.asarray([[r[f'{m}_lo'] for r in fam], [r[f'{m}_hi'] for r in fam]])
                                 - np.asarray([r[m] for r in fam]))
      ax.errorbar([r['diversity'] for r in fam], [r['quality'] for r in fam],
                  xerr=whisker('diversity'), yerr=whisker('quality'), fmt='none', ecolor=color,
                  alpha=0.4, capsize=2)
    for r in fam:
      ax.annotate(f"{r['setting']:g}", (r['diversity'], r['quality']), fontsize=7,
                  textcoords='offset points', xytext=(3, 3), color=color)
  ax.set_xlabel('diversity (mean pairwise 1 - cos of embeddings)')
  ax.set_ylabel('quality (prompt adherence)')
  ax.set_title('Quality / diversity on held-out prompts')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def render_samples(meta, samples: dict[str, np.ndarray], prompts_PxC, num_prompts: int,
                   out_dir: str, renderer: str = 'auto') -> dict[tuple[str, int], dict[str, str]]:
  """The K generations of the first prompts, per system, through the dataset's renderer.

  Returns {(system, prompt): {extension: path relative to out_dir}}.
  """
  render = renderers.resolve(renderer, meta)
  sample_dir = os.path.join(out_dir, 'samples')
  os.makedirs(sample_dir, exist_ok=True)
  files = {}
  for name, tokens_PxKxT in samples.items():
    slug = name.replace(' ', '_').replace('=', '')
    for p in range(min(num_prompts, len(prompts_PxC))):
      written = render(np.asarray(tokens_PxKxT[p]), meta, os.path.join(sample_dir, f'{slug}_p{p}'))
      files[(name, p)] = {ext: os.path.relpath(path, out_dir) for ext, path in written.items()}
  return files


CURVES = ('kl', 'reward/diversity', 'entropy', 'length')


def plot_curves(runs: dict[float, list[dict]], path: str) -> str | None:
  """Each student's training curves (CURVES, per logged step): {beta: its metrics.jsonl rows}."""
  runs = {b: r for b, r in runs.items() if r}
  if not runs:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
  for ax, key in zip(axes, CURVES):
    for b, rows in runs.items():
      pts = [(r['step'], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), label=f'beta={float(b):g}')
    ax.set_title(key)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def library_versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ('diverse_cfg', 'jax', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'grain',
               'tensorflow-datasets', 'music21'):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def _cell(row: dict, name: str) -> str:
  """A figure with its interval, for reading: 0.723 [0.701, 0.745]; counts without decimals."""
  v = row[name]
  if not isinstance(v, float):
    return html.escape(str(v))
  digits = 0 if abs(v) >= 1000 else 1 if abs(v) >= 10 else 3
  text = f'{v:,.{digits}f}'
  if f'{name}_lo' in row:
    text += (f' <span class="ci">[{row[name + "_lo"]:,.{digits}f}, '
             f'{row[name + "_hi"]:,.{digits}f}]</span>')
  return text


REPORT_STYLE = """<style>
body { font-family: sans-serif; max-width: 1300px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.ci { color: #888; font-size: 11px; }
.holds { color: #17803d; } .fails { color: #b3261e; } .undecided { color: #8a6d00; }
</style>"""


def write_report(rows, rendered, meta, prompts_PxC, out_dir: str,
                 claims: list[dict] | None = None, curves: str | None = None,
                 convergence_lines: tuple[str, ...] = (), config=None) -> str:
  """report.html in out_dir: the claims verdict, the front, the table with intervals, the
  students' training curves, the sample gallery, the config and library versions."""
  cols = ['system', 'passes_per_token', 'tokens_per_sec'] + [
      k for k in rows[0] if isinstance(rows[0][k], float) and not k.endswith(('_lo', '_hi'))
      and k not in ('setting', 'plausibility', 'tokens_per_sec')]
  table = '<tr>' + ''.join(f'<th>{html.escape(c)}</th>' for c in cols) + '</tr>\n'
  table += ''.join('<tr>' + ''.join(f'<td>{_cell(r, c)}</td>' for c in cols) + '</tr>\n'
                   for r in rows)
  parts = [f'<h1>diverse_cfg: quality / diversity on {html.escape(meta.name)}</h1>']
  if claims:
    parts.append('<h2>The paper\'s claims</h2><ul>' + ''.join(
        f'<li class="{c["verdict"]}"><b>{html.escape(line)}</b></li>'
        for c, line in zip(claims, claims_lib.headline(claims))) + '</ul>')
  parts += ['<img src="front.png" alt="quality vs diversity front">',
            '<h2>Results</h2><p>Each figure with its bootstrap interval over prompts.</p>'
            '<div style="overflow-x: auto"><table>' + table + '</table></div>']
  if curves:
    parts.append('<h2>Training curves of the students</h2><ul>' + ''.join(
        f'<li>{html.escape(line)}</li>' for line in convergence_lines) + '</ul>'
        f'<img src="{curves}" alt="training curves" width=1200>')
  parts.append('<h2>Samples</h2>')
  for p in sorted({p for _, p in rendered}):
    prompt = ', '.join(f'{k}: {v}' for k, v in meta.decode_prompt(prompts_PxC[p]).items())
    parts.append(f'<h3>Prompt {p}: {html.escape(prompt)}</h3>')
    for r in rows:
      files = rendered.get((r['system'], p), {})
      media = []
      for ext, rel in files.items():
        if ext == 'wav':
          media.append(f'<audio controls src="{rel}"></audio>')
        elif ext == 'png':
          media.append(f'<br><img src="{rel}" width=700>')
        else:
          media.append(f'<a href="{rel}">{html.escape(ext.upper())}</a>')
      if media:
        parts.append(f'<h4>{html.escape(r["system"])}</h4>' + ' '.join(media))
  if config is not None:
    parts.append('<h2>Configuration and versions</h2><pre>' + html.escape(
        json.dumps(library_versions(), indent=1)) + '</pre><details><summary>config</summary><pre>'
        + html.escape(config.to_json_best_effort(indent=1)) + '</pre></details>')
  page = ('<!doctype html><html><head><meta charset="utf-8"><title>diverse_cfg report</title>'
          + REPORT_STYLE + '</head><body>' + '\n'.join(parts) + '</body></html>')
  path = os.path.join(out_dir, 'report.html')
  with open(path, 'w') as f:
    f.write(page)
  return path
