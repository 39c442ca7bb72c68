"""Student sampler, CFG-teacher sampler and teacher-forced CFG scoring.

All three go through `model.Decoder` (the decode step for the samplers, the
same module's full forward for scoring). What is static (model config, number
of new tokens, mesh) lives in the frozen `Sampler`; guidance (gamma,
plausibility), temperature, top-k and the length bounds are traced arrays, so
changing them never recompiles.

Guidance restricted to plausible tokens (DESIGN.md 6), with l = log_softmax:
    P = {v : l_c(v) >= max_w l_c(w) + log alpha}
    g(v) = l_c(v) + (gamma - 1)(l_c(v) - l_u(v))  on P,   l_c(v) elsewhere
    teacher = softmax(g)
alpha = 0 guides every token: plain CFG, log_softmax(l_u + gamma (l_c - l_u)).
gamma = 1 is *exactly* l_c (the student's distribution, bit for bit). Tokens
outside P get no guidance term, so a tiny difference between two tiny
log-probs (EOS long before a row ends; a token the data's grammar forbids
here) is never amplified; they keep their conditional proportions and a
non-zero probability, so KL(student || teacher) stays finite.

Length bounds (`LengthBounds`, in events = tokens before EOS): EOS is
impossible before `min` events and certain after `max`. They act on the
distribution itself (in the samplers and in scoring alike), so a fixed-length
dataset's rows always end exactly at its length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diverse_cfg import config_lib
from diverse_cfg import model as model_lib
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials

DEFAULT_PLAUSIBILITY = config_lib.DEFAULT_PLAUSIBILITY
NO_MAX_LENGTH = 2**30  # LengthBounds.max that never forces EOS


class Guidance(NamedTuple):
  """CFG strength gamma and plausibility threshold alpha in [0, 1) (traced scalars)."""
  gamma: Any = 1.0
  plausibility: Any = 0.0


class LengthBounds(NamedTuple):
  """Events (tokens before EOS) a row may hold: EOS barred before min, forced at max."""
  min: Any = 0
  max: Any = NO_MAX_LENGTH


def data_length_bounds(fixed_length: int) -> LengthBounds:
  """A dataset's bounds: exactly fixed_length events, or none (fixed_length = 0)."""
  return LengthBounds(fixed_length, fixed_length) if fixed_length else LengthBounds()


def as_traced(nt):
  """A Guidance / LengthBounds of Python numbers as float32 / int32 arrays."""
  dtype = jnp.float32 if isinstance(nt, Guidance) else jnp.int32
  return type(nt)(*(jnp.asarray(v, dtype) for v in nt))


def plausible_mask(lc, plausibility):
  """P: tokens whose conditional log-prob is within log(alpha) of the best one."""
  # alpha = 0: log 0 = -inf, every token (the masked ones included) is in P.
  return lc >= jnp.max(lc, axis=-1, keepdims=True) + jnp.log(plausibility)


def guided_log_probs(logits_c, logits_u, guidance: Guidance):
  """g = l_c + (gamma - 1)(l_c - l_u) on P, l_c elsewhere: the teacher before normalising.

  logits_u=None (no CFG) gives l_c. gamma = 1 gives l_c bit for bit; alpha = 0
  is plain CFG bit for bit.
  """
  lc = jax.nn.log_softmax(logits_c, axis=-1)
  if logits_u is None:
    return lc
  guided = lc + (guidance.gamma - 1.0) * (lc - jax.nn.log_softmax(logits_u, axis=-1))
  return jnp.where(plausible_mask(lc, guidance.plausibility), guided, lc)


def cfg_log_probs(logits_c, logits_u, guidance: Guidance):
  """The teacher's normalised log-probs over the last axis (see guided_log_probs)."""
  return jax.nn.log_softmax(guided_log_probs(logits_c, logits_u, guidance), axis=-1)


def bound_length(logp_xV, events_x, bounds: LengthBounds):
  """Bars EOS where fewer than bounds.min events precede, forces it at bounds.max.

  events_x: events before the position being predicted (broadcast against
  logp_xV's leading axes). Barred tokens get NEG_INF (probability 0, finite).
  """
  is_eos_V = jnp.arange(logp_xV.shape[-1]) == specials.EOS
  barred = jnp.where(events_x[..., None] < bounds.min, is_eos_V, False)
  barred |= jnp.where(events_x[..., None] >= bounds.max, ~is_eos_V, False)
  return jnp.where(barred, model_lib.NEG_INF, logp_xV)


def bounded_log_probs(logits_BxTxV, bounds: LengthBounds, events_BxT=None):
  """Normalised log-probs of a teacher-forced pass (logits or unnormalised log-probs)
  under the length bounds: position t has t events before it (or events_BxT[t])."""
  if events_BxT is None:
    events_BxT = jnp.arange(logits_BxTxV.shape[1])[None]
  return jax.nn.log_softmax(bound_length(logits_BxTxV, events_BxT, bounds), axis=-1)


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


