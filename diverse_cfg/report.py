"""Presenting: the results table, the front and training-curve plots, the samples, report.html.

Samples are shown through one renderer per dataset, chosen by evaluate.renderer
(the evaluate stage's gallery and the sample command alike). A renderer is
fn(tokens_KxT, meta, stem) -> {extension: path}: it writes files named
stem + '.' + extension for the K generations of one prompt and returns them.
The report plays '.wav', shows '.png' and links everything else.

    auto     melody for melody datasets, tokens otherwise
    melody   MIDI and WAV of generation 0, a piano roll of generations 0 and 1
             (the report; `sample` renders each generation alone)
    tokens   a picture of the token rows (any dataset): one row per generation,
             one colour per token id, EOS black, PAD blank
    pkg.module:function   a user's own renderer with the signature above
"""

from __future__ import annotations

import csv
import html
import importlib
from importlib import metadata
import json
import os
from typing import Callable

import matplotlib
import numpy as np

from diverse_cfg import claims as claims_lib
from diverse_cfg import specials
from diverse_cfg.data import melody


def _pyplot():
  """pyplot on the file-only backend (no display needed)."""
  matplotlib.use('Agg')
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


Renderer = Callable[[np.ndarray, object, str], dict]


def melody_files(tokens_KxT: np.ndarray, meta, stem: str) -> dict[str, str]:
  del meta
  melody.write_midi(tokens_KxT[0], stem + '.mid')
  melody.write_wav(tokens_KxT[0], stem + '.wav')
  shown = min(2, len(tokens_KxT))
  melody.piano_roll_png(list(tokens_KxT[:shown]), stem + '.png',
                        titles=[f'sample {i}' for i in range(shown)])
  return {ext: f'{stem}.{ext}' for ext in ('mid', 'wav', 'png')}


def token_files(tokens_KxT: np.ndarray, meta, stem: str) -> dict[str, str]:
  """One image row per generation: token ids as colours up to EOS (black), PAD left blank."""
  plt = _pyplot()
  tokens_KxT = np.asarray(tokens_KxT)
  after_eos_KxT = np.cumsum(tokens_KxT == specials.EOS, axis=1) > 0
  events_KxT = np.ma.masked_where(after_eos_KxT | (tokens_KxT < specials.NUM_SPECIAL),
                                  tokens_KxT)
  # Trim the shared tail of PAD so short rows are readable.
  used = np.flatnonzero((tokens_KxT != specials.PAD).any(axis=0))
  width = int(used[-1]) + 1 if used.size else 1
  k = len(tokens_KxT)
  fig, ax = plt.subplots(figsize=(min(12, 2 + 0.12 * width), 0.35 * k + 1))
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
  vocab = getattr(meta, 'vocab_size', None) or int(tokens_KxT.max()) + 1
  ax.imshow(events_KxT[:, :width], aspect='auto', cmap=cmap, interpolation='nearest',
            vmin=specials.NUM_SPECIAL, vmax=max(vocab - 1, specials.NUM_SPECIAL + 1))
  eos_k, eos_t = np.nonzero((tokens_KxT == specials.EOS) & (np.cumsum(
      tokens_KxT == specials.EOS, axis=1) == 1))
  ax.scatter(eos_t[eos_t < width], eos_k[eos_t < width], marker='s', color='black', s=12,
             label='EOS')
  ax.set_yticks(range(k))
  ax.set_yticklabels([f'sample {i}' for i in range(k)], fontsize=7)
  ax.set_xlabel('position')
  fig.tight_layout()
  fig.savefig(stem + '.png', dpi=80)
  plt.close(fig)
  return {'png': stem + '.png'}


BUILTIN = {'melody': melody_files, 'tokens': token_files}


def resolve_renderer(name: str, meta) -> Renderer:
  """The renderer named by evaluate.renderer (see the module docstring)."""
  if name == 'auto':
    return melody_files if meta.is_melody else token_files
  if name in BUILTIN:
    if name == 'melody' and not meta.is_melody:
      raise ValueError(f"evaluate.renderer='melody' but dataset {meta.name!r} is not a melody "
                       "dataset; use 'tokens', 'auto' or your own 'pkg.module:function'")
    return BUILTIN[name]
  module, sep, fn = name.partition(':')
  if not sep or not module or not fn:
    raise ValueError(f"evaluate.renderer={name!r}: expected 'auto', 'melody', 'tokens' or "
                     "'pkg.module:function'")
  try:
    return getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'evaluate.renderer={name!r} cannot be loaded: {e}') from e


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
  plt = _pyplot()
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
  render = resolve_renderer(renderer, meta)
  sample_dir = os.path.join(out_dir, 'samples')
  os.makedirs(sample_dir, exist_ok=True)
  files = {}
  for name, tokens_PxKxT in samples.items():
    slug = name.replace(' ', '_').replace('=', '')
    for p in range(min(num_prompts, len(prompts_PxC))):
      written = render(np.asarray(tokens_PxKxT[p]), meta, os.path.join(sample_dir, f'{slug}_p{p}'))
      files[(name, p)] = {ext: os.path.relpath(path, out_dir) for ext, path in written.items()}
  return files


CURVES = ('kl', 'kl_heldout', 'reward/diversity', 'entropy', 'length')


def plot_curves(runs: dict[float, list[dict]], path: str) -> str | None:
  """Each student's training curves (CURVES, per logged step): {beta: its metrics.jsonl rows}."""
  runs = {b: r for b, r in runs.items() if r}
  if not runs:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
  for ax, key in zip(axes, CURVES):
    for b, rows in runs.items():
      pts = [(r['step'], r[key]) for r in rows if key in r]
      if pts:
        line, = ax.plot(*zip(*pts), label=f'beta={float(b):g}')
        objective = [(r['step'], r['objective']) for r in rows if 'objective' in r]
        if key == 'kl' and objective:  # the convergence verdict's readings, on the same scale
          ax.plot(*zip(*objective), 'o', color=line.get_color(), markersize=7)
    ax.set_title('kl (dots: the objective read for convergence)' if key == 'kl' else key,
                 fontsize=10 if key == 'kl' else None)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def library_versions() -> dict[str, str]:
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
