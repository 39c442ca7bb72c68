"""The paper's four claims (DESIGN.md 1.4), decided at a confidence level from paired draws.

Every system is sampled on the same prompts with the same keys, so the
difference of two systems' figures is bootstrapped *paired*: the same resampled
prompt indices for both (evaluators.bootstrap). A claim holds when its
interval(s) lie on the claimed side, fails when one lies wholly on the other
side, and is undecided otherwise:

1. CFG raises quality and lowers diversity (at the teacher's gamma, against
   the base model without CFG): quality difference > 0 and diversity
   difference < 0.
2. The beta = min student matches CFG's quality (at the teacher's gamma) with
   half the forward passes: the quality difference student - CFG is above
   -margin (non-inferiority; margin = evaluate.match_margin).
3. The beta = max student is more diverse than the beta = min one, by the
   embedding diversity *and* by the length-matched diversity (a length change
   alone cannot raise the second).
4. The students' + merges' front dominates CFG's: their hypervolume
   (quality x diversity, one reference point per draw: the worst quality and
   the worst diversity of any system) exceeds CFG's, i.e. the difference is
   > 0, with the embedding diversity and with the length-matched one (the
   ratio is reported beside it; it is infinite on a draw where CFG's front
   encloses nothing); also which CFG points some student or merge beats on
   both axes (point estimate, and at the level).
"""

from __future__ import annotations

import numpy as np

from diverse_cfg.evaluators import bootstrap

CLAIMS = {
    1: 'CFG raises quality and lowers diversity',
    2: 'the beta = 0 student matches CFG quality at half the sampling cost',
    3: 'beta > 0 makes the student more diverse',
    4: "the students' and merges' front dominates CFG's",
}
DIVERSITIES = ('diversity', 'prefix_diversity')  # embedding; length-matched


def _verdict(claimed_side_ok: bool, other_side: bool) -> str:
  return 'holds' if claimed_side_ok else 'fails' if other_side else 'undecided'


def _combine(*verdicts: str) -> str:
  """All hold -> holds; any fails -> fails; else undecided."""
  if 'fails' in verdicts:
    return 'fails'
  return 'holds' if all(v == 'holds' for v in verdicts) else 'undecided'


