"""Diversity and quality of generations, and the evaluators' held-out figures.

Model-based (jitted, batched): `diversity`, `pairwise_dissimilarity`, `quality`.
Model-free (numpy, for reports): `shared_ngram_fraction` (diversity) and
`fidelity` against a `FidelityReference` (unseen n-grams, length distances:
is a generation still shaped like the data?).
Held-out figures of the evaluators themselves: `retrieval_accuracy`,
`classifier_accuracy`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg.evaluators import bootstrap
from diverse_cfg.evaluators import chunks
from diverse_cfg.evaluators import encoder
from diverse_cfg.evaluators import interface


def pairwise_dissimilarity(emb_PxKxD: jax.Array,
                           tokens_PxKxT: jax.Array | None = None) -> jax.Array:
  """1 - cos between every two of the K embeddings of each prompt: [P, K, K].

  Rows are normalised here, so a user embedder whose vectors are not unit
  length still gets cosines. Computed as |u - v|^2 / 2 (equal to 1 - u.v for
  unit u, v), so near-identical embeddings do not lose their difference to
  cancellation. With the tokens given, two generations that are the same
  sequence (same events before EOS) get exactly 0: the embedder is a function
  of the sequence, but a batched forward need not give bit-identical rows.
  """
  unit_PxKxD = encoder.l2_normalize(emb_PxKxD.astype(jnp.float32))
  diff_PxKxKxD = unit_PxKxD[:, :, None, :] - unit_PxKxD[:, None, :, :]
  d_PxKxK = 0.5 * jnp.sum(diff_PxKxKxD * diff_PxKxKxD, axis=-1)
  if tokens_PxKxT is not None:
    d_PxKxK = jnp.where(same_sequence(tokens_PxKxT), 0.0, d_PxKxK)
  return d_PxKxK


def same_sequence(tokens_PxKxT: jax.Array) -> jax.Array:
  """[P, K, K]: whether generations i and j of a prompt hold the same events before EOS."""
  canon_PxKxT = jnp.where(encoder.content_mask(tokens_PxKxT), tokens_PxKxT, specials.PAD)
  return jnp.all(canon_PxKxT[:, :, None, :] == canon_PxKxT[:, None, :, :], axis=-1)


def mean_off_diagonal(x_PxKxK: jax.Array) -> jax.Array:
  """Mean over ordered pairs i != j, per prompt: [P]."""
  k = x_PxKxK.shape[-1]
  off_KxK = 1.0 - jnp.eye(k, dtype=x_PxKxK.dtype)
  return jnp.sum(x_PxKxK * off_KxK, axis=(-2, -1)) / (k * (k - 1))


@functools.partial(jax.jit, static_argnums=0)
def _diversity_P(apply: Callable, params: Any, tokens_PxKxT: jax.Array) -> jax.Array:
  p, k, t = tokens_PxKxT.shape
  emb_PxKxD = apply(params, tokens_PxKxT.reshape(p * k, t)).reshape(p, k, -1)
  return mean_off_diagonal(pairwise_dissimilarity(emb_PxKxD, tokens_PxKxT))


def _check_generations(tokens_PxKxT) -> jax.Array:
  tokens_PxKxT = jnp.asarray(tokens_PxKxT, jnp.int32)
  if tokens_PxKxT.ndim != 3 or tokens_PxKxT.shape[1] < 2:
    raise ValueError(f'diversity needs tokens [P, K, T] with K >= 2 generations per prompt, '
                     f'got shape {tuple(tokens_PxKxT.shape)}')
  return tokens_PxKxT


def diversity_per_prompt(embedder: interface.Embedder, tokens_PxKxT) -> jax.Array:
  """[P]: the mean pairwise (1 - cos) among each prompt's K generations."""
  return _diversity_P(embedder.apply, embedder.params, _check_generations(tokens_PxKxT))


def diversity(embedder: interface.Embedder, tokens_PxKxT) -> jax.Array:
  """Mean over prompts of the mean pairwise (1 - cos) among each prompt's K generations."""
  return jnp.mean(diversity_per_prompt(embedder, tokens_PxKxT))


