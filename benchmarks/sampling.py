"""Sampling throughput: student vs CFG teacher vs a naive no-cache sampler.

Measures, for each model size and batch:

* tokens/s of `Sampler.sample` (student, B rows through the KV-cached decode)
  and `Sampler.sample_cfg` (CFG teacher, 2B rows: [cond; uncond]) for the same
  B output sequences of the same length, and their ratio (the CFG teacher
  does twice the model work per token, so the ratio is bounded by ~2.0);
* tokens/s of a naive sampler that has no KV cache: at every step it runs the
  full teacher-forced forward over a fixed-size padded buffer holding the
  whole prefix (one jitted `lax.fori_loop`, so it is also a single compiled
  program), then draws from the same distribution with the same keys;
* ms per generated token as the number N of new tokens grows, KV cache vs
  naive (the naive buffer is N long, so its per-token cost grows with N; the
  KV-cached step attends over a fixed-size cache, so its cost should be flat).

Tokens/s counts the real generated tokens of the B output sequences (events
and EOS, not the PAD after a row's EOS; the samplers stop decoding once every
row is done); the CFG teacher's unconditional rows are not output and are not
counted.
Compilation is excluded (one warm-up call per program), every call is ended
with `block_until_ready`, timed calls of the programs being compared go
round-robin (so load changes on a shared machine hit them alike), and the
median of --repeats timed calls is reported. Every naive step costs the same
(a full forward over the fixed N-long buffer), so the naive sampler is timed
over its first --naive_steps steps and scaled to N (0: time all N steps).
The load average is recorded next to each figure: on a shared CPU box the
absolute numbers move with it. Runs on any JAX backend (CPU, GPU, TPU).

  python -m benchmarks.sampling --sizes=small,medium --batch=8 --repeats=5 \
      --json_out=/tmp/sampling.json

See BENCHMARKS.md for recorded figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import csv_list
from benchmarks.common import library_info
from benchmarks.common import load_avg
from benchmarks.common import time_interleaved
from benchmarks.common import write_json
from diverse_cfg import config_lib
from diverse_cfg import model as model_lib
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials

VOCAB = 500
PROMPT_VOCAB = 32
PROMPT_LEN = 3

# name -> (num_layers, d_model, num_heads, mlp_dim)
SIZES = {
    'tiny': (2, 64, 4, 256),
    'small': (2, 128, 4, 512),
    'medium': (6, 384, 6, 1536),
    'large': (8, 512, 8, 2048),
}


def model_config(size: str, seq_len: int) -> model_lib.ModelConfig:
  """A size of SIZES; with the suffix '-scan' (e.g. 'medium-scan') the layers are scanned."""
  base, _, variant = size.partition('-')
  layers, d_model, heads, mlp = SIZES[base]
  return model_lib.ModelConfig(vocab_size=VOCAB, prompt_vocab_size=PROMPT_VOCAB,
                               prompt_len=PROMPT_LEN, seq_len=seq_len, num_layers=layers,
                               d_model=d_model, num_heads=heads, mlp_dim=mlp,
                               scan_layers=variant == 'scan')


# --------------------------------------------------------------------------- naive sampler


def naive_generate(cfg: model_lib.ModelConfig, num_new_tokens: int, num_steps: int, params,
                   prompt_BxC, key, temperature, top_k):
  """Student sampling with no KV cache: a full forward over the prefix per token.

  The prefix lives in a [B, N] buffer (PAD beyond what has been drawn); step t
  runs `model.forward` over the whole buffer (BOS is prepended there) and
  reads the logits at position t, which by causality see only y_<=t. Same
  distribution, keys and EOS handling as `sampling.generate(guided=False)`, so
  it draws the same tokens up to float round-off.

  Only the first `num_steps` (<= N) tokens are drawn. Every step costs the
  same (a full forward over the whole N-long buffer), so the time of all N
  steps is exactly num_steps' time * N / num_steps; this keeps the naive
  baseline affordable for the bigger models on a CPU.
  """
  batch = prompt_BxC.shape[0]
  null_B = jnp.zeros((batch,), bool)

  u_NxB = sampling.uniforms(key, num_new_tokens, batch)

  def body(t, carry):
    buf_BxN, lps_BxN, done_B = carry
    logits_BxNxV = model_lib.forward(cfg, params, buf_BxN, prompt_BxC, null_B)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxNxV, t, axis=1, keepdims=False)
    logp_BxV = sampling.sampling_log_probs(logits_BxV, None, sampling.Guidance(), temperature,
                                           top_k, jnp.full((batch,), t), sampling.LengthBounds())
    tok_B, lp_B, done_B = sampling.draw(u_NxB[t], logp_BxV, done_B)
    buf_BxN = jax.lax.dynamic_update_slice(buf_BxN, tok_B[:, None], (0, t))
    lps_BxN = jax.lax.dynamic_update_slice(lps_BxN, lp_B[:, None], (0, t))
    return buf_BxN, lps_BxN, done_B

  init = (jnp.full((batch, num_new_tokens), specials.PAD, jnp.int32),
          jnp.zeros((batch, num_new_tokens), jnp.float32), jnp.zeros((batch,), bool))
  tokens_BxN, logprobs_BxN, _ = jax.lax.fori_loop(0, num_steps, body, init)
  return tokens_BxN, logprobs_BxN


@dataclasses.dataclass(frozen=True)
class NaiveSampler:
  cfg: model_lib.ModelConfig
  num_new_tokens: int
  num_steps: int
  mesh: jax.sharding.Mesh
  rules: object

  @functools.cached_property
  def _fn(self):
    psh = sharding.logical_to_shardings(model_lib.abstract_params(self.cfg), self.mesh, self.rules)
    batch = sharding.batch_sharding(self.mesh, 2)
    repl = sharding.replicated(self.mesh)
    fn = functools.partial(naive_generate, self.cfg, self.num_new_tokens, self.num_steps)
    return jax.jit(fn, in_shardings=(psh, batch, repl, repl, repl), out_shardings=(batch, batch))

  def sample(self, params, prompt_BxC, key, temperature=1.0, top_k=0):
    with sharding.activate(self.mesh, self.rules):
      return self._fn(params, prompt_BxC, key, jnp.float32(temperature), jnp.int32(top_k))


# --------------------------------------------------------------------------- benchmarks


def _mesh(num_devices: int):
  c = config_lib.base_config()
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:num_devices])
  return mesh, sharding.rules_of(c.mesh)


def setup(size: str, seq_len: int, batch: int, num_devices: int, seed: int = 0):
  """A SIZE's config, a mesh over num_devices, random sharded params and [batch, prompt] prompts."""
  cfg = model_config(size, seq_len)
  mesh, rules = _mesh(num_devices)
  params, _ = sharding.create_sharded(functools.partial(model_lib.init_params, cfg), mesh, rules,
                                      jax.random.key(seed))
  rng = np.random.default_rng(seed)
  prompt = jnp.asarray(rng.integers(0, PROMPT_VOCAB, (batch, PROMPT_LEN)).astype(np.int32))
  prompt = jax.device_put(prompt, sharding.batch_sharding(mesh, 2))
  return cfg, mesh, rules, params, prompt


