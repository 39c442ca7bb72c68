"""Several processes: launch settings, a clear error when the job cannot form, and
two local CPU processes x 4 devices training exactly like one process x 8 devices."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from diverse_cfg import distributed
from diverse_cfg import finetune
from diverse_cfg import pretrain
from diverse_cfg import sample_cli
from diverse_cfg import workdir
from diverse_cfg.evaluators import classifier
from diverse_cfg.evaluators import embedder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRETRAIN = {'train.num_steps': 4, 'train.log_every': 2, 'train.eval_every': 4,
            'train.ckpt_every': 4}
FINETUNE = {'finetune.num_steps': 4, 'finetune.log_every': 2, 'finetune.eval_every': 4,
            'finetune.ckpt_every': 4, 'finetune.eval_prompts': 8, 'finetune.betas': (8.0,)}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env() -> dict[str, str]:
  """This environment minus the test process's 8 fake devices (a child sets its own)."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def apply_overrides(config, overrides: dict) -> None:
  for dotted, value in overrides.items():
    section, field = dotted.split('.')
    config[section][field] = value


def config_flags(root: str, npz: str, overrides: dict) -> list[str]:
  """The command-line twin of helpers.smoke_config(root, npz) + overrides."""
  flags = ['--config=' + os.path.join(REPO, 'configs', 'essen.py') + ':smoke',
           '--config.data.name=imported', f'--config.data.npz_path={npz}',
           f'--config.data.data_dir={os.path.join(root, "data")}']
  return flags + [f'--config.{k}={v}' for k, v in overrides.items()]


class TwoProcesses:
  """launch/local_cpu.sh running one stage as 2 processes x 4 CPU devices (in the background)."""

  def __init__(self, root: str, stage: str, workdir: str, flags: list[str]):
    env = child_env()
    env.update(NUM_PROCESSES='2', DEVICES_PER_PROCESS='4', PORT=str(free_port()),
               PYTHON=sys.executable, LOG_DIR=os.path.join(root, f'logs_{stage}'),
               TIMEOUT_S='120')
    self.start = time.perf_counter()
    self.proc = subprocess.Popen(
        [os.path.join(REPO, 'launch', 'local_cpu.sh'), f'--stage={stage}',
         f'--workdir={workdir}', *flags], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)

  def wait(self) -> float:
    """Waits, asserts success; returns the wall time."""
    try:
      _, stderr = self.proc.communicate(timeout=600)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    assert self.proc.returncode == 0, stderr[-4000:]
    return time.perf_counter() - self.start


def metric_rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def assert_same_metrics(history: list[dict], rows: list[dict], keys, rtol=1e-4) -> None:
  """The single-process history and the process-0 metrics.jsonl, row by row."""
  assert [h['step'] for h in history] == [r['step'] for r in rows]
  compared = 0
  for h, r in zip(history, rows):
    for k in keys:
      if k in h:
        np.testing.assert_allclose(r[k], h[k], rtol=rtol, err_msg=f'{k} at step {h["step"]}')
        compared += 1
  assert compared >= 3, (history, rows)


def assert_trees_close(a, b, atol=1e-5) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol),
               a, b)


# ---------------------------------------------------------------------------
# Launch settings and the failure to form a job.


def test_launch_settings_come_from_flags_then_environment():
  env = {'DIVERSE_CFG_DISTRIBUTED': 'explicit', 'DIVERSE_CFG_COORDINATOR': '10.0.0.1:1234',
         'DIVERSE_CFG_NUM_PROCESSES': '4', 'DIVERSE_CFG_PROCESS_ID': '2'}
  launch = distributed.resolve(env=env)
  assert (launch.mode, launch.coordinator_address, launch.num_processes, launch.process_id,
          launch.timeout_s) == ('explicit', '10.0.0.1:1234', 4, 2, distributed.DEFAULT_TIMEOUT_S)
  assert distributed.resolve(process_id=3, timeout_s=9, env=env).process_id == 3  # flags win
  assert distributed.resolve(env={}).mode == 'none'
  with pytest.raises(distributed.DistributedConfigError, match='--num_processes, --process_id'):
    distributed.resolve('explicit', coordinator_address='h:1', env={})
  with pytest.raises(distributed.DistributedConfigError, match=r'must lie in \[0, --num_processes=2'):
    distributed.resolve('explicit', coordinator_address='h:1', num_processes=2, process_id=2,
                        env={})
  with pytest.raises(distributed.DistributedConfigError, match='host:port'):
    distributed.resolve('explicit', coordinator_address='nohost', num_processes=1, process_id=0,
                        env={})
  # A forgotten --distributed must not silently start N independent runs.
  with pytest.raises(distributed.DistributedConfigError, match='--distributed=none'):
    distributed.resolve(process_id=1, env={})


