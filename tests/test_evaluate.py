"""The evaluate stage's sampling helper: chunked sampling keeps shapes, keys and prompt order."""

import jax
import jax.numpy as jnp
import numpy as np

from diverse_cfg import evaluate


def _fake_sampler(calls):
  def sample_fn(rows_BxC, key):
    calls.append((rows_BxC.shape, key))
    noise = jax.random.randint(key, (rows_BxC.shape[0], 1), 0, 1000)
    return jnp.concatenate([rows_BxC, noise], axis=1), None
  return sample_fn


def test_chunked_sampling_keeps_prompt_order_one_shape_and_a_key_per_chunk():
  prompts_PxC = np.arange(10, dtype=np.int32).reshape(5, 2)
  key = jax.random.key(7)
  calls = []
  whole, _ = evaluate.sample_k(_fake_sampler(calls), prompts_PxC, 3, key)
  assert whole.shape == (5, 3, 3) and len(calls) == 1
  np.testing.assert_array_equal(whole[:, :, :2], np.repeat(prompts_PxC[:, None], 3, axis=1))
  calls.clear()
  chunked, _ = evaluate.sample_k(_fake_sampler(calls), prompts_PxC, 3, key, chunk_prompts=2)
  assert chunked.shape == (5, 3, 3)
  assert [shape for shape, _ in calls] == [(6, 2)] * 3  # the last chunk padded: one shape
  np.testing.assert_array_equal(chunked[:, :, :2], whole[:, :, :2])  # prompts in order
  for i, s in enumerate(range(0, 5, 2)):  # chunk i drew with fold_in(key, i)
    rows = jnp.asarray(evaluate.repeat_prompts(prompts_PxC[np.minimum(np.arange(s, s + 2), 4)], 3))
    want, _ = _fake_sampler([])(rows, jax.random.fold_in(key, i))
    n = min(2, 5 - s)
    np.testing.assert_array_equal(chunked[s:s + n], np.asarray(want).reshape(2, 3, -1)[:n])
  # Deterministic: the same call twice gives the same tokens.
  again, _ = evaluate.sample_k(_fake_sampler([]), prompts_PxC, 3, key, chunk_prompts=2)
  np.testing.assert_array_equal(again, chunked)
