"""The training loop under faults: a non-finite loss stops it with nothing bad saved; a training
process SIGKILLed at arbitrary moments still resumes to the uninterrupted result.

Preempted (SIGTERMed) runs are test_pretrain.py's and test_finetune.py's; corrupt and
incompatible checkpoints, test_checkpoints.py's.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from diverse_cfg import checkpoints
from diverse_cfg import experiment
from diverse_cfg import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _saved_params(tmp_path, step, like):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          like)
  return checkpoints.restore_params(str(tmp_path / 'run' / 'pretrain' / 'checkpoints'), abstract, step)


def test_non_finite_loss_stops_with_step_and_quantity_and_saves_nothing_bad(tmp_path, npz):
  good = helpers.pretrain_run(tmp_path, npz, num_steps=10)
  with pytest.raises(training.NonFiniteError, match=r'non-finite .*(loss|grad_norm).* at step 1[1-5]'):
    helpers.pretrain_run(tmp_path, npz, num_steps=20, lr=1e30, warmup_steps=0, log_every=1)
  assert sorted(os.listdir(tmp_path / 'run' / 'pretrain' / 'checkpoints')) == ['10']
  saved = _saved_params(tmp_path, 10, good.state['params'])
  jax.tree.map(np.testing.assert_array_equal, saved, good.state['params'])


def _launch(workdir, config_args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, '-m', 'diverse_cfg.main', '--stage=pretrain',
       '--config=configs/essen.py:smoke', f'--workdir={workdir}', *config_args],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _steps_done(workdir):
  path = os.path.join(workdir, 'pretrain', 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max([json.loads(line)['step'] for line in f if line.strip()] or [0])


def test_sigkill_at_arbitrary_moments_never_prevents_resuming(tmp_path, npz):
  """Kill a real training process (often mid async save) several times; it still finishes
  with the same parameters as an uninterrupted run."""
  args = ['--config.data.name=imported', f'--config.data.npz_path={npz}',
          f'--config.data.data_dir={tmp_path / "data"}', '--config.train.num_steps=24',
          '--config.train.ckpt_every=1', '--config.train.keep=2', '--config.train.log_every=1',
          '--config.train.eval_every=1000']
  workdir = str(tmp_path / 'killed')
  rng = np.random.default_rng(0)
  kills = 0
  for target in (3, 9, 15):  # kill a little after these steps were logged
    proc = _launch(workdir, args)
    deadline = time.time() + 240
    while _steps_done(workdir) < target and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.3))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
  assert kills >= 2
  final = _launch(workdir, args)
  _, err = final.communicate(timeout=300)
  assert final.returncode == 0, err.decode()[-3000:]
  reference = _launch(str(tmp_path / 'reference'), args)
  _, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err.decode()[-3000:]
  config = helpers.smoke_config(str(tmp_path), npz)
  exp = experiment.prepare(config, jax.devices()[:1])
  got, _ = checkpoints.restore_model_params(os.path.join(workdir, 'pretrain', 'checkpoints'),
                                            exp.model_cfg, exp.mesh, exp.rules)
  want, _ = checkpoints.restore_model_params(
      str(tmp_path / 'reference' / 'pretrain' / 'checkpoints'), exp.model_cfg, exp.mesh, exp.rules)
  jax.tree.map(np.testing.assert_array_equal, got, want)