def _naive_steps(n: int, naive_steps: int) -> int:
  return n if naive_steps <= 0 else min(n, naive_steps)


def bench_throughput(size: str, batch: int, seq_len: int, repeats: int, gamma: float,
                     naive_steps: int | None, num_devices: int) -> dict:
  """Student vs CFG teacher (vs naive) tokens/s for B sequences of seq_len new tokens."""
  cfg, mesh, rules, params, prompt = setup(size, seq_len, batch, num_devices)
  key = jax.random.key(1)
  n = seq_len
  sampler = sampling.Sampler(cfg, n, mesh, rules)
  out = {'size': size, 'batch': batch, 'new_tokens': n, 'num_layers': cfg.num_layers,
         'd_model': cfg.d_model, 'num_heads': cfg.num_heads, 'mlp_dim': cfg.mlp_dim,
         'vocab_size': cfg.vocab_size, 'num_params': cfg.num_params(), 'load_before': load_avg()}
  fns = {
      'student': lambda: sampler.sample(params, prompt, key),
      'cfg': lambda: sampler.sample_cfg(params, prompt, key, gamma=gamma),
  }
  if naive_steps is not None:
    steps = _naive_steps(n, naive_steps)
    naive = NaiveSampler(cfg, n, steps, mesh, rules)
    fns['naive'] = lambda: naive.sample(params, prompt, key)
  times = time_interleaved(fns, repeats)
  # Real tokens (events and EOS, not the PAD after it) of each sampler's rows; the naive sampler
  # draws the student's tokens.
  real = {name: int((np.asarray(fns[name]()[0]) != specials.PAD).sum())
          for name in ('student', 'cfg')}
  for name, t in times.items():
    if name == 'naive':
      t['steps_timed'] = steps
      t['full_run_s'] = t['median_s'] * n / steps  # every naive step costs the same
    else:
      t['full_run_s'] = t['median_s']
    t['real_tokens'] = real.get(name, real['student'])
    t['tokens_per_s'] = t['real_tokens'] / t['full_run_s']
    t['ms_per_step'] = 1e3 * t['full_run_s'] / n  # one step emits one token for each of B rows
    out[name] = t
  out['ratio_student_over_cfg'] = out['student']['tokens_per_s'] / out['cfg']['tokens_per_s']
  if naive_steps is not None:
    out['speedup_kv_over_naive'] = out['student']['tokens_per_s'] / out['naive']['tokens_per_s']
    # Sanity: same keys, same distribution: the cached and naive samplers draw the same tokens.
    a = np.asarray(fns['student']()[0])[:, :steps]
    b = np.asarray(fns['naive']()[0])[:, :steps]
    out['naive_token_agreement'] = float((a == b).mean())
  out['load_after'] = load_avg()
  return out


