"""Shared test fixtures: a small learnable dataset brought in through the import path."""

import os
import signal

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


def sigterm_on_batch(monkeypatch, module, n: int) -> None:
  """Makes `module.make_train_iterator`'s iterators SIGTERM this process on their n-th batch."""
  real = module.make_train_iterator

  def preempting_iterator(*args, **kwargs):
    it = real(*args, **kwargs)

    class Preempting(type(it)):  # the same iterator, but the n-th batch brings a SIGTERM
      count = 0

      def __next__(self):
        Preempting.count += 1
        if Preempting.count == n:
          os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()

    it.__class__ = Preempting
    return it

  monkeypatch.setattr(module, 'make_train_iterator', preempting_iterator)
