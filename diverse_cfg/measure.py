"""Measuring samples: every figure of a system, each with its bootstrap interval over prompts.

Used by the evaluate stage (every system) and by finetuning's periodic
evaluation (the student). Presenting the figures is report.py.
"""

from __future__ import annotations

import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from diverse_cfg import evaluators
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg.data import melody
from diverse_cfg.evaluators import bootstrap
from diverse_cfg.evaluators import metrics
from diverse_cfg.evaluators import stage


def repeat_prompts(prompts_PxC: np.ndarray, k: int) -> np.ndarray:
  return np.repeat(np.asarray(prompts_PxC, np.int32), k, axis=0)


def score_figures(tokens_PxKxT, prompts_PxC, embedder, quality_model, ngram: int = 4,
                  well_formed_fn: Callable | None = None,
                  reference=None) -> dict[str, bootstrap.Figure]:
  """Every figure of P x K samples, as a bootstrap figure over the P prompts.

  quality (and per attribute), diversity (embedding), prefix_diversity (the
  embedding diversity over length-matched pairs), ngram_diversity (model-free),
  eos_rate, well_formed, length, and with a reference (an
  evaluators.FidelityReference) the fidelity figures.
  """
  tokens_PxKxT = np.asarray(tokens_PxKxT)
  p, k, t = tokens_PxKxT.shape
  flat_BxT = tokens_PxKxT.reshape(p * k, t)
  out = {'diversity': bootstrap.prompt_mean(
             metrics.diversity_per_prompt(embedder, jnp.asarray(tokens_PxKxT))),
         'prefix_diversity': bootstrap.prompt_mean(
             metrics.prefix_diversity_per_prompt(embedder, tokens_PxKxT)),
         'ngram_diversity': bootstrap.prompt_mean(
             1.0 - metrics.shared_ngram_fraction_per_prompt(tokens_PxKxT, n=ngram))}
  if quality_model is not None:
    mean_B, per_attr_BxA = evaluators.quality(quality_model, jnp.asarray(flat_BxT),
                                              jnp.asarray(repeat_prompts(prompts_PxC, k)))
    out['quality'] = bootstrap.row_mean(np.asarray(mean_B).reshape(p, k))
    for i, name in enumerate(getattr(quality_model, 'attribute_names', None) or
                             [str(a) for a in range(per_attr_BxA.shape[1])]):
      out[f'quality/{name}'] = bootstrap.row_mean(np.asarray(per_attr_BxA)[:, i].reshape(p, k))
  out['eos_rate'] = bootstrap.row_mean((tokens_PxKxT == specials.EOS).any(axis=-1))
  if well_formed_fn is not None:
    out['well_formed'] = bootstrap.row_mean(
        np.asarray([well_formed_fn(row) for row in flat_BxT], np.float64).reshape(p, k))
  out['length'] = bootstrap.row_mean((tokens_PxKxT != specials.PAD).sum(axis=-1))
  if reference is not None:
    out.update(metrics.fidelity_figures(tokens_PxKxT, reference))
  return out


def score_samples(tokens_PxKxT, prompts_PxC, embedder, quality_model, ngram: int = 4,
                  well_formed_fn: Callable | None = None,
                  reference=None) -> dict[str, float]:
  """The point values of score_figures."""
  return {name: f.point() for name, f in score_figures(
      tokens_PxKxT, prompts_PxC, embedder, quality_model, ngram, well_formed_fn,
      reference).items()}


def with_intervals(figures: dict[str, bootstrap.Figure], idx_RxP: np.ndarray,
                   level: float) -> dict[str, float]:
  """{name: point, name_lo, name_hi: its bootstrap interval at the level}."""
  out = {}
  for name, f in figures.items():
    s = bootstrap.summary(f.draws(idx_RxP), level)
    out.update({name: s['value'], f'{name}_lo': s['lo'], f'{name}_hi': s['hi']})
  return out


def fidelity_reference(exp: experiment_lib.Experiment) -> evaluators.FidelityReference:
  """The training split's n-grams and the held-out split's lengths (test, else validation)."""
  tokens = lambda split: stage.split_arrays(exp.sources[split], ('tokens',))['tokens']
  return evaluators.FidelityReference.from_rows(tokens('train'),
                                                tokens(stage.heldout_split(exp.sources)))


def sample_k(sample_fn, prompts_PxC, k: int, key) -> tuple[np.ndarray, float]:
  """(tokens [P, K, T], seconds) for sample_fn(prompt_BxC, key) -> (tokens, logprobs)."""
  rows = jnp.asarray(repeat_prompts(prompts_PxC, k))
  start = time.perf_counter()
  tokens, _ = sample_fn(rows, key)
  tokens = sharding_lib.to_host(tokens)  # all-gathers when the rows span several processes
  seconds = time.perf_counter() - start
  return tokens.reshape(len(prompts_PxC), k, -1), seconds


def measure_system(sample_fn, prompts_PxC, k, embedder, quality_model, key,
                   ngram: int = 4, reference=None) -> dict[str, float]:
  """The periodic finetuning evaluation: sample, then score (prefixed eval/)."""
  tokens, _ = sample_k(sample_fn, prompts_PxC, k, key)
  return {f'eval/{k_}': v for k_, v in score_samples(
      tokens, prompts_PxC, embedder, quality_model, ngram, reference=reference).items()}


def well_formed_check(meta) -> Callable | None:
  """The dataset's own well-formedness check of a token row (melodies), or None."""
  return melody.is_well_formed if meta.is_melody else None
