"""Training throughput, MFU and parameter memory: pretraining step and finetuning step.

For a model size, on whatever devices are present (one mesh over all of them):
* the matmul peak of one device, measured (a jitted square matmul), the
  denominator of MFU;
* the pretraining step (forward + backward + AdamW): step time, tokens/s, MFU;
* the finetuning step, whole and in its parts, MaxText-style accounting:
  rollout (student sampling with the KV cache, 1 forward per token), the
  teacher's scoring pass ([cond; uncond] rows: 2 forwards per token), the
  student's forward + backward (3 forwards per token); MFU of each; with a
  compute dtype below float32, also the rollout with its weights cast at every
  decode step (model.decode_params switched off), the A/B of that fix;
* --parts picks what to time (default: all);
* with --breakdown, the pretraining step's kernel time by kind (matmul
  fusions, layout copies / transposes, other fusions) and its top kernels,
  from a jax.profiler trace: time per step, summed over XLA's CPU threads
  (on a GPU, the trace's 'XLA Ops' line; not yet run on one);
* memory (with --fsdp_devices=N and N fake CPU devices, or N real ones):
  per-device bytes of params + optimiser state from the compiled init's
  memory analysis, against the ideal total / N.

Synthetic batches (random tokens with an EOS near the end) keep data loading
out of the figures. Compilation is excluded, every timed call ends with
block_until_ready, the median of --repeats is reported.

  python -m benchmarks.train_step --size=cpu --json_out=/tmp/train.json
  python -m benchmarks.train_step --size=cpu --breakdown
  python -m benchmarks.train_step --size=gpu_large --parts=pretrain,rollout,whole_step
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.train_step \
      --size=cpu --memory_only --fsdp_devices=8
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diverse_cfg import config_lib
from diverse_cfg import finetune
from diverse_cfg import model as model_lib
from diverse_cfg import pretrain
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials
from diverse_cfg import training

from benchmarks.common import csv_list
from benchmarks.common import kernel_breakdown
from benchmarks.common import matmul_peak
from benchmarks.common import timed

# name -> (layers, d_model, heads, mlp, vocab, seq_len, pretrain batch, finetune prompts, k, dtype)
SIZES = {
    'cpu': (4, 128, 4, 384, 885, 128, 32, 8, 4, 'float32'),  # configs/essen.py:cpu
    'gpu_medium': (12, 768, 12, 3072, 885, 128, 128, 32, 4, 'bfloat16'),
    'gpu_large': (24, 1024, 16, 4096, 885, 128, 64, 16, 4, 'bfloat16'),
}


def setup(size: str, fsdp_devices: int | None):
  layers, d, heads, mlp, vocab, seq, batch, prompts, k, dtype = SIZES[size]
  cfg = model_lib.ModelConfig(vocab_size=vocab, prompt_vocab_size=18, prompt_len=3, seq_len=seq,
                              num_layers=layers, d_model=d, num_heads=heads, mlp_dim=mlp,
                              dtype=dtype, remat='none')
  c = config_lib.base_config()
  devices = jax.devices()[:fsdp_devices] if fsdp_devices else jax.devices()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, len(devices), 1
  mesh = sharding.make_mesh(c.mesh, devices)
  return cfg, c, mesh, sharding.rules_of(c.mesh), batch, prompts, k


def synthetic(cfg, rows, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(specials.NUM_SPECIAL, cfg.vocab_size, (rows, cfg.seq_len))
  tokens[:, -4] = specials.EOS
  tokens[:, -3:] = specials.PAD
  prompt = rng.integers(0, cfg.prompt_vocab_size, (rows, cfg.prompt_len))
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(prompt, jnp.int32)


def memory_report(cfg, c, mesh, rules):
  tx, _ = training.make_optimizer(c.train)
  init = pretrain.init_state_fn(cfg, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_shardings(abstract, mesh, rules)
  total = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  with sharding.activate(mesh, rules):
    compiled = jax.jit(lambda key: nn.meta.unbox(init(key)),
                       out_shardings=shardings).lower(jax.random.key(0)).compile()
  per_device = compiled.memory_analysis().output_size_in_bytes
  n = mesh.devices.size
  return {'devices': n, 'state_bytes_total': int(total), 'state_bytes_per_device': int(per_device),
          'ideal_per_device': int(total / n), 'ratio_to_ideal': per_device / (total / n)}


PARTS = ('pretrain', 'rollout', 'teacher_scoring', 'student_fwd_bwd', 'whole_step')


def bench(size: str, repeats: int, fsdp_devices: int | None, memory_only: bool,
          breakdown: bool = False, parts_wanted=PARTS):
  cfg, c, mesh, rules, batch, prompts, k = setup(size, fsdp_devices)
  out = {'size': size, 'device': jax.devices()[0].device_kind, 'num_devices': mesh.devices.size,
         'params': cfg.num_params(), 'memory': memory_report(cfg, c, mesh, rules)}
  if memory_only:
    return out
  peak = matmul_peak(cfg.jnp_dtype)
  out['matmul_peak_flops_per_device'] = peak
  print(f'{size} ({cfg.num_params() / 1e6:.1f}M params) on {out["device"]}: '
        f'matmul peak {peak / 1e12:.1f} TFLOP/s', flush=True)
  n_dev = mesh.devices.size
  flops_tok_fwd = training.decoder_flops_per_token(cfg, training=False)

  tx, schedule = training.make_optimizer(c.train)
  state, shardings = sharding.create_sharded(pretrain.init_state_fn(cfg, tx), mesh, rules,
                                             jax.random.key(0))
  batch_s = sharding.batch_sharding(mesh, 2)
  if 'pretrain' in parts_wanted:
    tokens, prompt = synthetic(cfg, batch)
    data = {'tokens': jax.device_put(tokens, batch_s), 'prompt': jax.device_put(prompt, batch_s)}
    with sharding.activate(mesh, rules):
      step = jax.jit(pretrain.train_step_fn(cfg, tx, schedule, 0), donate_argnums=0)
      compiled_step = lambda s: step(s, data, jnp.int32(0))
      state, m = compiled_step(state)  # compile + warm up (the old state is donated)
      jax.block_until_ready(m)
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = compiled_step(state)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    toks = batch * cfg.seq_len
    out['pretrain'] = {'batch': batch, 'step_s': t, 'tokens_per_s': toks / t,
                       'mfu': 3 * flops_tok_fwd * toks / t / (peak * n_dev)}
    print(f'pretrain: {t * 1e3:.2f} ms, MFU {out["pretrain"]["mfu"]:.3f}', flush=True)
    if breakdown:
      def run_step():
        nonlocal state
        with sharding.activate(mesh, rules):
          state, metrics = compiled_step(state)
        return metrics
      out['pretrain']['kernels'] = kernel_breakdown(run_step, repeats)

  # Finetuning, whole step and parts. The teacher and student share the base params here.
  rows = prompts * k
  f = c.finetune
  f.k = k
  params = state['params']
  ft_tokens, ft_prompt = synthetic(cfg, rows, seed=1)
  ft_tokens, ft_prompt = jax.device_put(ft_tokens, batch_s), jax.device_put(ft_prompt, batch_s)
  embed = lambda _, t: jax.nn.one_hot(t[:, 0], 8)  # negligible-cost stand-in embedder
  parts = {}
  with sharding.activate(mesh, rules):
    if 'rollout' in parts_wanted:
      def time_rollout(name, early_exit=True):  # a fresh jit, traced inside timed()
        rollout = jax.jit(functools.partial(sampling.generate, cfg, cfg.seq_len, False,
                                            early_exit=early_exit))
        return timed(lambda: rollout(params, ft_prompt, jax.random.key(0), sampling.Guidance(),
                                     1.0, 0, sampling.LengthBounds()),
                     repeats=repeats, name=name)
      parts['rollout'] = (time_rollout('rollout'), 1)
      # A/B: the fixed-length scan (random weights rarely end a row, so both run ~all steps:
      # this isolates the while-loop's own cost).
      parts['rollout_fixed_scan'] = (time_rollout('rollout_fixed_scan', early_exit=False), 1)
      if cfg.dtype != 'float32':
        # A/B: the decode loop as it was before model.decode_params cast the matrices once.
        with mock.patch.object(model_lib, 'decode_params', lambda c, p: (c, p)):
          parts['rollout_cast_per_step'] = (time_rollout('rollout_cast_per_step'), 1)
    if 'teacher_scoring' in parts_wanted:
      score = jax.jit(functools.partial(sampling.score, cfg))
      guidance = finetune.teacher_guidance(c)
      parts['teacher_scoring'] = (timed(lambda: score(params, ft_tokens, ft_prompt, guidance),
                                        repeats=repeats, name='teacher_scoring'), 2)
    if 'student_fwd_bwd' in parts_wanted:
      loss = lambda p: jnp.mean(pretrain.lm_loss(cfg, p, ft_tokens, ft_prompt,
                                                 jnp.zeros(rows, bool))[0])
      grad = jax.jit(jax.value_and_grad(loss))
      parts['student_fwd_bwd'] = (timed(lambda: grad(params), repeats=repeats,
                                           name='student_fwd_bwd'), 3)
    if 'whole_step' in parts_wanted:
      ft_state = {'params': params, 'opt_state': state['opt_state']}
      ft_step = jax.jit(finetune.finetune_step_fn(cfg, f, tx, schedule, 8.0, 0, embed,
                                                  finetune.teacher_guidance(c)))
      frozen = {'teacher': params, 'embedder': {}}
      batch_p = {'prompt': ft_prompt[::k]}
      parts['whole_step'] = (timed(lambda: ft_step(ft_state, batch_p, jnp.int32(0), frozen),
                                   repeats=repeats, name='whole_step'), 6)
  toks = rows * cfg.seq_len
  out['finetune'] = {'prompts': prompts, 'k': k}
  for name, (secs, passes) in parts.items():
    out['finetune'][name] = {'s': secs, 'tokens_per_s': toks / secs,
                             'mfu': passes * flops_tok_fwd * toks / secs / (peak * n_dev)}
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--size', default='cpu', choices=sorted(SIZES))
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--fsdp_devices', type=int, default=None)
  ap.add_argument('--memory_only', action='store_true')
  ap.add_argument('--breakdown', action='store_true',
                  help="profile the pretraining step: kernel time by kind, top kernels")
  ap.add_argument('--parts', default=','.join(PARTS),
                  help=f'comma list of what to time, of {",".join(PARTS)} (default: all)')
  ap.add_argument('--json_out', default=None)
  args = ap.parse_args()
  parts = csv_list(args.parts)
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    ap.error(f'--parts: unknown {unknown}; choose from {",".join(PARTS)}')
  result = bench(args.size, args.repeats, args.fsdp_devices, args.memory_only, args.breakdown,
                 parts)
  print(json.dumps(result, indent=1))
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
