"""Finetuning on a tiny problem: beta = 0 distils the CFG teacher; beta > 0 adds diversity."""

import jax
import numpy as np
import pytest

import helpers
from diverse_cfg import finetune
from diverse_cfg import merge
from diverse_cfg import pretrain
from diverse_cfg.evaluators import baselines

VOCAB = 23  # the synthetic dataset's 20 events + 3 specials


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('ft')
  npz = helpers.synthetic_npz(str(root / 'arith.npz'))
  config = helpers.smoke_config(str(root), npz, num_steps=60, lr=3e-3, eval_every=60,
                                ckpt_every=60)
  config.finetune.num_steps = 40
  config.finetune.batch_size = 8
  config.finetune.lr = 1e-3
  config.finetune.log_every = 5
  config.finetune.eval_every = 40
  config.finetune.ckpt_every = 40
  config.finetune.eval_prompts = 8
  pretrain.run(config, str(root / 'run' / 'pretrain'), devices=jax.devices()[:8], progress=False)
  return config, str(root / 'run')


def test_beta0_distils_teacher_and_beta_raises_diversity(base_run):
  config, workdir = base_run
  embedder = baselines.bag_of_events(VOCAB)  # a parameter-free user embedder
  results = finetune.run(config, workdir, embedder, betas=(0.0, 20.0), devices=jax.devices()[:8],
                         progress=False)
  kl0 = [h['kl'] for h in results[0.0].history if 'kl' in h]
  assert kl0[-1] < 0.5 * kl0[0], kl0  # the student moves onto the CFG teacher
  div = {b: [h['eval/diversity'] for h in r.history if 'eval/diversity' in h][-1]
         for b, r in results.items()}
  print("KL beta=0:", kl0, "diversity:", div)
  assert div[20.0] > div[0.0] + 0.02, div

  # Merging: lambda = 0 and 1 return the students exactly; 0.5 lies between.
  pq, pd = results[0.0].state['params'], results[20.0].state['params']
  jax.tree.map(np.testing.assert_array_equal, merge.merge_params(pq, pd, 0.0), pq)
  jax.tree.map(np.testing.assert_array_equal, merge.merge_params(pq, pd, 1.0), pd)
  mid = merge.merge_params(pq, pd, 0.5)
  jax.tree.map(lambda m, a, b: np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6), mid, pq, pd)
