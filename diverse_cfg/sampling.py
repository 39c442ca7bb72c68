"""Student sampler, CFG-teacher sampler and teacher-forced CFG scoring.

All three go through `model.Decoder` (the decode step for the samplers, the
same module's full forward for scoring). What is static (model config, number
of new tokens, mesh) lives in the frozen `Sampler`; gamma, temperature and
top-k are traced arrays, so changing them never recompiles.

CFG combines per-position log-probs as
    l_cfg = log_softmax(l_u + gamma (l_c - l_u)),
computed as l_c + (gamma - 1)(l_c - l_u) so that gamma = 1 is *exactly* l_c
(the student's distribution, bit for bit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diverse_cfg import model as model_lib
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials


def guided_log_probs(logits_c, logits_u, gamma):
  """l_c + (gamma - 1)(l_c - l_u) with l = log_softmax: CFG before normalising.

  logits_u=None (no CFG) gives l_c. gamma = 1 gives l_c bit for bit.
  """
  lc = jax.nn.log_softmax(logits_c, axis=-1)
  if logits_u is None:
    return lc
  return lc + (gamma - 1.0) * (lc - jax.nn.log_softmax(logits_u, axis=-1))


def cfg_log_probs(logits_c, logits_u, gamma):
  """log_softmax(l_u + gamma (l_c - l_u)) over the last axis."""
  return jax.nn.log_softmax(guided_log_probs(logits_c, logits_u, gamma), axis=-1)


def top_k_filter(logp_BxV, top_k):
  """Keeps the top_k entries (ties kept); top_k = 0 keeps all. top_k may be traced.

  The sort runs only when top_k > 0 (lax.cond): a full-vocabulary sort per
  decode step would dominate sampling on CPU.
  """
  vocab = logp_BxV.shape[-1]

  def keep_top_k(x):
    sorted_BxV = jnp.sort(x, axis=-1)
    kth_Bx1 = jnp.take(sorted_BxV, vocab - jnp.clip(top_k, 1, vocab), axis=-1)[:, None]
    return jnp.where(x >= kth_Bx1, x, model_lib.NEG_INF)

  return jax.lax.cond(top_k > 0, keep_top_k, lambda x: x, logp_BxV)


def sampling_log_probs(logits_c, logits_u, gamma, temperature, top_k):
  """The distribution a token is drawn from: CFG, then temperature, then top-k.

  Normalised once, at the end: softmax, temperature and top-k all commute
  with a per-row shift, so the CFG combination needs no normalising first.
  """
  logp = guided_log_probs(logits_c, logits_u, gamma)
  return jax.nn.log_softmax(top_k_filter(logp / temperature, top_k), axis=-1)


def draw(u_B, logp_BxV, done_B):
  """Draws one token per row by inverting the CDF at 1 - u (u uniform in [0, 1)).

  One uniform per row instead of a Gumbel per vocabulary entry: on a CPU the
  V random numbers and two logs per entry took a third of a small model's
  decode step (BENCHMARKS.md). Tokens with probability 0 (masked by the head or by
  top-k) are never drawn, whatever the rounding of the cumulative sum; a token
  whose probability is below the float32 resolution of the running sum
  (~1e-7) can lose it to a neighbour. Returns (token, its log-prob, done):
  rows already done get PAD with log-prob 0.
  """
  vocab = logp_BxV.shape[-1]
  p_BxV = jnp.exp(logp_BxV)
  cdf_BxV = jnp.cumsum(p_BxV, axis=-1)
  live_BxV = p_BxV > 0
  # Scale by the largest cumulative value at a live token (not by the last
  # one): the blocked cumsum need not be monotone in the last ulp, and this
  # keeps at least one live token at or above the threshold.
  top_B = jnp.max(jnp.where(live_BxV, cdf_BxV, 0.0), axis=-1)
  x_Bx1 = ((1.0 - u_B) * top_B)[:, None]
  tok_B = jnp.min(jnp.where(live_BxV & (cdf_BxV >= x_Bx1), jnp.arange(vocab), vocab - 1), axis=-1)
  tok_B = tok_B.astype(jnp.int32)
  lp_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
  tok_B = jnp.where(done_B, specials.PAD, tok_B)
  lp_B = jnp.where(done_B, 0.0, lp_B)
  return tok_B, lp_B, done_B | (tok_B == specials.EOS)


def uniforms(key, num_new_tokens: int, batch: int):
  """The [N, B] uniforms of one sampling call, drawn once before the decode loop.

  Drawn as [B, N]: row b's numbers then depend on b alone, not on the batch
  size, so padding a batch with extra rows changes no row's tokens.
  """
  return jax.random.uniform(key, (batch, num_new_tokens), jnp.float32).T


def generate(cfg: model_lib.ModelConfig, num_new_tokens: int, guided: bool, params, prompt_BxC,
             key, gamma, temperature, top_k):
  """Samples num_new_tokens after BOS. Returns (tokens [B,N], log-probs [B,N]).

  Rows finish at EOS; after it they hold PAD with log-prob 0. With guided=True
  the batch is [cond; uncond] (uncond = learned null prompt), 2B rows through
  one forward with one cache each, and both get the same sampled token.
  """
  cfg, params = model_lib.decode_params(cfg, params)
  batch = prompt_BxC.shape[0]
  rows = 2 * batch if guided else batch
  prompt_RxC = jnp.concatenate([prompt_BxC, prompt_BxC]) if guided else prompt_BxC
  null_R = jnp.arange(rows) >= batch  # uncond rows only in the guided half
  bos_Rx1 = jnp.full((rows, 1), specials.BOS, jnp.int32)
  cache = model_lib.init_cache(cfg, rows)
  cache = nn.with_logical_constraint(cache, model_lib.cache_axes(cache))
  logits_RxV, cache = model_lib.step(cfg, params, bos_Rx1, cache, 0, prompt_RxC, null_R)

  def dist(logits_RxV):
    if guided:
      return sampling_log_probs(logits_RxV[:batch], logits_RxV[batch:], gamma, temperature, top_k)
    return sampling_log_probs(logits_RxV, None, gamma, temperature, top_k)

  def feed(tok_B):
    return (jnp.concatenate([tok_B, tok_B]) if guided else tok_B)[:, None]

  # Random numbers are drawn here, not in the loop: on a CPU, threefry runs as
  # a loop of its own, which per decode step costs a large share of the step.
  u_NxB = uniforms(key, num_new_tokens, batch)
  tok0, lp0, done = draw(u_NxB[0], dist(logits_RxV), jnp.zeros(batch, bool))

  def body(carry, xs):
    t, u_B = xs
    tok_B, cache, done_B = carry
    pos = cfg.prompt_len + t  # position of the token being fed (BOS sits at prompt_len)
    logits_RxV, cache = model_lib.step(cfg, params, feed(tok_B), cache, pos)
    tok_B, lp_B, done_B = draw(u_B, dist(logits_RxV), done_B)
    return (tok_B, cache, done_B), (tok_B, lp_B)

  _, (toks_NxB, lps_NxB) = jax.lax.scan(body, (tok0, cache, done),
                                        (jnp.arange(1, num_new_tokens), u_NxB[1:]))
  tokens_BxN = jnp.concatenate([tok0[:, None], toks_NxB.T], axis=1)
  logprobs_BxN = jnp.concatenate([lp0[:, None], lps_NxB.T], axis=1)
  return tokens_BxN, logprobs_BxN


def score(cfg: model_lib.ModelConfig, params, tokens_BxT, prompt_BxC, gamma):
  """Teacher-forced per-position log-probs [B, T, V]: cond, uncond and CFG-combined.

  One forward over 2B rows ([cond; uncond]); position t scores y_t given y_<t.
  """
  batch = tokens_BxT.shape[0]
  null_R = jnp.arange(2 * batch) >= batch
  logits = model_lib.forward(cfg, params, jnp.concatenate([tokens_BxT, tokens_BxT]),
                             jnp.concatenate([prompt_BxC, prompt_BxC]), null_R)
  lc, lu = logits[:batch], logits[batch:]
  return {'cond': jax.nn.log_softmax(lc, -1), 'uncond': jax.nn.log_softmax(lu, -1),
          'cfg': cfg_log_probs(lc, lu, gamma)}


def token_mask(tokens_BxT):
  """1 where a position holds a real token (events and the EOS), 0 on PAD."""
  return (tokens_BxT != specials.PAD).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Jitted samplers for one model config on one mesh (gemma-style: static here)."""
  cfg: model_lib.ModelConfig
  num_new_tokens: int
  mesh: jax.sharding.Mesh
  rules: Any

  def __post_init__(self):
    if not 1 <= self.num_new_tokens <= self.cfg.seq_len:
      raise ValueError(f'num_new_tokens={self.num_new_tokens} must be in [1, seq_len='
                       f'{self.cfg.seq_len}]')

  @functools.cached_property
  def param_shardings(self):
    return sharding_lib.logical_to_shardings(model_lib.abstract_params(self.cfg), self.mesh,
                                             self.rules)

  def _jit(self, guided: bool):
    batch = sharding_lib.batch_sharding(self.mesh, 2)
    repl = sharding_lib.replicated(self.mesh)
    fn = functools.partial(generate, self.cfg, self.num_new_tokens, guided)
    return jax.jit(fn, in_shardings=(self.param_shardings, batch, repl, repl, repl, repl),
                   out_shardings=(batch, batch))

  @functools.cached_property
  def _student(self):
    return self._jit(False)

  @functools.cached_property
  def _teacher(self):
    return self._jit(True)

  def _check_prompt(self, prompt_BxC):
    if prompt_BxC.ndim != 2 or prompt_BxC.shape[1] != self.cfg.prompt_len:
      raise ValueError(f'prompt must be [batch, prompt_len={self.cfg.prompt_len}], got shape '
                       f'{tuple(prompt_BxC.shape)}')
    n = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    if prompt_BxC.shape[0] % n:
      raise ValueError(f'batch {prompt_BxC.shape[0]} must be a multiple of data*fsdp = {n}')

  def _run(self, fn, params, prompt_BxC, key, gamma, temperature, top_k):
    prompt_BxC = jnp.asarray(prompt_BxC, jnp.int32)
    self._check_prompt(prompt_BxC)
    if not float(temperature) > 0:
      raise ValueError(f'temperature must be > 0, got {temperature}')
    if float(gamma) < 0:
      raise ValueError(f'gamma must be >= 0, got {gamma}')
    scalars = (jnp.float32(gamma), jnp.float32(temperature), jnp.int32(top_k))
    with sharding_lib.activate(self.mesh, self.rules):
      return fn(params, prompt_BxC, key, *scalars)

  def sample(self, params, prompt_BxC, key, temperature=1.0, top_k=0):
    """Student sampling (no CFG): one forward per token."""
    return self._run(self._student, params, prompt_BxC, key, 1.0, temperature, top_k)

  def sample_cfg(self, params, prompt_BxC, key, gamma=3.0, temperature=1.0, top_k=0):
    """CFG-teacher sampling: cond and uncond rows in one forward per token."""
    return self._run(self._teacher, params, prompt_BxC, key, gamma, temperature, top_k)