def sampling_log_probs(logits_c, logits_u, guidance: Guidance, temperature, top_k, events_B,
                       bounds: LengthBounds):
  """The distribution a token is drawn from: guidance, length bounds, temperature, top-k.

  Normalised once, at the end: softmax, temperature and top-k all commute
  with a per-row shift, so the guided log-probs need no normalising first.
  """
  logp = bound_length(guided_log_probs(logits_c, logits_u, guidance), events_B, bounds)
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
             key, guidance: Guidance, temperature, top_k, bounds: LengthBounds,
             early_exit: bool = True, min_rows: int = 0):
  """Samples num_new_tokens after BOS. Returns (tokens [B,N], log-probs [B,N]).

  Rows finish at EOS; after it they hold PAD with log-prob 0. With guided=True
  the batch is [cond; uncond] (uncond = learned null prompt), 2B rows through
  one forward with one cache each, and both get the same sampled token.
  guidance is ignored when guided=False; the length bounds always apply.
  early_exit (static): decoding stops at the step where every row is done
  (EOS, or the length bounds' maximum), with the same tokens and log-probs as
  running all num_new_tokens steps (False: a fixed-length scan). With
  min_rows > 0 (static) it also compacts: once at most half the rows are
  still running, they move (with their caches and uniforms) into a batch half
  the size, down to min_rows, since a decode step's time scales with its rows
  on a CPU. The same draws, but the smaller batches' matmuls may round
  differently: log-probs can move by float rounding (~1e-6), and so, rarely,
  a token (tests/test_sampling.py); hence off by default.
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

  def dist(logits_RxV, t):  # t = new tokens so far = events so far, for rows not done
    rows_b = logits_RxV.shape[0] // 2 if guided else logits_RxV.shape[0]
    logits_u = logits_RxV[rows_b:] if guided else None
    return sampling_log_probs(logits_RxV[:rows_b], logits_u, guidance, temperature, top_k,
                              jnp.full((rows_b,), t), bounds)

  def feed(tok_B):
    return (jnp.concatenate([tok_B, tok_B]) if guided else tok_B)[:, None]

  # Random numbers are drawn here, not in the loop: on a CPU, threefry runs as
  # a loop of its own, which per decode step costs a large share of the step.
  u_NxB = uniforms(key, num_new_tokens, batch)
  tok0, lp0, done = draw(u_NxB[0], dist(logits_RxV, 0), jnp.zeros(batch, bool))

  def decode(t, tok_B, cache, done_B, u_B):  # feeds token t - 1, draws token t
    pos = cfg.prompt_len + t  # position of the token being fed (BOS sits at prompt_len)
    logits_RxV, cache = model_lib.step(cfg, params, feed(tok_B), cache, pos)
    tok_B, lp_B, done_B = draw(u_B, dist(logits_RxV, t), done_B)
    return tok_B, lp_B, cache, done_B

  if not early_exit:
    def scan_body(carry, t):
      tok_B, lp_B, cache, done_B = decode(t, *carry, u_NxB[t])
      return (tok_B, cache, done_B), (tok_B, lp_B)

    _, (toks_NxB, lps_NxB) = jax.lax.scan(scan_body, (tok0, cache, done),
                                          jnp.arange(1, num_new_tokens))
    return (jnp.concatenate([tok0[:, None], toks_NxB.T], axis=1),
            jnp.concatenate([lp0[:, None], lps_NxB.T], axis=1))

  # Preset to what a finished row holds (PAD, log-prob 0): the steps never run leave them so.
  toks_BxN = jnp.full((batch, num_new_tokens), specials.PAD, jnp.int32).at[:, 0].set(tok0)
  lps_BxN = jnp.zeros((batch, num_new_tokens), lp0.dtype).at[:, 0].set(lp0)

  # Batch sizes of the successive loops: each runs while more than half its rows are running.
  sizes = [batch]
  while min_rows > 0 and sizes[-1] % 2 == 0 and sizes[-1] // 2 >= min_rows:
    sizes.append(sizes[-1] // 2)
  carry = (jnp.int32(1), tok0, cache, done, jnp.arange(batch), toks_BxN, lps_BxN)
  for i, size in enumerate(sizes):
    if i:
      carry = compact(carry, size, guided)
    last = i == len(sizes) - 1

    def running(carry, last=last):
      t, _, _, done_b, _, _, _ = carry
      keep_going = (t < num_new_tokens) & ~jnp.all(done_b)
      return keep_going if last else keep_going & (jnp.sum(~done_b) * 2 > done_b.shape[0])

    def while_body(carry):
      t, tok_b, cache, done_b, row_b, toks_BxN, lps_BxN = carry
      tok_b, lp_b, cache, done_b = decode(t, tok_b, cache, done_b, u_NxB[t][row_b])
      return (t + 1, tok_b, cache, done_b, row_b, toks_BxN.at[row_b, t].set(tok_b),
              lps_BxN.at[row_b, t].set(lp_b))

    carry = jax.lax.while_loop(running, while_body, carry)
  return carry[5], carry[6]


def compact(carry, size: int, guided: bool):
  """generate's loop state with its running rows (and done ones to fill) in `size` rows."""
  t, tok_b, cache, done_b, row_b, toks_BxN, lps_BxN = carry
  keep = jnp.argsort(done_b, stable=True)[:size]  # running rows first
  cache_rows = jnp.concatenate([keep, keep + done_b.shape[0]]) if guided else keep
  # Cache arrays are [..., rows, heads, length, head_dim] (a leading layer axis when scanned).
  cache = jax.tree.map(lambda x: jnp.take(x, cache_rows, axis=x.ndim - 4), cache)
  return t, tok_b[keep], cache, done_b[keep], row_b[keep], toks_BxN, lps_BxN