def test_unreachable_coordinator_fails_fast_naming_address_and_timeout(tmp_path):
  """process 1 of 2 with nobody listening: a clear message at the timeout, not a hang."""
  port = free_port()  # free now, and nobody is going to listen there
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, '-m', 'diverse_cfg.main', '--stage=pretrain',
       '--config=' + os.path.join(REPO, 'configs', 'essen.py') + ':smoke',
       f'--workdir={tmp_path}', '--distributed=explicit',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=1',
       '--distributed_timeout_s=2'],
      env={**child_env(), 'JAX_PLATFORMS': 'cpu'}, cwd=REPO, capture_output=True, text=True,
      timeout=120)
  elapsed = time.perf_counter() - start
  assert proc.returncode == distributed.EXIT_INIT_TIMEOUT, proc.stderr[-2000:]
  assert f'127.0.0.1:{port}' in proc.stderr and 'within 2 s' in proc.stderr, proc.stderr[-2000:]
  assert 'nothing accepts connections' in proc.stderr
  assert elapsed < 60, elapsed  # JAX alone would wait for its own, longer deadline


# ---------------------------------------------------------------------------
# Two processes x 4 devices == one process x 8 devices.


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """The same 4-step pretraining as a 2-process job and, meanwhile, in here."""
  root = str(tmp_path_factory.mktemp('dist'))
  npz = helpers.synthetic_npz(os.path.join(root, 'arith.npz'))
  # The pair imports the dataset into a fresh data dir (process 0 first, then the other).
  pair = TwoProcesses(root, 'pretrain', os.path.join(root, 'pair'),
                      config_flags(root, npz, PRETRAIN))
  config = helpers.smoke_config(root, npz)
  config.data.data_dir = os.path.join(root, 'data_single')  # not racing the pair's import
  apply_overrides(config, PRETRAIN)
  single = pretrain.run(config, os.path.join(root, 'single'),
                        devices=jax.devices()[:8], progress=False)
  print(f'2-process pretraining: {pair.wait():.1f} s wall')
  return {'root': root, 'npz': npz, 'config': config, 'single': single}


def test_two_processes_pretrain_like_one_and_their_checkpoint_restores_here(pretrained):
  root, single = pretrained['root'], pretrained['single']
  rows = metric_rows(os.path.join(root, 'pair', 'pretrain', 'metrics.jsonl'))
  assert_same_metrics(single.history, rows, ('loss', 'grad_norm', 'val/loss',
                                             'val/loss_null_prompt'))
  # The pair's checkpoint, restored in this one process on 8 devices and on 1.
  ckpt = os.path.join(root, 'pair', 'pretrain', 'checkpoints')
  assert sorted(os.listdir(ckpt)) == ['4']
  on8 = sample_cli.load(ckpt, devices=jax.devices()[:8]).params
  on1 = sample_cli.load(ckpt, devices=jax.devices()[:1]).params
  assert_trees_close(on8, single.state['params'])
  jax.tree.map(np.testing.assert_array_equal, on8, on1)


@pytest.mark.slow
def test_two_processes_finetune_like_one(pretrained):
  """The CLI finetune stage (trained evaluators, periodic evaluation) over 2 processes."""
  root, npz, config = pretrained['root'], pretrained['npz'], pretrained['config']
  single_dir, pair_dir = os.path.join(root, 'single'), os.path.join(root, 'pair')
  for stage_lib, section in ((embedder, config.embedder), (classifier, config.classifier)):
    section.num_steps = section.log_every = section.eval_every = section.ckpt_every = 1
    name = stage_lib.__name__.rsplit('.', 1)[1]
    stage_lib.run(config, single_dir, devices=jax.devices()[:8], progress=False)
    shutil.copytree(os.path.join(single_dir, name), os.path.join(pair_dir, name))
  pair = TwoProcesses(root, 'finetune', pair_dir, config_flags(root, npz, {**PRETRAIN, **FINETUNE}))
  apply_overrides(config, FINETUNE)
  result = finetune.run(config, single_dir, devices=jax.devices()[:8], progress=False)[8.0]
  print(f'2-process finetuning: {pair.wait():.1f} s wall')
  student = workdir.WorkDir(pair_dir).student(8.0)
  assert_same_metrics(result.history, metric_rows(os.path.join(student, 'metrics.jsonl')),
                      ('loss', 'kl', 'reward/diversity', 'eval/diversity', 'eval/quality'))
  restored = sample_cli.load(student, devices=jax.devices()[:8]).params
  assert_trees_close(restored, result.state['params'])
