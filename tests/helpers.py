"""Shared test fixtures: a small learnable dataset brought in through the import path."""

import os

import numpy as np

from configs import essen as essen_config


def synthetic_npz(path: str, n: int = 384, seq_len: int = 24, num_values: int = 4,
                  vocab: int = 20, seed: int = 0) -> str:
  """Rows whose events are an arithmetic sequence fixed by the 2-attribute prompt."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, num_values, (n, 2))
  tokens = np.full((n, seq_len), -1)
  for i, (a, b) in enumerate(prompts):
    length = rng.integers(8, seq_len)
    tokens[i, :length] = (a * 5 + b + np.arange(length) * (a + 1)) % vocab
  np.savez(path, tokens=tokens, prompts=prompts, vocab_size=vocab, prompt_vocab_size=num_values,
           pad_id=-1)
  return path


def smoke_config(tmp_dir: str, npz_path: str, **train):
  """configs/essen.py:smoke pointed at an imported dataset (the config's dataset entry only)."""
  c = essen_config.get_config('smoke')
  c.data.name = 'imported'
  c.data.npz_path = npz_path
  c.data.data_dir = os.path.join(tmp_dir, 'data')
  for k, v in train.items():
    c.train[k] = v
  return c