def length_matched_pairs(tokens_PxKxT) -> tuple[np.ndarray, np.ndarray]:
  """Every pair i < j of a prompt's generations, both cut to the shorter one's events.

  Returns rows a, b [P, K(K-1)/2, T]: events[:L] then EOS then PAD, with L the
  smaller of the pair's event counts.
  """
  tokens_PxKxT = np.asarray(tokens_PxKxT)
  p, k, t = tokens_PxKxT.shape
  pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
  a, b = (np.full((p, len(pairs), t), specials.PAD, tokens_PxKxT.dtype) for _ in range(2))
  for q in range(p):
    events = [events_of(row) for row in tokens_PxKxT[q]]
    for m, (i, j) in enumerate(pairs):
      n = min(len(events[i]), len(events[j]), t - 1)
      for out, e in ((a, events[i]), (b, events[j])):
        out[q, m, :n] = e[:n]
        out[q, m, n] = specials.EOS
  return a, b


def prefix_diversity_per_prompt(embedder: interface.Embedder, tokens_PxKxT,
                                batch_size: int = 128) -> np.ndarray:
  """[P]: embedding diversity over length-matched pairs (a length change alone cannot raise it).

  Each pair of a prompt's generations is compared on equal footing: both cut
  to the shorter one's events, so generations that differ only in where they
  stop score exactly 0, and same-length generations score as in `diversity`.
  The mean of 1 - cos over the K(K-1)/2 pairs.
  """
  a_PxMxT, b_PxMxT = length_matched_pairs(_check_generations(tokens_PxKxT))
  p, m, t = a_PxMxT.shape
  emb_a, emb_b = (encoder.l2_normalize(jnp.asarray(embed_all(embedder, x.reshape(p * m, t),
                                                             batch_size), jnp.float32))
                  for x in (a_PxMxT, b_PxMxT))
  diff = emb_a - emb_b
  d_PxM = np.asarray(0.5 * jnp.sum(diff * diff, axis=-1)).reshape(p, m)
  d_PxM = np.where(np.all(a_PxMxT == b_PxMxT, axis=-1), 0.0, d_PxM)
  return d_PxM.mean(axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _quality(apply: Callable, params: Any, tokens_BxT, prompt_BxC):
  probs_BxA = apply(params, tokens_BxT, prompt_BxC)
  return jnp.mean(probs_BxA, axis=-1), probs_BxA


def quality(quality_model: interface.QualityModel, tokens_BxT, prompt_BxC):
  """(quality [B] = mean over attributes, per-attribute probabilities [B, A])."""
  return _quality(quality_model.apply, quality_model.params, jnp.asarray(tokens_BxT, jnp.int32),
                  jnp.asarray(prompt_BxC, jnp.int32))


def events_of(row_T: np.ndarray) -> np.ndarray:
  """A row's events: ids >= NUM_SPECIAL before its first EOS (numpy twin of content_mask)."""
  row_T = np.asarray(row_T)
  eos = np.flatnonzero(row_T == specials.EOS)
  row_T = row_T[:eos[0]] if eos.size else row_T
  return row_T[row_T >= specials.NUM_SPECIAL]


def _ngrams(events: np.ndarray, n: int) -> list[tuple[int, ...]]:
  return [tuple(events[s:s + n].tolist()) for s in range(len(events) - n + 1)]


def shared_ngram_fraction_per_prompt(tokens_PxKxT, n: int = 4) -> np.ndarray:
  """[P]: for each prompt, the mean over ordered pairs (i, j), i != j, of its generations
  of the share of i's n-gram occurrences (over its events, with repetition) whose n-gram
  occurs anywhere in j. Pairs where i has no n-gram are left out; NaN for a prompt with
  no pair left."""
  per_prompt = []
  for gens_KxT in np.asarray(tokens_PxKxT):
    grams = [_ngrams(events_of(row), n) for row in gens_KxT]
    sets = [set(g) for g in grams]
    shares = [np.mean([g in sets[j] for g in grams[i]])
              for i in range(len(grams)) for j in range(len(grams)) if i != j and grams[i]]
    per_prompt.append(np.mean(shares) if shares else np.nan)
  return np.asarray(per_prompt, np.float64)


def shared_ngram_fraction(tokens_PxKxT, n: int = 4) -> float:
  """Model-free similarity of a prompt's generations (high = alike, 1 = copies).

  The mean over prompts of `shared_ngram_fraction_per_prompt`, prompts with
  no pair left out; NaN if nothing is left.
  """
  per_prompt = shared_ngram_fraction_per_prompt(tokens_PxKxT, n)
  per_prompt = per_prompt[np.isfinite(per_prompt)]
  return float(np.mean(per_prompt)) if per_prompt.size else float('nan')


def anchored_events(row_T: np.ndarray) -> np.ndarray:
  """BOS, the row's events, then EOS if the row has one: what n-gram fidelity reads.

  The anchors make a wrong start (e.g. a duration first, where a pitch must
  come) and a wrong end (EOS in the middle of an event) visible as n-grams.
  """
  row_T = np.asarray(row_T)
  tail = [specials.EOS] if (row_T == specials.EOS).any() else []
  return np.concatenate([[specials.BOS], events_of(row_T), tail]).astype(np.int64)


def event_count(row_T: np.ndarray) -> int:
  return len(events_of(row_T))


@dataclasses.dataclass(frozen=True)
class FidelityReference:
  """What generations are compared with: the training split's n-grams, held-out lengths."""
  ngrams: dict[int, frozenset]  # n -> every n-gram of the anchored training rows
  lengths: np.ndarray  # events per held-out row
  # The gcd of the training rows' lengths: e.g. 4 when every event is 4 tokens (1: no grid).
  length_step: int = 1

  @classmethod
  def from_rows(cls, train_rows, heldout_rows, ns: Sequence[int] = (2, 3)) -> 'FidelityReference':
    anchored = [anchored_events(r) for r in train_rows]
    step = int(np.gcd.reduce([event_count(r) for r in train_rows]))
    return cls(ngrams={n: frozenset(g for a in anchored for g in _ngrams(a, n)) for n in ns},
               lengths=np.asarray([event_count(r) for r in heldout_rows], np.float64),
               length_step=max(step, 1))


def unseen_ngram_counts(rows, seen: frozenset, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row: (anchored n-gram occurrences never seen in `seen`, all its n-gram occurrences)."""
  grams = [_ngrams(anchored_events(r), n) for r in rows]
  return (np.asarray([sum(g not in seen for g in gs) for gs in grams], np.float64),
          np.asarray([len(gs) for gs in grams], np.float64))


def unseen_ngram_rate(rows, seen: frozenset, n: int) -> float:
  """Share of the rows' anchored n-gram occurrences that never occur in `seen`."""
  unseen, total = unseen_ngram_counts(rows, seen, n)
  return float(unseen.sum() / total.sum()) if total.sum() else float('nan')


def wasserstein_1(a, b) -> float:
  """W1 between two empirical 1-D distributions: the integral of |F_a - F_b|."""
  a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
  grid = np.concatenate([a, b])
  grid.sort()
  cdf_a = np.searchsorted(a, grid[:-1], side='right') / len(a)
  cdf_b = np.searchsorted(b, grid[:-1], side='right') / len(b)
  return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def fidelity_figures(tokens_PxKxT, reference: FidelityReference) -> dict[str, bootstrap.Figure]:
  """`fidelity` of P x K generations as bootstrap figures over the P prompts."""
  tokens_PxKxT = np.asarray(tokens_PxKxT)
  p, k, _ = tokens_PxKxT.shape
  rows = tokens_PxKxT.reshape(p * k, -1)
  out = {}
  for n, seen in sorted(reference.ngrams.items()):
    unseen_B, total_B = unseen_ngram_counts(rows, seen, n)
    out[f'unseen_{n}gram'] = bootstrap.ratio(unseen_B.reshape(p, k).sum(1),
                                             total_B.reshape(p, k).sum(1))
  lengths_PxK = np.asarray([event_count(r) for r in rows], np.float64).reshape(p, k)
  held_mean = reference.lengths.mean()
  mean_length = bootstrap.row_mean(lengths_PxK)
  out['length_gap'] = bootstrap.Figure(lambda idx: mean_length.draws(idx) - held_mean, p)
  out['length_w1'] = bootstrap.per_draw(
      lambda drawn: wasserstein_1(lengths_PxK[drawn].ravel(), reference.lengths), p)
  out['length_off_grid'] = bootstrap.row_mean(lengths_PxK % reference.length_step != 0)
  return out


def fidelity(rows, reference: FidelityReference) -> dict[str, float]:
  """Model-free: is a set of generations still shaped like the data?

  unseen_<n>gram: share of generated n-grams (BOS/EOS-anchored events) absent
  from the whole training split (a broken grammar raises it); length_gap: mean
  events per generation minus the held-out mean; length_w1: Wasserstein-1
  distance between the generated and held-out event-count distributions;
  length_off_grid: share of generations whose length is not a multiple of the
  training lengths' gcd (a row ended inside a multi-token event; 0 when the
  gcd is 1).
  """
  rows = np.asarray(rows)
  return {name: f.point() for name, f in fidelity_figures(rows[None], reference).items()}


def in_batches(fn: Callable, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """fn over fixed-size batches (the last one padded by repetition): one compilation."""
  n = len(arrays[0])
  outs = []
  for s in range(0, n, batch_size):
    rows = np.minimum(np.arange(s, s + batch_size), n - 1)
    # to_host: params sharded over several processes give a global output.
    outs.append(sharding_lib.to_host(fn(*[a[rows] for a in arrays]))[:min(batch_size, n - s)])
  return np.concatenate(outs)


def embed_all(embedder: interface.Embedder, tokens_NxT, batch_size: int = 128) -> np.ndarray:
  return in_batches(embedder, [np.asarray(tokens_NxT, np.int32)], batch_size)


def retrieval_accuracy(embedder: interface.Embedder, tokens_NxT, chunk_len: int,
                       batch_size: int = 128) -> dict[str, float]:
  """Each piece's first chunk retrieves among all pieces' second chunks (chunks.heldout_pair).

  top1/top5: share of pieces whose own second chunk is the nearest / among
  the 5 nearest by cosine; chance = 1/N. Pieces with < 2 events are left out.
  """
  first, second, valid = jax.device_get(chunks.heldout_pair(jnp.asarray(tokens_NxT, jnp.int32),
                                                            chunk_len))
  first, second = np.asarray(first)[valid], np.asarray(second)[valid]
  n = len(first)
  if n < 2:
    raise ValueError(f'retrieval needs at least 2 pieces with >= 2 events, got {n}')
  a_NxE = embed_all(embedder, first, batch_size)
  b_NxE = embed_all(embedder, second, batch_size)
  sim_NxN = a_NxE @ b_NxE.T
  own_N = np.diag(sim_NxN)
  rank_N = np.sum(sim_NxN > own_N[:, None], axis=1)  # pieces strictly closer than its own
  return {'top1': float(np.mean(rank_N == 0)), 'top5': float(np.mean(rank_N < 5)),
          'chance': 1.0 / n, 'num_pieces': n}


def classifier_accuracy(quality_model: interface.QualityModel, tokens_NxT, prompt_NxC,
                        batch_size: int = 128) -> dict[str, dict[str, float]]:
  """Per attribute: accuracy of the predicted value and the split's majority-class rate.

  The majority rate is the share of the most frequent value in these very
  rows: the best any constant guess could score here (a strict baseline).
  With skewed attributes, balanced_accuracy (the mean over the values present
  of each value's recall) is the more telling figure; any constant guess
  scores 1 / (values present) on it, reported as balanced_chance.
  """
  if quality_model.predict is None:
    raise ValueError('classifier_accuracy needs a QualityModel with predict')
  prompt_NxC = np.asarray(prompt_NxC, np.int32)
  predict = interface.jitted(quality_model.predict)
  pred_NxC = in_batches(lambda t: predict(quality_model.params, t),
                         [np.asarray(tokens_NxT, np.int32)], batch_size)
  names = quality_model.attribute_names or tuple(f'attr{i}' for i in range(prompt_NxC.shape[1]))
  out = {}
  for i, name in enumerate(names):
    values, counts = np.unique(prompt_NxC[:, i], return_counts=True)
    hit_N = pred_NxC[:, i] == prompt_NxC[:, i]
    recall = [np.mean(hit_N[prompt_NxC[:, i] == v]) for v in values]
    out[name] = {'accuracy': float(np.mean(hit_N)),
                 'majority_rate': float(counts.max() / len(prompt_NxC)),
                 'balanced_accuracy': float(np.mean(recall)),
                 'balanced_chance': 1.0 / len(values)}
  return out
