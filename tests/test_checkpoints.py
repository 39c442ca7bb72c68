"""Checkpoints (checkpoints.py) of a training run: an unreadable latest step is moved aside and the
previous one resumed; a checkpoint of another architecture is refused, naming the parameter."""

import glob
import os

import jax
import numpy as np
import pytest

import helpers
from diverse_cfg import checkpoints
from diverse_cfg import pretrain


def _corrupt(step_dir):
  for path in glob.glob(os.path.join(step_dir, 'params', '**', 'd', '*'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(3)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, npz, caplog):
  first = helpers.pretrain_run(tmp_path, npz, num_steps=20)
  ckpt_dir = tmp_path / 'run' / 'pretrain' / 'checkpoints'
  assert sorted(os.listdir(ckpt_dir)) == ['10', '20']
  _corrupt(str(ckpt_dir / '20'))
  resumed = helpers.pretrain_run(tmp_path, npz, num_steps=20)
  assert 'step 20 is unreadable' in caplog.text
  names = sorted(os.listdir(ckpt_dir))
  assert names[:2] == ['10', '20'] and names[2].startswith('20.unreadable-'), names
  # Steps 11..20 were redone from step 10 with the same data: the same result as before.
  jax.tree.map(np.testing.assert_array_equal, resumed.state['params'], first.state['params'])


def test_checkpoint_of_another_architecture_is_named(tmp_path, npz):
  helpers.pretrain_run(tmp_path, npz, num_steps=10)
  config = helpers.smoke_config(str(tmp_path), npz, num_steps=20)
  config.model.d_model = 64
  with pytest.raises(checkpoints.IncompatibleCheckpoint, match=r'shape \(\d+, 32\) .* needs \(\d+, 64\)'):
    pretrain.run(config, str(tmp_path / 'run'), devices=jax.devices()[:8], progress=False)
  assert sorted(os.listdir(tmp_path / 'run' / 'pretrain' / 'checkpoints')) == ['10']  # nothing moved or lost
