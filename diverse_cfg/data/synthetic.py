"""A tiny learnable dataset as an .npz for the import path: tests, soak runs, quick checks.

Each row's events are an arithmetic sequence fixed by its 2-attribute prompt
(start a*5 + b, step a + 1, modulo the vocabulary), so a model can learn to
follow the prompt in a few dozen steps. Rows end at a random length (pad_id -1),
or all hold seq_len events with fixed_length=True.
"""

import numpy as np


def arithmetic_npz(path: str, n: int = 384, seq_len: int = 24, num_values: int = 4,
                   vocab: int = 20, seed: int = 0, fixed_length: bool = False) -> str:
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, num_values, (n, 2))
  tokens = np.full((n, seq_len), -1)
  for i, (a, b) in enumerate(prompts):
    length = seq_len if fixed_length else rng.integers(8, seq_len)
    tokens[i, :length] = (a * 5 + b + np.arange(length) * (a + 1)) % vocab
  np.savez(path, tokens=tokens, prompts=prompts, vocab_size=vocab, prompt_vocab_size=num_values,
           pad_id=-1)
  return path
