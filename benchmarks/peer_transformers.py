"""Peer benchmark: our CFG sampler vs HuggingFace transformers' `generate(guidance_scale=...)`.

Both sides draw B sequences of N new tokens from a random-init decoder of the
same width, depth, heads, vocabulary and batch, on the CPU, float32:

* ours: `Sampler.sample` (student: B rows, one KV-cached decode step per
  token) and `Sampler.sample_cfg` (CFG teacher: [cond; uncond] = 2B rows
  through ONE forward per token, each row with its own KV cache; the uncond
  rows see the learned null prompt). One jitted XLA program per call.
* peer: transformers' `GPT2LMHeadModel` (CPU build of torch, eager, eval,
  `torch.inference_mode`) with `generate(do_sample=True, top_k=0,
  temperature=1.0)`, without (student) and with `guidance_scale=gamma` (CFG).
  For decoder-only models `guidance_scale != 1` adds
  `UnbatchedClassifierFreeGuidanceLogitsProcessor`
  (transformers/generation/logits_process.py): per step, after the cond
  forward of B rows (own DynamicCache), the processor runs a SECOND forward
  of B rows on the last sampled token with its own cache, and returns
  u + gamma (c - u) on log-softmaxed scores (c cond, u uncond); sampling then
  softmaxes that, i.e. the distribution is softmax(u + gamma (c - u)), the
  same formula as ours. So per token the peer does 2 forwards of B rows where
  we do 1 forward of 2B rows: the same model work, in twice the launches.
  The uncond branch's context is `negative_prompt_ids` if given, else only the
  last prompt token. By default (--peer_uncond=null_prompt) we give it a null
  prompt as long as the real one (C null ids + BOS), so its cache is as long as
  the cond branch's and the work is equal to ours; --peer_uncond=last_token is
  HF's default (C tokens shorter uncond context: slightly less attention work).

Peer model: GPT2Config(n_embd=d_model, n_layer, n_head as ours; n_inner =
1.5 mlp_dim so its 2-matrix GELU MLP has the FLOPs of our 3-matrix gated MLP;
vocab = our padded vocabulary (our tied head computes that many logits);
eos_token_id=None so no row stops early (ours runs all N steps too); the
prompt is C condition tokens + BOS in the input ids). Differences kept:
LayerNorm + biases + learned positions (GPT-2) vs RMSNorm + rotary (ours);
the peer samples over all padded_vocab logits (ours masks PAD, BOS and the padding).
A forward hook counts the peer's forwards and fed rows x tokens per call (a
check that the CFG branch really runs 2N forwards of B rows).

Tokens/s counts the B * N generated tokens per call (uncond rows not counted).
All four programs are timed round-robin (`benchmarks.common.time_interleaved`),
warm-up/compilation excluded, median of --repeats. XLA CPU uses all cores;
torch gets torch.set_num_threads(--torch_threads, default os.cpu_count()).

  python -m benchmarks.peer_transformers --sizes=small,medium --batch=8,32 \
      --json_out=/tmp/peer.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import jax
import numpy as np
import torch
import transformers

from benchmarks.common import csv_list
from benchmarks.common import library_info
from benchmarks.common import load_avg
from benchmarks.common import time_interleaved
from benchmarks.common import write_json
from benchmarks.sampling import PROMPT_LEN, PROMPT_VOCAB, SIZES, VOCAB, setup  # the same models
from diverse_cfg import sampling
from diverse_cfg import specials


def peer_model(cfg, n: int, seed: int = 0) -> transformers.GPT2LMHeadModel:
  torch.manual_seed(seed)
  conf = transformers.GPT2Config(
      vocab_size=cfg.padded_vocab, n_embd=cfg.d_model, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, n_inner=3 * cfg.mlp_dim // 2, n_positions=cfg.prompt_len + 1 + n,
      bos_token_id=specials.BOS, eos_token_id=None, pad_token_id=None)
  return transformers.GPT2LMHeadModel(conf).eval()


def peer_inputs(prompt_BxC: np.ndarray):
  """Input ids [prompt + NUM_SPECIAL, BOS] and the null prompt [NULL]*C + [BOS]."""
  b, c = prompt_BxC.shape
  bos = np.full((b, 1), specials.BOS)
  ids = np.concatenate([prompt_BxC + specials.NUM_SPECIAL, bos], 1)
  null = np.concatenate([np.full((b, c), specials.NUM_SPECIAL + PROMPT_VOCAB), bos], 1)
  return torch.from_numpy(ids).long(), torch.from_numpy(null).long()


def peer_generate(model, ids, n: int, gamma: float | None, null_ids=None):
  kw = {} if gamma is None else {'guidance_scale': gamma}
  if gamma is not None and null_ids is not None:
    kw.update(negative_prompt_ids=null_ids,
              negative_prompt_attention_mask=torch.ones_like(null_ids))
  with torch.inference_mode():
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                          max_new_tokens=n, top_k=0, temperature=1.0, eos_token_id=None,
                          pad_token_id=specials.PAD, **kw)


def count_forwards(model, fn) -> dict:
  """Forwards of the peer's transformer trunk in one call, and rows x tokens fed."""
  stats = {'forwards': 0, 'row_tokens': 0}

  def hook(_, args, kwargs):
    x = kwargs.get('input_ids', args[0] if args else None)
    stats['forwards'] += 1
    stats['row_tokens'] += int(x.numel())

  h = model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
  try:
    fn()
  finally:
    h.remove()
  return stats


