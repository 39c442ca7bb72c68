"""The two finetuning objectives: CFG distillation (KL) and the diversity policy gradient.

KL helpers are named by direction, first argument first:
  kl_student_teacher = KL(student || teacher)  (the paper's "reverse" KL; default)
  kl_teacher_student = KL(teacher || student)  ("forward" KL)
Both are exact over the vocabulary at every position and summed over the
generated (non-PAD) positions of each sequence.

The diversity reward is pairwise: r(y_i, y_j) = 1 - cos(E y_i, E y_j)
(evaluators.pairwise_dissimilarity, the same function evaluation uses). For k
samples of one prompt, R_i = mean_{j != i} r_ij. The usual RLOO baseline (the
mean of the other R_j) contains r_ji, which depends on y_i, so it biases the
gradient for a pairwise reward (by a factor 1 - 1/(k-1): half the gradient at
k = 3). The unbiased leave-one-out baseline uses the pairs among the *other*
samples only: b_i = mean_{j<l; j,l != i} r_jl (k >= 3). With k = 2 there are no
such pairs, so b for a prompt is the mean pair reward of the *other prompts*
in the batch (independent of this prompt's samples, hence still unbiased).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_DIRECTIONS = ('student_teacher', 'teacher_student')


def _kl(logp_a_BxTxV, logp_b_BxTxV, mask_BxT):
  """sum_t mask_t KL(a_t || b_t) per sequence -> [B]. log-probs must be normalised."""
  p_a = jnp.exp(logp_a_BxTxV)
  kl_BxT = jnp.sum(p_a * (logp_a_BxTxV - logp_b_BxTxV), axis=-1)
  return jnp.sum(kl_BxT * mask_BxT, axis=-1)


def kl_student_teacher(logp_student_BxTxV, logp_teacher_BxTxV, mask_BxT):
  """KL(student || teacher) summed over positions: the paper's distillation loss."""
  return _kl(logp_student_BxTxV, logp_teacher_BxTxV, mask_BxT)


def kl_teacher_student(logp_student_BxTxV, logp_teacher_BxTxV, mask_BxT):
  """KL(teacher || student) summed over positions (forward KL)."""
  return _kl(logp_teacher_BxTxV, logp_student_BxTxV, mask_BxT)


def distillation_kl(direction: str):
  if direction == 'student_teacher':
    return kl_student_teacher
  if direction == 'teacher_student':
    return kl_teacher_student
  raise ValueError(f'unknown KL direction {direction!r}; choose from {KL_DIRECTIONS}')


def entropy(logp_BxTxV, mask_BxT):
  """Mean per-token entropy over the masked positions."""
  h_BxT = -jnp.sum(jnp.exp(logp_BxTxV) * logp_BxTxV, axis=-1)
  return jnp.sum(h_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def mean_reward_per_sample(r_PxKxK):
  """R_i = mean_{j != i} r_ij -> [P, K] (r's diagonal must be 0)."""
  k = r_PxKxK.shape[-1]
  return jnp.sum(r_PxKxK, axis=-1) / (k - 1)


def loo_baseline(r_PxKxK):
  """b_i: mean pairwise reward among the samples other than i -> [P, K].

  k >= 3: the pairs j < l with j, l != i of the same prompt.
  k == 2: the mean pair reward of the other prompts (needs P >= 2).
  """
  p, k = r_PxKxK.shape[0], r_PxKxK.shape[-1]
  if k >= 3:
    total_P = jnp.sum(r_PxKxK, axis=(1, 2)) / 2  # sum over pairs j < l
    row_PxK = jnp.sum(r_PxKxK, axis=-1)  # pairs that involve i
    pairs_without_i = (k - 1) * (k - 2) / 2
    return (total_P[:, None] - row_PxK) / pairs_without_i
  if k == 2:
    if p < 2:
      raise ValueError('k = 2 needs at least 2 prompts per batch: the baseline of one prompt is '
                       'the mean pair reward of the others')
    pair_P = r_PxKxK[:, 0, 1]
    others_P = (jnp.sum(pair_P) - pair_P) / (p - 1)
    return jnp.broadcast_to(others_P[:, None], (p, k))
  raise ValueError(f'the diversity reward needs k >= 2 samples per prompt, got k={k}')


def loo_advantages(r_PxKxK):
  """2 (R_i - b_i): the unbiased per-sample weight of grad log pi(y_i)."""
  return 2.0 * (mean_reward_per_sample(r_PxKxK) - loo_baseline(r_PxKxK))


def rloo_advantages_biased(r_PxKxK):
  """The usual RLOO, 2 (R_i - mean_{j != i} R_j): biased for a pairwise reward.

  Kept only to show the bias in tests and for comparison; never the default.
  """
  k = r_PxKxK.shape[-1]
  big_r = mean_reward_per_sample(r_PxKxK)
  others = (jnp.sum(big_r, axis=-1, keepdims=True) - big_r) / (k - 1)
  return 2.0 * (big_r - others)


def policy_gradient_surrogate(advantages_PxK, seq_logp_PxK):
  """mean_i stop_gradient(A_i) * log pi(y_i): its gradient is the estimator."""
  return jnp.mean(jax.lax.stop_gradient(advantages_PxK) * seq_logp_PxK)
