"""Fake 8 CPU devices before JAX initialises; tests take jax.devices()[:n].

Below, the fixtures that several test files share.
"""
import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top,wrong-import-position  (JAX only after the device flags)
import jax
import pytest

# A compilation cache of this test process's own (not its subprocesses'), empty at the start and
# removed at exit: a program built again (a run, its preempted twin and their resumption each
# build the same training step) is compiled once. A hit still reports a backend compilation
# (helpers.count_compiles counts it).
_JIT_CACHE = tempfile.mkdtemp(prefix='diverse_cfg_test_jit_')
atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _JIT_CACHE)

import helpers
from diverse_cfg import pretrain


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  """The synthetic arithmetic dataset as an .npz to import (helpers.synthetic_npz)."""
  return helpers.synthetic_npz(str(tmp_path_factory.mktemp('npz') / 'arith.npz'))


@pytest.fixture(scope='session')
def base_run(tmp_path_factory):
  """(config, workdir): a smoke base model pretrained 60 steps on the synthetic data, and the
  finetuning settings of test_finetune.py. Session-scoped: test_finetune.py and test_merge.py
  share the one pretraining."""
  root = tmp_path_factory.mktemp('ft')
  npz = helpers.synthetic_npz(str(root / 'arith.npz'))  # pylint: disable=redefined-outer-name
  config = helpers.smoke_config(str(root), npz, num_steps=60, lr=3e-3, eval_every=60,
                                ckpt_every=60)
  config.finetune.num_steps = 40
  config.finetune.batch_size = 8
  config.finetune.lr = 1e-3
  config.finetune.log_every, config.finetune.heldout_every = 5, 10
  config.finetune.eval_every = 40
  config.finetune.ckpt_every = 40
  config.finetune.eval_prompts = 8
  # Plain CFG, the teacher test_finetune.py's halving of the KL was calibrated on. The
  # plausibility teacher (alpha = 0.1) starts closer to the base model (KL 6.6 nats per sequence
  # here) and fell to 0.52x of that in these 40 steps; test_guidance checks that finetuning scores
  # exactly the distribution the CFG sampler draws from.
  config.guidance.plausibility = 0.0
  pretrain.run(config, str(root / 'run'), devices=jax.devices()[:8], progress=False)
  return config, str(root / 'run')