def bench(size: str, batch: int, n: int, repeats: int, gamma: float, peer_uncond: str) -> dict:
  cfg, mesh, rules, params, prompt = setup(size, n, batch, num_devices=1)
  sampler = sampling.Sampler(cfg, n, mesh, rules)
  key = jax.random.key(1)
  model = peer_model(cfg, n)
  ids, null = peer_inputs(np.asarray(prompt))
  null = null if peer_uncond == 'null_prompt' else None
  fns = {
      'ours_student': lambda: sampler.sample(params, prompt, key),
      'ours_cfg': lambda: sampler.sample_cfg(params, prompt, key, gamma=gamma),
      'peer_student': lambda: peer_generate(model, ids, n, None),
      'peer_cfg': lambda: peer_generate(model, ids, n, gamma, null),
  }
  out = {'size': size, 'batch': batch, 'new_tokens': n, 'num_layers': cfg.num_layers,
         'd_model': cfg.d_model, 'num_heads': cfg.num_heads, 'mlp_dim': cfg.mlp_dim,
         'vocab_size': cfg.vocab_size, 'padded_vocab': cfg.padded_vocab,
         'ours_params': cfg.num_params(), 'peer_params': sum(p.numel() for p in model.parameters()),
         'peer_n_inner': model.config.n_inner, 'peer_attn': model.config._attn_implementation,
         'peer_uncond': peer_uncond, 'load_before': load_avg()}
  for name in ('peer_student', 'peer_cfg'):  # sanity: exactly N new tokens, forwards per call
    seq = fns[name]()
    assert seq.shape == (batch, ids.shape[1] + n), seq.shape
    out[f'{name}_forwards'] = count_forwards(model, fns[name])
  times = time_interleaved(fns, repeats)
  for name, t in times.items():
    t['tokens_per_s'] = batch * n / t['median_s']
    t['ms_per_step'] = 1e3 * t['median_s'] / n
    out[name] = t
  tps = {k: out[k]['tokens_per_s'] for k in fns}
  out['cfg_ours_over_peer'] = tps['ours_cfg'] / tps['peer_cfg']
  out['student_ours_over_peer'] = tps['ours_student'] / tps['peer_student']
  out['ours_student_over_cfg'] = tps['ours_student'] / tps['ours_cfg']
  out['peer_student_over_cfg'] = tps['peer_student'] / tps['peer_cfg']
  out['load_after'] = load_avg()
  return out


