"""Finetuning on a tiny problem: beta = 0 distils the CFG teacher; beta > 0 adds diversity.

The base model is conftest.py's base_run.
"""

import os

import jax
import ml_collections
import numpy as np
import pytest

import helpers
from diverse_cfg import checkpoints
from diverse_cfg import convergence
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import finetune
from diverse_cfg import merge
from diverse_cfg import packing
from diverse_cfg import workdir as workdir_lib
from diverse_cfg.data import pipeline
from diverse_cfg.evaluators import baselines

VOCAB = 23  # the synthetic dataset's 20 events + 3 specials


def test_beta0_distils_teacher_and_beta_raises_diversity(base_run):
  config, workdir = base_run
  embedder = baselines.bag_of_events(VOCAB)  # a parameter-free user embedder
  results = finetune.run(config, workdir, embedder=embedder, betas=(0.0, 20.0),
                         devices=jax.devices()[:8], progress=False)
  kl0 = [h['kl'] for h in results[0.0].history if 'kl' in h]
  assert kl0[-1] < 0.5 * kl0[0], kl0  # the student moves onto the CFG teacher
  div = {b: [h['eval/diversity'] for h in r.history if 'eval/diversity' in h][-1]
         for b, r in results.items()}
  print("KL beta=0:", kl0, "diversity:", div)
  assert div[20.0] > div[0.0] + 0.02, div

  # The logged held-out KL (convergence's signal; each sequence's and their mean) is that of
  # the final student, scored in its own rows here and packed in the probe; the distilled
  # student's falls.
  exp = experiment_lib.prepare(config, jax.devices()[:8])
  teacher, _ = checkpoints.restore_model_params(
      workdir_lib.checkpoints(workdir_lib.WorkDir(workdir).pretrain), exp.model_cfg, exp.mesh,
      exp.rules)
  heldout = finetune.heldout_examples(exp, config.finetune.heldout_sequences)
  assert packing.layout(len(heldout['tokens']), 1, config.finetune.packed_rows,
                        *packing.row_slots(exp.model_cfg, exp.length_bounds)) is not None
  kl_fn = finetune.heldout_kl_fn(exp.model_cfg, config.finetune.kl,
                                 finetune.teacher_guidance(exp.config), exp.length_bounds)
  logged = [h for h in results[0.0].history if 'kl_heldout' in h]
  # read every heldout_every (10) steps, though a row is logged every 5
  assert [h['step'] for h in logged] == [10, 20, 30, 40]
  assert [h['step'] for h in results[0.0].history if 'kl' in h] == list(range(5, 41, 5))
  final_N = kl_fn(results[0.0].state['params'], teacher, heldout['tokens'], heldout['prompt'])
  np.testing.assert_allclose(logged[-1][convergence.items_key('kl_heldout')], final_N, rtol=1e-5)
  assert logged[-1]['kl_heldout'] == pytest.approx(float(np.mean(final_N)), rel=1e-5)
  assert logged[-1]['kl_heldout'] < 0.7 * logged[0]['kl_heldout'], logged

  # The objective, read at the convergence window's first logged step (20 of 40) and the last
  # on the same prompts and keys: the last reading is the final student's.
  read_objective = finetune.objective_fn(exp, teacher)
  logged = [h for h in results[0.0].history if 'objective' in h]
  assert [h['step'] for h in logged] == [20, 40] == list(finetune.objective_steps(config.finetune))
  final_P = read_objective(results[0.0].state['params'])
  assert len(final_P) == config.finetune.objective_prompts
  np.testing.assert_allclose(logged[-1][convergence.items_key('objective')], final_P, rtol=1e-6)
  assert logged[-1]['objective'] < logged[0]['objective']
  verdict = convergence.check(convergence.run_metrics(workdir_lib.WorkDir(workdir).student(0.0)),
                              config.finetune)
  assert verdict['readings'][0]['metric'] == 'objective' and 'paired' in verdict['criterion']

  # The objective on fixed rollouts (benchmarks/objective_change.py): scored packed or in their
  # own rows alike, the same key giving the same rollouts; lower for the distilled student than
  # for the base model it started from.
  prompts = heldout['prompt'][:16]
  layout = finetune.heldout_layout(exp, len(prompts), config.finetune.packed_rows)
  assert layout is not None
  read = {pack: finetune.rollout_kl_fn(exp.model_cfg, config.finetune.kl, 1.0,
                                       finetune.teacher_guidance(exp.config), exp.length_bounds,
                                       pack)
          for pack in (None, layout)}
  key = jax.random.key(3)
  (own_N, tokens), (packed_N, packed_tokens) = (
      fn(results[0.0].state['params'], teacher, prompts, key) for fn in read.values())
  np.testing.assert_array_equal(tokens, packed_tokens)
  np.testing.assert_allclose(packed_N, own_N, rtol=1e-5, atol=1e-5)
  base_N, _ = read[None](teacher, teacher, prompts, key)
  assert float(np.mean(own_N)) < 0.7 * float(np.mean(base_N)), (own_N, base_N)

  # Merging: lambda = 0 and 1 return the students exactly; 0.5 lies between.
  pq, pd = results[0.0].state['params'], results[20.0].state['params']
  jax.tree.map(np.testing.assert_array_equal, merge.merge_params(pq, pd, 0.0), pq)
  jax.tree.map(np.testing.assert_array_equal, merge.merge_params(pq, pd, 1.0), pd)
  mid = merge.merge_params(pq, pd, 0.5)
  jax.tree.map(lambda m, a, b: np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6), mid, pq, pd)


def test_sigterm_during_finetuning_then_relaunch_equals_uninterrupted(base_run, tmp_path,
                                                                      monkeypatch):
  """A preempted student saves at the current step; relaunched, it ends bit-identical."""
  config, workdir = base_run
  config = config.copy_and_resolve_references()
  config.finetune.num_steps = 12
  config.finetune.eval_every = 12
  for name in ('reference', 'preempted'):
    os.makedirs(tmp_path / name)
    os.symlink(os.path.join(workdir, 'pretrain'), tmp_path / name / 'pretrain')
  embedder = baselines.bag_of_events(VOCAB)
  run = lambda name: finetune.run(config, str(tmp_path / name), embedder=embedder, betas=(8.0,),
                                  devices=jax.devices()[:8], progress=False)[8.0]
  reference = run('reference')
  helpers.sigterm_on_batch(monkeypatch, pipeline, 5)
  interrupted = run('preempted')
  assert interrupted.preempted and interrupted.step == 5
  monkeypatch.undo()
  resumed = run('preempted')
  assert resumed.step == 12 and not resumed.preempted
  jax.tree.map(np.testing.assert_array_equal, resumed.state, reference.state)


@pytest.mark.parametrize('num_steps, log_every, expected', [
    (300, 10, (150, 300)), (301, 10, (160, 301)), (40, 5, (20, 40)), (7, 10, (7,))])
def test_the_objective_is_read_at_the_convergence_window_ends(num_steps, log_every, expected):
  """The first logged step inside convergence's window (a 301-step run's starts at 150.5: 150
  would fall outside it) and the last step; none with objective_prompts = 0."""
  f = ml_collections.ConfigDict(dict(objective_prompts=8, num_steps=num_steps, log_every=log_every,
                                     plateau_window=0.5))
  steps = finetune.objective_steps(f)
  assert steps == expected
  assert steps[0] >= convergence.window_start(num_steps, 0.5)
  f.objective_prompts = 0
  assert finetune.objective_steps(f) == ()
