"""Where the CFG sampler's time goes, against what this device's matmuls can do.

For one size and batch of benchmarks.sampling's model family, in one run:

* the CFG sampler (2B rows per decode step) end to end: seconds, real tokens/s and
  model FLOP/s (the matmul FLOPs of every decode step, training.decoder_flops_per_token);
* the device's square-matmul peak (matmul_peak: eight chained 2048^2 products) and the
  rate of every matmul shape one decode step runs (M = 2B rows: the q/k/v
  projectionss (q, k, v: three products), the attention output, the gated MLP's up and down projections, the head),
  each alone, eight chained per call;
* a profiler trace of the sampler: kernel time per call by kind (matmul fusions,
  copies/transposes, the rest), summed over XLA's CPU threads, and for how much of a
  call's wall time 0, 1, 2, ... threads were running a kernel.

From these: the share of the peak the sampler reaches, the ceiling its matmul shapes
allow (the FLOP-weighted harmonic mean of their rates, i.e. the time the step's matmuls
would take alone), and where the rest goes.

  python -m benchmarks.sampler_profile --size=medium --batch=32 --json_out=/tmp/profile.json
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks import sampling as bench_sampling
from benchmarks.common import kernel_breakdown
from benchmarks.common import load_avg
from benchmarks.common import matmul_peak
from benchmarks.common import matmul_rate
from benchmarks.common import time_interleaved
from benchmarks.common import write_json
from diverse_cfg import sampling
from diverse_cfg import specials
from diverse_cfg import training


def step_matmuls(cfg, rows: int) -> dict[str, tuple[int, int, int, int]]:
  """name -> (M, K, N, products per decode step) of the decoder's dense matmuls."""
  d, h = cfg.d_model, cfg.num_heads * cfg.head_dim
  return {'q, k, v': (rows, d, h, 3 * cfg.num_layers), 'attn_out': (rows, h, d, cfg.num_layers),
          'mlp_up (gate, up)': (rows, d, cfg.mlp_dim, 2 * cfg.num_layers),
          'mlp_down': (rows, cfg.mlp_dim, d, cfg.num_layers),
          'head (tied)': (rows, d, cfg.padded_vocab, 1)}


def profile(size: str, batch: int, seq_len: int, gamma: float, repeats: int) -> dict:
  cfg, mesh, rules, params, prompt = bench_sampling.setup(size, seq_len, batch, 1)
  sampler = sampling.Sampler(cfg, seq_len, mesh, rules)
  key = jax.random.key(1)
  run = lambda: sampler.sample_cfg(params, prompt, key, gamma=gamma)
  out = {'size': size, 'batch': batch, 'rows_per_step': 2 * batch, 'new_tokens': seq_len,
         'num_params': cfg.num_params(), 'load_before': load_avg()}
  seconds = time_interleaved({'cfg': run}, repeats)['cfg']['median_s']
  tokens = np.asarray(run()[0])
  # Every row decodes until the last row is done (early exit): that many steps of 2B rows.
  steps = int(((tokens != specials.PAD).sum(axis=1)).max())
  flops = steps * 2 * batch * training.decoder_flops_per_token(cfg, training=False)
  peak = matmul_peak(cfg.jnp_dtype, repeats)
  out.update(seconds=seconds, decode_steps=steps, ms_per_step=1e3 * seconds / steps,
             real_tokens_per_s=float((tokens != specials.PAD).sum()) / seconds,
             model_flops_per_s=flops / seconds, square_matmul_peak=peak,
             share_of_peak=flops / seconds / peak)
  shapes, total_flops, total_s = {}, 0.0, 0.0
  for name, (m, k, n, count) in step_matmuls(cfg, 2 * batch).items():
    rate = matmul_rate(m, k, n, cfg.jnp_dtype, repeats)
    f = 2 * m * k * n * count
    shapes[name] = {'mkn': (m, k, n), 'per_step': count, 'flops_per_s': rate,
                    'share_of_peak': rate / peak}
    total_flops, total_s = total_flops + f, total_s + f / rate
  out['matmul_shapes'] = shapes
  out['matmuls_alone_ms_per_step'] = 1e3 * total_s
  out['matmul_shape_ceiling'] = total_flops / total_s / peak  # share of the peak
  out['kernels_per_call'] = kernel_breakdown(run, repeats)
  out['load_after'] = load_avg()
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', default='medium', help=f'one of {",".join(bench_sampling.SIZES)}')
  p.add_argument('--batch', type=int, default=32, help='B output sequences (2B rows per step)')
  p.add_argument('--seq_len', type=int, default=128, help='new tokens N per sequence')
  p.add_argument('--gamma', type=float, default=3.0, help='CFG strength')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per measurement (median)')
  p.add_argument('--json_out', default=None, help='write the figures here as JSON')
  args = p.parse_args(argv)
  if args.size not in bench_sampling.SIZES:
    p.error(f'unknown size {args.size!r}; choose from {", ".join(bench_sampling.SIZES)}')
  r = profile(args.size, args.batch, args.seq_len, args.gamma, args.repeats)
  print(f"{args.size} B={args.batch} CFG ({r['rows_per_step']} rows/step, {r['decode_steps']} "
        f"steps): {r['seconds']:.3f} s, {r['ms_per_step']:.2f} ms/step, "
        f"{r['model_flops_per_s'] / 1e9:.1f} GFLOP/s = {r['share_of_peak']:.0%} of the square "
        f"matmul peak {r['square_matmul_peak'] / 1e9:.1f} GFLOP/s")
  for name, s in r['matmul_shapes'].items():
    print(f"  {name:>16} {str(s['mkn']):>18} x{s['per_step']:<3} "
          f"{s['flops_per_s'] / 1e9:7.1f} GFLOP/s = {s['share_of_peak']:.0%} of peak")
  print(f"  the step's matmuls alone: {r['matmuls_alone_ms_per_step']:.2f} ms/step, i.e. at most "
        f"{r['matmul_shape_ceiling']:.0%} of the peak for these shapes")
  k = r['kernels_per_call']
  print('  kernel time per call by kind (ms, summed over threads):', k['ms_per_step_by_kind'])
  print(f"  of a call's {k['wall_ms_per_step']:.0f} ms (traced), ms with n kernels running at "
        f"once: {k['ms_per_step_with_n_kernels_running']}")
  print('  top kernels:', r['kernels_per_call']['top_kernels_ms_per_step'])
  write_json(args.json_out, {'args': vars(args), **r})
  return r


if __name__ == '__main__':
  main()
