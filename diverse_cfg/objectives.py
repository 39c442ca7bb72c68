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


def _kl(logp_a_xV, logp_b_xV):
  """KL(a || b) at every position -> [...]. log-probs must be normalised."""
  return jnp.sum(jnp.exp(logp_a_xV) * (logp_a_xV - logp_b_xV), axis=-1)


def kl_per_position(direction: str, logp_student_xV, logp_teacher_xV):
  """The distillation KL of `direction` at every position -> [...]."""
  if direction == 'student_teacher':
    return _kl(logp_student_xV, logp_teacher_xV)
  if direction == 'teacher_student':
    return _kl(logp_teacher_xV, logp_student_xV)
  raise ValueError(f'unknown KL direction {direction!r}; choose from {KL_DIRECTIONS}')


def kl_student_teacher(logp_student_BxTxV, logp_teacher_BxTxV, mask_BxT):
  """KL(student || teacher) summed over positions: the paper's distillation loss."""
  return jnp.sum(_kl(logp_student_BxTxV, logp_teacher_BxTxV) * mask_BxT, axis=-1)


def kl_teacher_student(logp_student_BxTxV, logp_teacher_BxTxV, mask_BxT):
  """KL(teacher || student) summed over positions (forward KL)."""
  return jnp.sum(_kl(logp_teacher_BxTxV, logp_student_BxTxV) * mask_BxT, axis=-1)


def entropy_per_position(logp_xV):
  return -jnp.sum(jnp.exp(logp_xV) * logp_xV, axis=-1)


def masked_mean(x_BxT, mask_BxT):
  return jnp.sum(x_BxT * mask_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


def entropy(logp_BxTxV, mask_BxT):
  """Mean per-token entropy over the masked positions."""
  return masked_mean(entropy_per_position(logp_BxTxV), mask_BxT)


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