def print_table(rows) -> None:
  head = (f"{'size':>7} {'params':>13} {'B':>3} {'N':>4} | {'ours stud':>9} {'ours CFG':>8} "
          f"{'s/C':>4} | {'peer stud':>9} {'peer CFG':>8} {'s/C':>4} | {'CFG o/p':>7} "
          f"{'stud o/p':>8} | {'load':>4}")
  print(head)
  print('-' * len(head))
  for r in rows:
    load = r['load_before'][0] if r['load_before'] else float('nan')
    print(f"{r['size']:>7} {r['ours_params'] / 1e6:>5.2f}M/{r['peer_params'] / 1e6:>5.2f}M "
          f"{r['batch']:>3} {r['new_tokens']:>4} | {r['ours_student']['tokens_per_s']:>9.0f} "
          f"{r['ours_cfg']['tokens_per_s']:>8.0f} {r['ours_student_over_cfg']:>4.2f} | "
          f"{r['peer_student']['tokens_per_s']:>9.0f} {r['peer_cfg']['tokens_per_s']:>8.0f} "
          f"{r['peer_student_over_cfg']:>4.2f} | {r['cfg_ours_over_peer']:>6.1f}x "
          f"{r['student_ours_over_peer']:>7.1f}x | {load:>4.1f}")
  print('  tokens/s of the B output rows (params: ours/peer). s/C: student/CFG within one\n'
        '  framework; o/p: ours/peer. Peer CFG per token: 2 forwards of B rows (cond, then\n'
        '  uncond in its logits processor); ours: 1 forward of 2B rows.')
  for r in rows:
    ps, pc = r['peer_student_forwards'], r['peer_cfg_forwards']
    print(f"  {r['size']} B={r['batch']}: peer forwards/call student {ps['forwards']} "
          f"({ps['row_tokens']} row-tokens), CFG {pc['forwards']} ({pc['row_tokens']} row-tokens); "
          f"uncond context: {r['peer_uncond']}")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default='small,medium', help=f'comma list of {",".join(SIZES)}')
  p.add_argument('--batch', default='8,32', help='comma list of batch sizes B (default: 8,32)')
  p.add_argument('--seq_len', type=int, default=128, help='new tokens N per sequence (default 128)')
  p.add_argument('--repeats', type=int, default=5, help='timed calls per program (median)')
  p.add_argument('--gamma', type=float, default=3.0, help='CFG strength (both sides)')
  p.add_argument('--peer_uncond', choices=('null_prompt', 'last_token'), default='null_prompt',
                 help="peer's uncond context: a null prompt as long as ours (equal work; default) "
                      "or HF's default, the last prompt token only")
  p.add_argument('--torch_threads', type=int, default=0, help='0: os.cpu_count()')
  p.add_argument('--json_out', default=None, help='write all figures here as JSON')
  args = p.parse_args(argv)
  sizes, batches = csv_list(args.sizes), [int(b) for b in csv_list(args.batch)]
  for s in sizes:
    if s not in SIZES:
      p.error(f'unknown size {s!r}; choose from {", ".join(SIZES)}')
  if jax.default_backend() != 'cpu':
    print(f'WARNING: jax backend is {jax.default_backend()}, the peer runs on the CPU')

  torch.set_num_threads(args.torch_threads or os.cpu_count())
  info = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': platform.machine(), 'processor': platform.processor(),
      'python': sys.version.split()[0], 'nproc': os.cpu_count(),
      'cpus_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'jax_version': jax.__version__, 'jax_backend': jax.default_backend(),
      'jax_device_kind': jax.devices()[0].device_kind, 'xla_flags': os.environ.get('XLA_FLAGS'),
      'torch_version': torch.__version__, 'transformers_version': transformers.__version__,
      'torch_threads': torch.get_num_threads(),
      'torch_interop_threads': torch.get_num_interop_threads(),
      'load_avg_at_start': load_avg(), 'library': library_info(),
      'command': ' '.join(['python', '-m', 'benchmarks.peer_transformers'] + sys.argv[1:]),
  }
  print(f"{info['date']}  {info['machine']}  nproc={info['nproc']}  "
        f"load avg={info['load_avg_at_start']}")
  print(f"jax {info['jax_version']} ({info['jax_backend']}, XLA uses all cores)  torch "
        f"{info['torch_version']} (threads={info['torch_threads']}, interop="
        f"{info['torch_interop_threads']})  transformers {info['transformers_version']}")
  print(f"vocab={VOCAB} prompt_len={PROMPT_LEN} N={args.seq_len} repeats={args.repeats} "
        f"gamma={args.gamma} peer_uncond={args.peer_uncond}; median, warm-up excluded\n",
        flush=True)

  rows = []
  for size in sizes:
    for b in batches:
      r = bench(size, b, args.seq_len, args.repeats, args.gamma, args.peer_uncond)
      rows.append(r)
      print(f"  {size} B={b}: CFG ours/peer = {r['cfg_ours_over_peer']:.1f}x, "
            f"student ours/peer = {r['student_ours_over_peer']:.1f}x", flush=True)
  print('\nOurs (JAX/XLA) vs HF transformers GPT-2 generate (torch, eager), CPU:')
  print_table(rows)
  # The load before the first measurement: later readings include this script's own work.
  start = info['load_avg_at_start']
  if start and start[0] > 0.25 * os.cpu_count():
    print(f'  WARNING: load avg {start[0]:.1f} on {os.cpu_count()} cores before the run: torch\'s '
          'OpenMP threads slow down by 10-100x when a core is taken (try --torch_threads=1); '
          'rerun on a quiet machine')
  info['load_avg_at_end'] = load_avg()
  result = {'machine': info, 'args': vars(args), 'rows': rows}
  write_json(args.json_out, result)
  return result


if __name__ == '__main__':
  main()
