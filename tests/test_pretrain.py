"""Pretraining: the loss falls, checkpoints are written, runs resume exactly."""

import os

import jax
import numpy as np

import helpers
from diverse_cfg import checkpoints
from diverse_cfg.data import pipeline


def test_loss_falls_checkpoints_written_and_resume_continues(tmp_path, npz):
  first = helpers.pretrain_run(tmp_path, npz, 'run', num_steps=10)
  losses = [h['loss'] for h in first.history if 'loss' in h]
  assert losses[-1] < losses[0] - 0.3, losses
  assert first.history[-1]['val/loss'] < np.log(23)  # below uniform over the vocabulary
  ckpt_dir = tmp_path / 'run' / 'pretrain' / 'checkpoints'
  assert sorted(os.listdir(ckpt_dir)) == ['10']
  saved = checkpoints.restore_params(str(ckpt_dir), jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first.state['params']))
  jax.tree.map(np.testing.assert_array_equal, saved, first.state['params'])

  # A second invocation with more steps starts at step 10, from those params.
  second = helpers.pretrain_run(tmp_path, npz, 'run', num_steps=20)
  assert second.step == 20
  assert min(h['step'] for h in second.history) == 15  # logging every 5: the first row is step 15
  assert sorted(os.listdir(ckpt_dir)) == ['10', '20']


def test_sigterm_then_relaunch_equals_uninterrupted_run(tmp_path, npz, monkeypatch):
  """A preempted run saves at the current step; the relaunch ends bit-identical."""
  reference = helpers.pretrain_run(tmp_path, npz, 'reference', num_steps=20)

  helpers.sigterm_on_batch(monkeypatch, pipeline, 7)
  interrupted = helpers.pretrain_run(tmp_path, npz, 'preempted', num_steps=20)
  assert interrupted.preempted and interrupted.step == 7
  assert sorted(os.listdir(tmp_path / 'preempted' / 'pretrain' / 'checkpoints')) == ['7']
  monkeypatch.undo()
  resumed = helpers.pretrain_run(tmp_path, npz, 'preempted', num_steps=20)
  assert resumed.step == 20 and not resumed.preempted
  jax.tree.map(np.testing.assert_array_equal, resumed.state, reference.state)
