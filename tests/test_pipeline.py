"""The whole pipeline (`--stage=all`) on a small imported dataset, and the evaluation's invariants."""

import csv
import json
import os
import re

import helpers
from diverse_cfg import main

METRICS = ('quality', 'diversity', 'ngram_diversity', 'eos_rate', 'length')


def test_stage_all_writes_the_comparison_and_its_identities_hold(tmp_path):
  npz = helpers.synthetic_npz(str(tmp_path / 'arith.npz'))
  c = helpers.smoke_config(str(tmp_path), npz, num_steps=20, eval_every=20, ckpt_every=20)
  f = c.finetune
  f.num_steps = f.eval_every = f.ckpt_every = 3
  f.batch_size, f.eval_prompts = 8, 8
  e = c.evaluate
  e.gammas, e.lambdas, e.num_prompts, e.k = (1.0, 3.0), (0.0, 0.5, 1.0), 8, 2
  workdir = str(tmp_path / 'run')
  main.run_stage('all', c, workdir)

  out = os.path.join(workdir, 'evaluate')
  with open(os.path.join(out, 'results.csv')) as fh:
    rows = {r['system']: r for r in csv.DictReader(fh)}
  betas = tuple(f.betas)
  assert set(rows) == {'base', 'cfg gamma=1', 'cfg gamma=3', f'student beta={betas[0]:g}',
                       f'student beta={betas[-1]:g}', 'merge lambda=0', 'merge lambda=0.5',
                       'merge lambda=1'}
  assert {r['system']: int(r['passes_per_token']) for r in rows.values()} == {
      name: 2 if name.startswith('cfg') else 1 for name in rows}
  # Same key for every system, so identical models draw identical samples: CFG at gamma = 1
  # is the base model, and the merges at lambda = 0 / 1 are the two students.
  for a, b in (('cfg gamma=1', 'base'), ('merge lambda=0', f'student beta={betas[0]:g}'),
               ('merge lambda=1', f'student beta={betas[-1]:g}')):
    assert [rows[a][m] for m in METRICS] == [rows[b][m] for m in METRICS], (a, b)
  # ...and guidance changes them.
  assert [rows['cfg gamma=3'][m] for m in METRICS] != [rows['base'][m] for m in METRICS]
  for r in rows.values():
    assert 0.0 <= float(r['quality']) <= 1.0 and 0.0 <= float(r['diversity']) <= 2.0
  assert os.path.getsize(os.path.join(out, 'front.png')) > 0
  for r in rows.values():  # every figure with its interval
    for m in METRICS + ('prefix_diversity', 'unseen_2gram', 'length_w1'):
      assert float(r[f'{m}_lo']) <= float(r[m]) <= float(r[f'{m}_hi']), (r['system'], m)
  with open(os.path.join(out, 'claims.json')) as fh:
    verdict = json.load(fh)
  assert [c['claim'] for c in verdict['claims']] == [1, 2, 3, 4]
  assert {c['verdict'] for c in verdict['claims']} <= {'holds', 'fails', 'undecided'}
  with open(os.path.join(out, 'report.html')) as fh:
    page = fh.read()
  assert 'claim 4' in page and 'curves.png' in page and '<img src="samples/' in page
  for ref in re.findall(r'(?:src|href)="([^"]+)"', page):  # the page names only files that exist
    assert os.path.isfile(os.path.join(out, ref)), ref
