"""KL directions, leave-one-out advantages and the policy-gradient estimator, exactly."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diverse_cfg import objectives


def test_kl_both_directions_closed_form():
  p = np.array([0.5, 0.5, 0.0])
  q = np.array([0.9, 0.1, 0.0])
  # Zero-probability entries are encoded as the model does: a large finite negative log-prob.
  logp = jnp.log(jnp.where(p > 0, p, 1.0)) + jnp.where(p > 0, 0.0, -1e9)
  logq = jnp.log(jnp.where(q > 0, q, 1.0)) + jnp.where(q > 0, 0.0, -1e9)
  shape = lambda x: jnp.broadcast_to(x, (1, 2, 3))  # B=1, T=2 positions
  mask = jnp.array([[1.0, 0.0]])  # the second position is padding
  kl_pq = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
  kl_qp = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
  np.testing.assert_allclose(objectives.kl_student_teacher(shape(logp), shape(logq), mask), [kl_pq],
                             rtol=1e-6)
  np.testing.assert_allclose(objectives.kl_teacher_student(shape(logp), shape(logq), mask), [kl_qp],
                             rtol=1e-6)
  for direction, want in (('student_teacher', kl_pq), ('teacher_student', kl_qp)):
    np.testing.assert_allclose(objectives.kl_per_position(direction, shape(logp), shape(logq)),
                               [[want, want]], rtol=1e-6)
  with pytest.raises(ValueError, match='student_teacher'):
    objectives.kl_per_position('reverse', logp, logq)
  # Summed over positions: two real positions give twice the value.
  np.testing.assert_allclose(objectives.kl_student_teacher(shape(logp), shape(logq), jnp.ones((1, 2))),
                             [2 * kl_pq], rtol=1e-6)


def _r(pairs, k):
  r = np.zeros((1, k, k))
  for (i, j), v in pairs.items():
    r[0, i, j] = r[0, j, i] = v
  return jnp.asarray(r)


def test_advantages_hand_worked_k3():
  r = _r({(0, 1): 0.2, (0, 2): 0.6, (1, 2): 0.4}, 3)
  # R = [(0.2+0.6)/2, (0.2+0.4)/2, (0.6+0.4)/2] = [0.4, 0.3, 0.5]; b_i = the one other pair.
  np.testing.assert_allclose(objectives.mean_reward_per_sample(r), [[0.4, 0.3, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(objectives.loo_baseline(r), [[0.4, 0.6, 0.2]], rtol=1e-6)
  np.testing.assert_allclose(objectives.loo_advantages(r), [[0.0, -0.6, 0.6]], atol=1e-6)
  # Biased RLOO: 2 (R_i - mean of the others' R) = [0, -0.3, 0.3].
  np.testing.assert_allclose(objectives.rloo_advantages_biased(r), [[0.0, -0.3, 0.3]], atol=1e-6)


def test_advantages_hand_worked_k4():
  r = _r({(0, 1): 0.1, (0, 2): 0.2, (0, 3): 0.3, (1, 2): 0.4, (1, 3): 0.5, (2, 3): 0.6}, 4)
  big_r = np.array([0.6, 1.0, 1.2, 1.4]) / 3
  b = np.array([(0.4 + 0.5 + 0.6), (0.2 + 0.3 + 0.6), (0.1 + 0.3 + 0.5), (0.1 + 0.2 + 0.4)]) / 3
  np.testing.assert_allclose(objectives.loo_baseline(r), [b], rtol=1e-6)
  np.testing.assert_allclose(objectives.loo_advantages(r), [2 * (big_r - b)], rtol=1e-5, atol=1e-6)


def test_k2_uses_other_prompts_baseline():
  r = jnp.asarray(np.stack([_r({(0, 1): v}, 2)[0] for v in (0.2, 0.5, 0.8)]))
  # Prompt 0's baseline is the mean of prompts 1 and 2: 0.65; advantage 2 (0.2 - 0.65).
  np.testing.assert_allclose(objectives.loo_baseline(r)[:, 0], [0.65, 0.5, 0.35], rtol=1e-6)
  np.testing.assert_allclose(objectives.loo_advantages(r)[0], [-0.9, -0.9], rtol=1e-6)
  with pytest.raises(ValueError, match='at least 2 prompts'):
    objectives.loo_baseline(r[:1])


# A tiny policy over an enumerable sample space: 6 outcomes, softmax(theta).
EMB = np.random.default_rng(1).normal(size=(6, 3))


def _reward_table():
  u = EMB / np.linalg.norm(EMB, axis=-1, keepdims=True)
  return jnp.asarray(1 - u @ u.T)


def _exact_gradient(theta):
  r = _reward_table()
  def objective(th):
    pi = jax.nn.softmax(th)
    return pi @ r @ pi  # E_{y, y'} r(y, y')
  return jax.grad(objective)(theta)


def _estimator_mean(theta, advantage_fn, k, draws, key):
  r = _reward_table()
  def one(key):
    ys = jax.random.categorical(key, theta, shape=(k,))
    r_1xKxK = r[ys][:, ys][None] * (1 - jnp.eye(k))
    adv = advantage_fn(r_1xKxK)
    def surrogate(th):
      return objectives.policy_gradient_surrogate(adv, jax.nn.log_softmax(th)[ys][None])
    return jax.grad(surrogate)(theta)
  return jnp.mean(jax.vmap(one)(jax.random.split(key, draws)), axis=0)


@pytest.mark.parametrize('k', [3, 4])
def test_loo_estimator_is_unbiased_and_rloo_is_not(k):
  theta = jnp.array([0.5, -0.3, 1.0, 0.0, -1.0, 0.2])
  exact = _exact_gradient(theta)
  draws = 200_000
  loo = _estimator_mean(theta, objectives.loo_advantages, k, draws, jax.random.key(0))
  rloo = _estimator_mean(theta, objectives.rloo_advantages_biased, k, draws, jax.random.key(0))
  scale = float(jnp.linalg.norm(exact))
  assert float(jnp.linalg.norm(loo - exact)) < 0.05 * scale, (loo, exact)
  # The biased baseline shrinks the gradient by 1 - 1/(k-1): clearly off.
  np.testing.assert_allclose(rloo, (1 - 1 / (k - 1)) * exact, atol=0.05 * scale)
  assert float(jnp.linalg.norm(rloo - exact)) > 0.2 * scale