def decide(rows: list[dict], figures: dict[str, dict[str, bootstrap.Figure]],
           idx_RxP: np.ndarray, teacher_gamma: float, level: float = 0.95,
           margin: float = 0.02) -> list[dict]:
  """The four claims, each {'claim', 'statement', 'verdict', 'evidence'}.

  rows: the evaluation's systems (keys 'system', 'family', 'setting',
  'passes_per_token'); figures[system][metric]: that system's bootstrap
  figures; idx_RxP: bootstrap.resample's indices (row 0 = the evaluation).
  """
  draws = {name: {m: f.draws(idx_RxP) for m, f in figs.items()
                  if m in ('quality',) + DIVERSITIES}
           for name, figs in figures.items()}
  by_family = {fam: sorted((r for r in rows if r['family'] == fam), key=lambda r: r['setting'])
               for fam in ('base', 'cfg', 'student', 'merge')}
  teacher = [r for r in by_family['cfg'] if abs(r['setting'] - teacher_gamma) < 1e-9]

  def diff(a: str, b: str, metric: str) -> dict[str, float]:
    return bootstrap.summary(draws[a][metric] - draws[b][metric], level)

  def undecided(claim: int, why: str) -> dict:
    return {'claim': claim, 'statement': CLAIMS[claim], 'verdict': 'undecided',
            'evidence': {'missing': why}}

  if any('quality' not in figs for figs in figures.values()):
    return [undecided(c, 'needs a quality model (the classifier stage)') for c in CLAIMS]
  out = []
  # 1. CFG vs the base model.
  if not by_family['base'] or not teacher:
    out.append(undecided(1, f'needs the base model and CFG at the teacher gamma {teacher_gamma:g} '
                            'among evaluate.gammas'))
  else:
    base, cfg = by_family['base'][0]['system'], teacher[0]['system']
    dq, dd = diff(cfg, base, 'quality'), diff(cfg, base, 'diversity')
    per_gamma = {f"{r['setting']:g}": {'quality_diff': diff(r['system'], base, 'quality'),
                                       'diversity_diff': diff(r['system'], base, 'diversity')}
                 for r in by_family['cfg']}
    out.append({'claim': 1, 'statement': CLAIMS[1],
                'verdict': _combine(_verdict(dq['lo'] > 0, dq['hi'] < 0),
                                    _verdict(dd['hi'] < 0, dd['lo'] > 0)),
                'evidence': {'compared': f'{cfg} - {base}', 'quality_diff': dq,
                             'diversity_diff': dd, 'every_gamma': per_gamma}})

  students = by_family['student']
  # 2. The quality student vs its teacher.
  if not students or not teacher:
    out.append(undecided(2, 'needs a student and CFG at the teacher gamma among evaluate.gammas'))
  else:
    s0, cfg = students[0], teacher[0]
    dq = diff(s0['system'], cfg['system'], 'quality')
    out.append({'claim': 2, 'statement': CLAIMS[2],
                'verdict': _verdict(dq['lo'] > -margin, dq['hi'] < -margin),
                'evidence': {'compared': f"{s0['system']} - {cfg['system']}", 'quality_diff': dq,
                             'margin': margin,
                             'passes_per_token': [s0['passes_per_token'],
                                                  cfg['passes_per_token']]}})

  # 3. The diversity student vs the quality student.
  if len(students) < 2:
    out.append(undecided(3, 'needs two students (finetune.betas)'))
  else:
    lo, hi = students[0]['system'], students[-1]['system']
    diffs = {m: diff(hi, lo, m) for m in DIVERSITIES}
    out.append({'claim': 3, 'statement': CLAIMS[3],
                'verdict': _combine(*(_verdict(d['lo'] > 0, d['hi'] < 0) for d in diffs.values())),
                'evidence': {'compared': f'{hi} - {lo}',
                             **{f'{m}_diff': d for m, d in diffs.items()}}})

  # 4. Fronts.
  ours = [r['system'] for r in students + by_family['merge']]
  cfgs = [r['system'] for r in by_family['cfg']]
  if not ours or not cfgs:
    out.append(undecided(4, 'needs CFG rows and students'))
  else:
    everyone = [r['system'] for r in rows]
    evidence, verdicts = {}, []
    for m in DIVERSITIES:
      ours_R, cfg_R = (_hypervolumes(draws, names, everyone, m) for names in (ours, cfgs))
      d = bootstrap.summary(ours_R - cfg_R, level)
      verdicts.append(_verdict(d['lo'] > 0, d['hi'] < 0))
      with np.errstate(divide='ignore', invalid='ignore'):
        evidence[f'hypervolume_ratio/{m}'] = bootstrap.summary(ours_R / cfg_R, level)
      evidence[f'hypervolume_diff/{m}'] = d
    evidence['cfg_dominated'] = {c: _dominators(draws, ours, c, level) for c in cfgs}
    out.append({'claim': 4, 'statement': CLAIMS[4], 'verdict': _combine(*verdicts),
                'evidence': evidence})
  return out


def _hypervolumes(draws, names, everyone, diversity: str) -> np.ndarray:
  """Per draw: the hypervolume of the named systems above the draw's worst quality and diversity."""
  pts_RxNx2 = lambda ns: np.stack([np.stack([draws[n][diversity], draws[n]['quality']], -1)
                                   for n in ns], axis=1)
  ref_Rx2 = pts_RxNx2(everyone).min(axis=1)
  return np.asarray([bootstrap.hypervolume(p, r) for p, r in zip(pts_RxNx2(names), ref_Rx2)])


def _dominators(draws, ours, cfg: str, level: float) -> dict[str, list[str]]:
  """Which of ours beat a CFG point on quality and diversity: at the point, and at the level."""
  point, confident = [], []
  for s in ours:
    d = {m: draws[s][m] - draws[cfg][m] for m in ('quality', 'diversity')}
    if all(v[0] > 0 for v in d.values()):
      point.append(s)
    if all(bootstrap.interval(v, level)[0] > 0 for v in d.values()):
      confident.append(s)
  return {'point': point, 'at_level': confident}


def headline(claims: list[dict]) -> list[str]:
  """One line per claim, for the console and the top of the report."""
  lines = []
  for c in claims:
    ev = c['evidence']
    if 'missing' in ev:
      detail = ev['missing']
    elif c['claim'] == 4:
      detail = ', '.join(f"HV ratio ({k.split('/')[1]}) {_fmt(v, '')}" for k, v in ev.items()
                         if k.startswith('hypervolume_ratio/'))
    else:
      detail = '; '.join(f"{k.removesuffix('_diff')} diff {_fmt(v)}" for k, v in ev.items()
                         if k.endswith('_diff'))
      detail = f"{ev['compared']}: {detail}"
    lines.append(f"claim {c['claim']} ({c['statement']}): {c['verdict'].upper()}: {detail}")
  return lines


def _fmt(s: dict[str, float], sign: str = '+') -> str:
  return f"{s['value']:{sign}.3f} [{s['lo']:{sign}.3f}, {s['hi']:{sign}.3f}]"