def bench_growth(size: str, batch: int, seq_len: int, lengths, repeats: int, naive_steps: int,
                 num_devices: int) -> list[dict]:
  """ms per decode step when generating N new tokens, KV cache vs naive, for N in lengths."""
  cfg, mesh, rules, params, prompt = setup(size, seq_len, batch, num_devices)
  key = jax.random.key(2)
  rows = []
  for n in lengths:
    kv = sampling.Sampler(cfg, n, mesh, rules)
    steps = _naive_steps(n, naive_steps)
    nv = NaiveSampler(cfg, n, steps, mesh, rules)
    load = load_avg()
    t = time_interleaved({'kv': lambda: kv.sample(params, prompt, key),
                          'naive': lambda: nv.sample(params, prompt, key)}, repeats)
    t['naive']['steps_timed'] = steps
    rows.append({'size': size, 'batch': batch, 'new_tokens': n,
                 'kv_ms_per_step': 1e3 * t['kv']['median_s'] / n,
                 'naive_ms_per_step': 1e3 * t['naive']['median_s'] / steps,
                 'kv': t['kv'], 'naive': t['naive'], 'load_before': load})
  return rows


# --------------------------------------------------------------------------- report


def machine_info() -> dict:
  dev = jax.devices()
  return {
      'date': datetime.date.today().isoformat(),
      'jax_version': jax.__version__,
      'backend': jax.default_backend(),
      'device_kind': dev[0].device_kind,
      'devices': [str(d) for d in dev],
      'nproc': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'load_avg_at_start': load_avg(),
      'machine': platform.machine(),
      'python': sys.version.split()[0],
      'command': ' '.join(['python', '-m', 'benchmarks.sampling'] + sys.argv[1:]),
      'library': library_info(),
  }


def print_throughput(rows) -> None:
  naive = 'naive' in rows[0]
  head = (f"{'size':>7} {'params':>7} {'batch':>5} {'N':>4} | {'student tok/s':>13} "
          f"{'CFG tok/s':>10} {'stud/CFG':>8}")
  if naive:
    head += f" | {'naive tok/s':>11} {'KV/naive':>8} {'agree':>5}"
  head += f" | {'load':>4}"
  print(head)
  print('-' * len(head))
  for r in rows:
    line = (f"{r['size']:>7} {r['num_params'] / 1e6:>6.2f}M {r['batch']:>5} {r['new_tokens']:>4} | "
            f"{r['student']['tokens_per_s']:>13.0f} {r['cfg']['tokens_per_s']:>10.0f} "
            f"{r['ratio_student_over_cfg']:>8.2f}")
    if naive:
      mark = '*' if r['naive']['steps_timed'] < r['new_tokens'] else ' '
      line += (f" | {r['naive']['tokens_per_s']:>10.0f}{mark} {r['speedup_kv_over_naive']:>7.1f}x "
               f"{r['naive_token_agreement']:>5.2f}")
    load = r['load_before'][0] if r['load_before'] else float('nan')
    print(line + f" | {load:>4.1f}")
  if naive and any(r['naive']['steps_timed'] < r['new_tokens'] for r in rows):
    print('  * naive timed over its first --naive_steps steps and scaled to N '
          '(each step is the same full forward over the N-long buffer)')


