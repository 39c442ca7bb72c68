"""How often a draw changes when the logits carry rounding noise: `sampling.draw` vs a Gumbel argmax.

The same randomness (one uniform per row for the inverse-CDF draw, one Gumbel
vector per row for the argmax) is applied to logits with and without N(0, eps^2)
noise; the figure is the share of rows whose token changes. On a GPU the KV-cached
and the full-forward logits differ by TF32 rounding, which is why the sampling
benchmark's `agree` column is below 1 there (BENCHMARKS.md). CPU, seconds:

  python -m benchmarks.draw_sensitivity
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diverse_cfg import sampling


def flip_rates(spread: float, eps: float, rows: int = 20_000, vocab: int = 500, seed: int = 0):
  k_logits, k_noise, k_u, k_g = jax.random.split(jax.random.key(seed), 4)
  logits = jax.random.normal(k_logits, (rows, vocab)) * spread
  noisy = logits + jax.random.normal(k_noise, (rows, vocab)) * eps
  u = jax.random.uniform(k_u, (rows,))
  gumbel = jax.random.gumbel(k_g, (rows, vocab))
  not_done = jnp.zeros(rows, bool)
  inv = lambda l: sampling.draw(u, jax.nn.log_softmax(l), not_done)[0]
  return (float(jnp.mean(inv(logits) != inv(noisy))),
          float(jnp.mean(jnp.argmax(logits + gumbel, -1) != jnp.argmax(noisy + gumbel, -1))))


def main():
  print('logit sd   noise | flips per draw: inverse CDF (sampling.draw)   Gumbel argmax')
  for spread in (0.3, 1.0, 3.0):
    for eps in (1e-3, 1e-4):
      inv, gum = flip_rates(spread, eps)
      print(f'{spread:8.1f} {eps:7.0e} | {inv:38.4f} {gum:15.4f}')


if __name__ == '__main__':
  main()