def score(cfg: model_lib.ModelConfig, params, tokens_BxT, prompt_BxC, guidance: Guidance,
          bounds: LengthBounds = LengthBounds()):
  """Teacher-forced per-position log-probs [B, T, V]: cond, uncond and the guided teacher.

  One forward over 2B rows ([cond; uncond]); position t scores y_t given y_<t,
  under the same guidance and length bounds as the samplers.
  """
  batch = tokens_BxT.shape[0]
  null_R = jnp.arange(2 * batch) >= batch
  logits = model_lib.forward(cfg, params, jnp.concatenate([tokens_BxT, tokens_BxT]),
                             jnp.concatenate([prompt_BxC, prompt_BxC]), null_R)
  return _scores(logits[:batch], logits[batch:], guidance, bounds, None)


def score_packed(cfg: model_lib.ModelConfig, params, packed, guidance: Guidance,
                 bounds: LengthBounds = LengthBounds()):
  """`score` of packed rows (packing.Packed): per-slot log-probs [R, W, V], the uncond
  half of the 2R rows fed the null prompt."""
  both = type(packed)(*(jnp.concatenate([x, x]) for x in packed))
  rows = packed.inputs.shape[0]
  both = both._replace(null=both.null.at[rows:].set(True))
  logits = model_lib.forward_packed(cfg, params, both)
  return _scores(logits[:rows], logits[rows:], guidance, bounds,
                 packed.positions - cfg.prompt_len)


def _scores(lc, lu, guidance: Guidance, bounds: LengthBounds, events):
  return {'cond': bounded_log_probs(lc, bounds, events),
          'uncond': bounded_log_probs(lu, bounds, events),
          'cfg': bounded_log_probs(guided_log_probs(lc, lu, guidance), bounds, events)}


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
    return jax.jit(fn, in_shardings=(self.param_shardings, batch, repl, repl, repl, repl, repl),
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
    n = sharding_lib.batch_shards(self.mesh)
    if prompt_BxC.shape[0] % n:
      raise ValueError(f'batch {prompt_BxC.shape[0]} must be a multiple of data*fsdp = {n}')

  def _run(self, fn, params, prompt_BxC, key, guidance: Guidance, temperature, top_k,
           bounds: LengthBounds):
    prompt_BxC = jnp.asarray(prompt_BxC, jnp.int32)
    self._check_prompt(prompt_BxC)
    check_settings(guidance, temperature, top_k, bounds, self.num_new_tokens)
    with sharding_lib.activate(self.mesh, self.rules):
      return fn(params, prompt_BxC, key, as_traced(guidance), jnp.float32(temperature),
                jnp.int32(top_k), as_traced(bounds))

  def sample(self, params, prompt_BxC, key, temperature=1.0, top_k=0,
             bounds: LengthBounds = LengthBounds()):
    """Student sampling (no CFG): one forward per token."""
    return self._run(self._student, params, prompt_BxC, key, Guidance(), temperature, top_k,
                     bounds)

  def sample_cfg(self, params, prompt_BxC, key, gamma=3.0, temperature=1.0, top_k=0,
                 plausibility=DEFAULT_PLAUSIBILITY, bounds: LengthBounds = LengthBounds()):
    """CFG-teacher sampling: cond and uncond rows in one forward per token."""
    return self._run(self._teacher, params, prompt_BxC, key, Guidance(gamma, plausibility),
                     temperature, top_k, bounds)


def check_settings(guidance: Guidance, temperature, top_k, bounds: LengthBounds,
                   num_new_tokens: int | None = None) -> None:
  """ValueError naming the first sampling setting out of range."""
  if not float(temperature) > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  if float(guidance.gamma) < 0:
    raise ValueError(f'gamma must be >= 0, got {guidance.gamma}')
  if not 0.0 <= float(guidance.plausibility) < 1.0:
    raise ValueError(f'plausibility must be in [0, 1) (0 = plain CFG), got '
                     f'{guidance.plausibility}')
  if int(top_k) < 0:
    raise ValueError(f'top_k must be >= 0 (0 = off), got {top_k}')
  if not 0 <= int(bounds.min) <= int(bounds.max):
    raise ValueError(f'length bounds must satisfy 0 <= min <= max, got min={bounds.min}, '
                     f'max={bounds.max}')
  if num_new_tokens is not None and int(bounds.min) >= num_new_tokens:
    raise ValueError(f'min length {bounds.min} leaves no room for EOS in {num_new_tokens} new '
                     'tokens')