def print_growth(rows) -> None:
  head = (f"{'size':>7} {'batch':>5} {'N':>4} | {'KV ms/step':>10} {'KV us/tok':>9} | "
          f"{'naive ms/step':>13} {'naive us/tok':>12} | {'naive/KV':>8}")
  print(head)
  print('-' * len(head))
  for r in rows:
    b = r['batch']
    print(f"{r['size']:>7} {b:>5} {r['new_tokens']:>4} | {r['kv_ms_per_step']:>10.2f} "
          f"{1e3 * r['kv_ms_per_step'] / b:>9.1f} | {r['naive_ms_per_step']:>13.2f} "
          f"{1e3 * r['naive_ms_per_step'] / b:>12.1f} | "
          f"{r['naive_ms_per_step'] / r['kv_ms_per_step']:>7.1f}x")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='small,medium',
                 help=f'comma list of {",".join(SIZES)}, each also as SIZE-scan (scan over layers; '
                      'default: small,medium)')
  p.add_argument('--batch', default='8', help='comma list of batch sizes B (default: 8)')
  p.add_argument('--seq_len', type=int, default=128, help='new tokens N per sequence (default 128)')
  p.add_argument('--repeats', type=int, default=5, help='timed calls per program (median)')
  p.add_argument('--gamma', type=float, default=3.0, help='CFG strength for sample_cfg')
  p.add_argument('--naive_steps', type=int, default=32,
                 help='time the naive sampler over at most this many steps and scale to N '
                      '(0 = all N steps; -1 = no naive sampler in the throughput table)')
  p.add_argument('--growth_lengths', default='16,32,64,128',
                 help='N values for the per-step-time-vs-N table; empty to skip')
  p.add_argument('--growth_sizes', default=None,
                 help='sizes for the growth table (default: the first of --sizes)')
  p.add_argument('--growth_batch', type=int, default=None,
                 help='batch for the growth table (default: the first of --batch)')
  p.add_argument('--num_devices', type=int, default=1,
                 help='devices in the mesh; the batch is split over them (default 1)')
  p.add_argument('--json_out', default=None, help='write all figures here as JSON')
  args = p.parse_args(argv)

  sizes, batches = csv_list(args.sizes), [int(b) for b in csv_list(args.batch)]
  growth_sizes = csv_list(args.growth_sizes) or sizes[:1]
  for s in sizes + growth_sizes:
    if s.partition('-')[0] not in SIZES or s.partition('-')[2] not in ('', 'scan'):
      p.error(f'unknown size {s!r}; choose from {", ".join(SIZES)} (each also as SIZE-scan)')
  lengths = [int(n) for n in csv_list(args.growth_lengths)]
  if any(not 1 <= n <= args.seq_len for n in lengths):
    p.error(f'--growth_lengths must lie in [1, --seq_len={args.seq_len}]')
  if not 1 <= args.num_devices <= len(jax.devices()):
    p.error(f'--num_devices must be in [1, {len(jax.devices())}]')

  info = machine_info()
  print(f'jax {info["jax_version"]}  backend={info["backend"]}  '
        f'device_kind={info["device_kind"]}  nproc={info["nproc"]}  '
        f'load avg={info["load_avg_at_start"]}')
  print(f'jax.devices() = {jax.devices()}  (using {args.num_devices})')
  lib = info['library']
  print(f'library {lib["path"]}: git HEAD {lib["git_head"]}, uncommitted {lib["uncommitted"]}, '
        f'sha1 {lib["sha1"]}')
  print(f'vocab={VOCAB} prompt_len={PROMPT_LEN} N={args.seq_len} repeats={args.repeats} '
        f'gamma={args.gamma}; median of repeats, compilation excluded\n', flush=True)

  naive_steps = None if args.naive_steps < 0 else args.naive_steps
  throughput = []
  for size in sizes:
    for b in batches:
      r = bench_throughput(size, b, args.seq_len, args.repeats, args.gamma, naive_steps,
                           args.num_devices)
      throughput.append(r)
      print(f"  {size} B={b}: student/CFG = {r['ratio_student_over_cfg']:.2f}", flush=True)
  if throughput:
    print(f'\nThroughput on {info["device_kind"]} (tokens/s of the B output sequences; '
          'CFG runs 2B rows):')
    print_throughput(throughput)

  growth = []
  if lengths:
    gb = args.growth_batch or batches[0]
    for size in growth_sizes:
      growth += bench_growth(size, gb, args.seq_len, lengths, args.repeats,
                             args.naive_steps if args.naive_steps > 0 else 0, args.num_devices)
    print(f'\nTime per decode step vs new tokens N on {info["device_kind"]} '
          '(a step emits one token for each of the B rows):')
    print_growth(growth)

  info['load_avg_at_end'] = load_avg()
  result = {'machine': info, 'args': vars(args), 'throughput': throughput, 'growth': growth}
  write_json(args.json_out, result)
  return result


if __name__ == '__main__':
  main()
