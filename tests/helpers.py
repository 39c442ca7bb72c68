"""Shared test fixtures: a small learnable dataset brought in through the import path."""

import os

from configs import essen as essen_config
from diverse_cfg.data import synthetic


synthetic_npz = synthetic.arithmetic_npz  # rows fixed by a 2-attribute prompt


def smoke_config(tmp_dir: str, npz_path: str, **train):
  """configs/essen.py:smoke pointed at an imported dataset (the config's dataset entry only)."""
  c = essen_config.get_config('smoke')
  c.data.name = 'imported'
  c.data.npz_path = npz_path
  c.data.data_dir = os.path.join(tmp_dir, 'data')
  for k, v in train.items():
    c.train[k] = v
  return c
