"""Ahead-of-time compilation for a TPU topology: per-chip memory, FLOPs, roofline, collectives.

With libtpu installed (`pip install -e '.[tpu_aot]'`), JAX describes a TPU slice's
devices without any TPU present (`jax.experimental.topologies`) and XLA's TPU
compiler compiles for them. This builds the experiment's mesh from the config on
those devices and compiles, without running anything:

* pretrain   the pretraining step (forward + backward + AdamW), as training.run jits it;
* finetune   the finetuning step: student rollout, teacher scoring, diversity reward, update;
* student    the student sampler (sampling.generate as sampling.Sampler jits it),
             evaluate.num_prompts x k rows;
* cfg        the CFG teacher sampler ([cond; uncond] rows), the same rows.

For each it reports per-chip argument / output / temporary bytes against the
chip's HBM, FLOPs per step, a roofline time and the collectives of the compiled
HLO (count and bytes per step of all-gather, reduce-scatter, all-reduce,
all-to-all, collective-permute). Two corrections make those honest
(BENCHMARKS.md, "Ahead-of-time compilation for TPU pods"):

* XLA's cost_analysis() counts a while loop's body once, so the scanned layer
  loop (and the decode loop) is under-counted by its trip count. FLOPs here are
  counted from the traced program (jaxpr) instead: every dot_general, times the
  length of every scan around it; the raw cost_analysis figure is kept beside it.
* The TPU compiler emits reduce-scatter as a fusion (kind=kCustom) around an
  all-reduce; counting HLO opcodes sees an all-reduce. Such fusions are counted
  as reduce-scatters, and collectives inside loops count once per iteration.

--fit=width|depth|batch searches (bisection, the pretraining step only unless
--programs says otherwise) for the largest model width (d_model, heads of 64,
mlp = 4 x width) at the config's depth, the largest depth at its width, or the
largest batch, whose compiled programs fit the chip's HBM.

  python -m benchmarks.aot --config=configs/essen.py:pod --topology=v5e:8x8 --json_out=/tmp/aot.json
  python -m benchmarks.aot --config=configs/essen.py:pod --topology=v4:2x2x4 --programs=pretrain
  python -m benchmarks.aot --config=configs/essen.py:pod --topology=v5e:8x8 --fit=width
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

# This process only compiles: JAX itself runs on the CPU, and libtpu must not
# take the machine-wide lock that a second compiling process (pytest -n 2) would hit.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
from jax._src import core as jax_core  # jaxprs_in_params: no public equivalent
import ml_collections

from diverse_cfg import config_lib
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import finetune
from diverse_cfg import model as model_lib
from diverse_cfg import pretrain
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import training
from diverse_cfg.data import meta as meta_lib

from benchmarks.common import csv_list
from benchmarks.common import library_info
from benchmarks.common import write_json

GiB = 2 ** 30
PROGRAMS = ('pretrain', 'finetune', 'student', 'cfg')
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


class AotError(ValueError):
  """Bad input for an ahead-of-time check; the message is one line naming the problem."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's figures as its vendor publishes them (HBM in GiB, as the chips hold it)."""
  name: str
  hbm_bytes: int
  peak_bf16: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float | None  # bidirectional bytes/s per chip, all links (None: not published)
  source: str


# Keyed by jax's device_kind. On v4, JAX makes one device of a chip's two TensorCores
# (megacore); the topology below is built the same way, so these are per-chip figures.
CHIPS = {
    'TPU v4': Chip('v4', 32 * GiB, 275e12, 1200e9, None, 'https://cloud.google.com/tpu/docs/v4'),
    'TPU v5 lite': Chip('v5e', 16 * GiB, 197e12, 819e9, 400e9,
                        'https://cloud.google.com/tpu/docs/v5e'),
    'TPU v5': Chip('v5p', 95 * GiB, 459e12, 2765e9, 600e9, 'https://cloud.google.com/tpu/docs/v5p'),
    'TPU v6 lite': Chip('v6e', 32 * GiB, 918e12, 1640e9, 800e9,
                        'https://cloud.google.com/tpu/docs/v6e'),
}
TOPOLOGY_EXAMPLES = 'v5e:8x8 (v5litepod-64), v4:2x2x4 (v4-32), v5p:2x4x4 (v5p-64), v6e:8x8'


# ----------------------------------------------------------------------------- devices


def topology_devices(name: str) -> list[jax.Device]:
  """The compile-only devices of a TPU topology such as 'v5e:8x8', one per chip."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not re.fullmatch(r'v\d+[a-z]*:\d+(x\d+){1,2}', name or ''):
    raise AotError(f'--topology={name!r}: expected VERSION:SHAPE, e.g. {TOPOLOGY_EXAMPLES}')
  try:
    devices = topologies.get_topology_desc(platform='tpu', topology_name=name).devices
    if any(d.core_on_chip for d in devices):  # two devices per chip: ask for JAX's megacore
      devices = topologies.get_topology_desc(platform='tpu', topology_name=name,
                                             chip_config_name='megacore').devices
  except RuntimeError as e:
    if 'not installed' in str(e):
      raise AotError("libtpu is not installed: pip install -e '.[tpu_aot]' (compile-only, no TPU "
                     'needed)') from None
    raise AotError(f'--topology={name!r}: libtpu does not know it ({_first_line(e)}); try '
                   f'{TOPOLOGY_EXAMPLES}') from None
  if devices[0].device_kind not in CHIPS:
    raise AotError(f'--topology={name!r}: no HBM / peak figures for {devices[0].device_kind!r}; '
                   f'known: {", ".join(CHIPS)}')
  return list(devices)


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------- experiment


def dataset_meta(config: ml_collections.ConfigDict) -> meta_lib.DatasetMeta:
  """The dataset's sizes. Essen's come from the builder's constants (no parsing)."""
  if config.data.name == 'essen_folk':
    from diverse_cfg.data import essen  # pylint: disable=g-import-not-at-top
    from diverse_cfg.data import melody  # pylint: disable=g-import-not-at-top
    return meta_lib.DatasetMeta.from_metadata(meta_lib.metadata_dict(
        name=essen.DATASET_NAME, vocab_size=melody.VOCAB_SIZE, seq_len=config.data.seq_len,
        attribute_names=[n for n, _ in essen.ATTRIBUTES],
        attribute_sizes=[len(v) for _, v in essen.ATTRIBUTES], is_melody=True, split_sizes={}))
  return experiment_lib.load_data(config)[1]


def prepare(config: ml_collections.ConfigDict, devices) -> experiment_lib.Experiment:
  """experiment.prepare without the data: validated config, sizes filled, mesh on `devices`."""
  from diverse_cfg.evaluators import stage  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config_lib.validate(config, sizes_known=False)
  meta = dataset_meta(config)
  with config.unlocked():
    experiment_lib.fill_model_sizes(config, meta)
    stage.fill_token_features(config.embedder, 'embedder', meta)
  config_lib.validate(config, num_devices=len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  return experiment_lib.Experiment(config=config, meta=meta, sources={}, mesh=mesh,
                                   rules=sharding.rules_of(config.mesh),
                                   model_cfg=model_lib.ModelConfig.from_config(config.model))


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
  """A jitted function, the abstract (sharded) arguments to lower it with, its model FLOPs."""
  fn: Callable
  args: tuple
  model_flops: float  # the library's own accounting (training.decoder_flops_per_token)
  decode_steps: int = 0  # sequential forward passes over the weights (samplers, rollout)


def _abstract(shape, dtype, sharding_):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _state(exp, tx):
  init = pretrain.init_state_fn(exp.model_cfg, tx)
  state = sharding.abstract_sharded(init, exp.mesh, exp.rules, jax.random.key(0))
  return state, jax.tree.map(lambda a: a.sharding, state)


def pretrain_program(exp) -> Program:
  cfg, t = exp.model_cfg, exp.config.train
  tx, schedule = training.make_optimizer(t)
  state, shardings = _state(exp, tx)
  batch_s, repl = sharding.batch_sharding(exp.mesh, 2), sharding.replicated(exp.mesh)
  batch = {'tokens': _abstract((t.batch_size, cfg.seq_len), jnp.int32, batch_s),
           'prompt': _abstract((t.batch_size, cfg.prompt_len), jnp.int32, batch_s)}
  fn = jax.jit(pretrain.train_step_fn(cfg, tx, schedule, exp.config.seed,
                                      exp.packing(t.batch_size, t)),
               in_shardings=(shardings, batch_s, repl), out_shardings=(shardings, repl),
               donate_argnums=0)
  tokens = t.batch_size * cfg.seq_len
  return Program(fn, (state, batch, _abstract((), jnp.int32, repl)),
                 tokens * training.decoder_flops_per_token(cfg, training=True))


def finetune_program(exp) -> Program:
  """finetune.make_task's step with a random (abstract) embedder of the config's size."""
  from diverse_cfg.evaluators import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  from diverse_cfg.evaluators import encoder  # pylint: disable=g-import-not-at-top
  cfg, f = exp.model_cfg, exp.config.finetune
  tx, schedule = training.make_optimizer(f)
  state, shardings = _state(exp, tx)
  batch_s, repl = sharding.batch_sharding(exp.mesh, 2), sharding.replicated(exp.mesh)
  net = embedder_lib.build_net(exp.config)
  emb_params = jax.tree.map(lambda a: _abstract(a.shape, a.dtype, repl), jax.eval_shape(
      lambda k: encoder.init_fn(net)(k), jax.random.key(0)))
  emb_params = nn.meta.unbox(emb_params)
  frozen = {'teacher': state['params'], 'embedder': emb_params}
  frozen_s = {'teacher': shardings['params'], 'embedder': jax.tree.map(lambda _: repl, emb_params)}
  rows = f.batch_size * f.k
  step = finetune.finetune_step_fn(cfg, f, tx, schedule, float(max(f.betas)), exp.config.seed,
                                   embedder_lib.make_embedder(net, None).apply,
                                   finetune.teacher_guidance(exp.config), exp.length_bounds,
                                   exp.packing(rows, f))
  fn = jax.jit(step, in_shardings=(shardings, batch_s, repl, frozen_s),
               out_shardings=(shardings, repl), donate_argnums=0)
  batch = {'prompt': _abstract((f.batch_size, cfg.prompt_len), jnp.int32, batch_s)}
  return Program(fn, (state, batch, _abstract((), jnp.int32, repl), frozen),
                 finetune.finetune_flops(cfg, rows), decode_steps=cfg.seq_len)


def sampler_program(exp, guided: bool) -> Program:
  """The program sampling.Sampler jits: generate, params and prompts laid out as it does.

  Every setting (gamma, temperature, top-k, ...) is a traced scalar, as the
  Sampler passes them, so nothing is folded in as a constant.
  """
  cfg, e = exp.model_cfg, exp.config.evaluate
  sampler = sampling.Sampler(cfg, cfg.seq_len, exp.mesh, exp.rules)
  batch_s, repl = sharding.batch_sharding(exp.mesh, 2), sharding.replicated(exp.mesh)
  rows = e.num_prompts * e.k
  params = jax.tree.map(lambda a, s: _abstract(a.shape, a.dtype, s),
                        nn.meta.unbox(model_lib.abstract_params(cfg)), sampler.param_shardings)
  prompt = _abstract((rows, cfg.prompt_len), jnp.int32, batch_s)
  key = jax.eval_shape(lambda: jax.random.key(0))
  f32, i32 = _abstract((), jnp.float32, repl), _abstract((), jnp.int32, repl)
  # generate's traced settings after (params, prompt, key): guidance, temperature, top-k, bounds.
  settings = (sampling.Guidance(f32, f32), f32, i32, sampling.LengthBounds(i32, i32))
  fn = jax.jit(functools.partial(sampling.generate, cfg, cfg.seq_len, guided),
               out_shardings=(batch_s, batch_s))
  passes = 2 if guided else 1
  return Program(fn, (params, prompt, _abstract(key.shape, key.dtype, repl), *settings),
                 passes * rows * cfg.seq_len * training.decoder_flops_per_token(cfg, training=False),
                 decode_steps=cfg.seq_len)


BUILDERS = {'pretrain': pretrain_program, 'finetune': finetune_program,
            'student': functools.partial(sampler_program, guided=False),
            'cfg': functools.partial(sampler_program, guided=True)}


def state_bytes(exp, section: str = 'train') -> dict[str, float]:
  """Params + AdamW state per chip, compiled, against the FSDP ideal.

  The ideal is the whole state over the fsdp x tensor chips that split it (the data
  axis replicates it). A program that makes the state from zeros has the same
  output shardings as the real init and compiles in seconds instead of a minute.
  """
  tx, _ = training.make_optimizer(exp.config[section])
  state, shardings = _state(exp, tx)
  total = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(state))
  zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state)
  with sharding.activate(exp.mesh, exp.rules):
    compiled = jax.jit(zeros, out_shardings=shardings).lower().compile()
  per_chip = compiled.memory_analysis().output_size_in_bytes
  ideal = total / (exp.mesh.shape['fsdp'] * exp.mesh.shape['tensor'])
  return {'total': total, 'per_chip': per_chip, 'fsdp_ideal': ideal, 'ratio': per_chip / ideal}


# ----------------------------------------------------------------------------- FLOPs


def dot_flops(jaxpr) -> float:
  """2 x M x N x K of every dot_general, times the length of every scan around it.

  Global (unsharded) FLOPs of the traced program, rematerialised forward passes
  included. Branches of a cond count as the costliest one; a while loop of
  unknown trip count counts once (fori_loops with static bounds are scans).
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      k = math.prod(lhs_shape[d] for d in lhs_contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    elif name == 'scan':
      total += eqn.params['length'] * dot_flops(eqn.params['jaxpr'])
    elif name == 'cond':
      total += max(dot_flops(b) for b in eqn.params['branches'])
    else:  # pjit, remat, custom_jvp/vjp, shard_map: their bodies run once
      for sub in jax_core.jaxprs_in_params(eqn.params):
        total += dot_flops(sub)
  return total


# ----------------------------------------------------------------------------- HLO


_ITEMSIZE = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
             'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
             'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1}
_ARRAY_RE = re.compile(r'\b(' + '|'.join(sorted(_ITEMSIZE, key=len, reverse=True)) +
                       r')\[([0-9,]*)\]')
_COMP_RE = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$')
_INSTR_RE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')


def _array_bytes(type_str: str) -> list[int]:
  """Bytes of every array in an HLO type (one for an array, several for a tuple)."""
  out = []
  for dtype, dims in _ARRAY_RE.findall(type_str):
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    out.append(n * _ITEMSIZE[dtype])
  return out


def _split_type(rest: str) -> tuple[str, str]:
  """'(a, b) opcode(...)' or 'f32[2]{0} opcode(...)' -> (type, 'opcode(...)...')."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(' ')
  return head, tail


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str]:
  """{computation: [(instruction, type, opcode, attributes)]}, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    m = _COMP_RE.match(line)
    if m and not line.startswith(' '):
      current = m.group(1)
      comps[current] = []
      if line.startswith('ENTRY'):
        entry = current
      continue
    if line.startswith('}'):
      current = None
      continue
    m = _INSTR_RE.match(line)
    if current is None or not m:
      continue
    type_str, rest = _split_type(m.group(2))
    opcode, _, attrs = rest.partition('(')
    comps[current].append((m.group(1), type_str, opcode.strip(), attrs))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return comps, entry


def _trip_count(comps, cond: str) -> int | None:
  """N of a loop condition `counter < N` (a constant), the form scans compile to."""
  consts = {}
  for name, type_str, opcode, attrs in comps.get(cond, ()):
    if opcode == 'constant':
      m = re.match(r'\s*(-?\d+)\)', attrs)
      if m:
        consts[name] = int(m.group(1))
  for name, type_str, opcode, attrs in comps.get(cond, ()):
    if opcode == 'compare' and 'direction=LT' in attrs:
      operands = re.findall(r'%([\w.\-]+)', attrs.split(')')[0])
      if len(operands) == 2 and operands[1] in consts:
        return consts[operands[1]]
  return None


def _group_size(attrs: str) -> int | None:
  """Devices per group of a collective, from its replica_groups in any of XLA's spellings."""
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)
  if m:
    sizes = dict((k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r'replica_groups=\{\{([0-9,]*)\}', attrs)
  if m:
    return len(m.group(1).split(','))
  return None


def collectives(text: str) -> dict[str, Any]:
  """Collectives of a compiled (optimised, per-device) HLO module, per kind.

  count: in the program text; per_step: executed per call (loop bodies times
  their trip count); bytes_per_step: the full buffer each executes on (an
  all-gather's result, a reduce-scatter's input, an all-reduce's operand),
  summed likewise; groups: per_step by the number of devices per group.
  """
  comps, entry = parse_hlo(text)
  out = {k: {'count': 0, 'per_step': 0, 'bytes_per_step': 0, 'groups': {}} for k in COLLECTIVES}
  unknown_loops = []

  def add(kind, nbytes, times, attrs):
    rec = out[kind]
    rec['count'] += 1
    rec['per_step'] += times
    rec['bytes_per_step'] += nbytes * times
    g = str(_group_size(attrs))
    rec['groups'][g] = rec['groups'].get(g, 0) + times

  def walk(comp: str, times: int, stack=()):
    if comp in stack:  # HLO has no recursion; guard anyway
      return
    for _, type_str, opcode, attrs in comps.get(comp, ()):
      called = dict(re.findall(r'\b(body|condition|calls|to_apply)=%?([\w.\-]+)', attrs))
      base = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
      sizes = _array_bytes(type_str)
      if base in COLLECTIVES:
        if base == 'all-gather':  # -start: (operand, result)
          nbytes = sizes[-1] if opcode.endswith('-start') else sum(sizes)
        elif base == 'collective-permute':
          nbytes = sizes[0] if sizes else 0
        elif base == 'reduce-scatter':
          nbytes = sum(_array_bytes(attrs.split('),')[0]))
        else:
          nbytes = sum(sizes) // (2 if opcode.endswith('-start') and base == 'all-to-all' else 1)
        add(base, nbytes, times, attrs)
      elif opcode == 'fusion' and 'calls' in called and 'reduce-scatter' in called['calls']:
        # The TPU compiler's reduce-scatter: a custom fusion around an all-reduce whose
        # operand is the full (unscattered) buffer.
        inner = [a for _, t, o, a in comps.get(called['calls'], ()) if o.startswith('all-reduce')]
        full = sum(sum(_array_bytes(t)) for _, t, o, _ in comps.get(called['calls'], ())
                   if o == 'parameter')
        add('reduce-scatter', full, times, inner[0] if inner else attrs)
      elif opcode == 'while':
        trips = _trip_count(comps, called.get('condition', ''))
        if trips is None:
          unknown_loops.append(called.get('body'))
        walk(called['body'], times * (trips or 1), stack + (comp,))
      elif opcode == 'conditional':
        for b in re.findall(r'%([\w.\-]+)', attrs.split('branch_computations=')[-1].split('}')[0]
                            if 'branch_computations' in attrs else ''):
          walk(b, times, stack + (comp,))
        for key in ('true_computation', 'false_computation'):
          m = re.search(key + r'=%?([\w.\-]+)', attrs)
          if m:
            walk(m.group(1), times, stack + (comp,))
      elif 'calls' in called and opcode in ('call', 'fusion', 'async-start'):
        walk(called['calls'], times, stack + (comp,))
      elif 'to_apply' in called and opcode == 'call':
        walk(called['to_apply'], times, stack + (comp,))

  walk(entry, 1)
  return {'by_kind': out, 'loops_of_unknown_trip_count': len(unknown_loops)}


# ----------------------------------------------------------------------------- analysis


def compile_program(exp, program: Program):
  """(traced, compiled, optimised HLO text) of a program, compiled for the mesh's devices.

  The HLO is the compiler's own dump: jaxlib cannot always read back the module of a
  newer libtpu (on v5p, libtpu 0.0.52's async-update instructions fail jaxlib 0.10.2's
  check), while the text libtpu writes needs no round trip.
  """
  with tempfile.TemporaryDirectory() as dump, sharding.activate(exp.mesh, exp.rules):
    traced = program.fn.trace(*program.args)
    compiled = traced.lower().compile(
        {'xla_dump_to': dump, 'xla_dump_hlo_as_text': True})
    dumps = sorted(glob.glob(os.path.join(dump, '*after_optimizations.txt')), key=os.path.getsize)
    if dumps:
      with open(dumps[-1]) as fh:
        text = fh.read()
    else:
      text = compiled.as_text()
  return traced, compiled, text


def _fit_error(name: str, chip: Chip, e: Exception) -> AotError | None:
  """XLA's TPU compiler refuses a program that cannot fit: one line naming it, or None."""
  if 'RESOURCE_EXHAUSTED' in str(e) or 'Ran out of memory' in str(e):
    return AotError(f'{name}: does not fit in {chip.name} HBM ({chip.hbm_bytes / GiB:.0f} GiB per '
                    f'chip): {_first_line(e)}')
  return None


def analyse(exp, name: str, program: Program, chip: Chip) -> dict[str, Any]:
  """Compiles one program and measures it; raises AotError if XLA finds it does not fit."""
  start = time.perf_counter()
  try:
    traced, compiled, hlo_text = compile_program(exp, program)
  except Exception as e:  # pylint: disable=broad-except
    error = _fit_error(name, chip, e)
    if error is None:
      raise
    raise error from None
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  chips = exp.mesh.devices.size
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
          mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = dot_flops(traced.jaxpr) / chips
  # A lower bound on HBM traffic: state read and written once, and every decode step
  # multiplies by the layers' matrices in the compute dtype, gathered over fsdp (only the
  # tensor axis splits them). Attention over the KV cache and activations add to it.
  cfg = exp.model_cfg
  weight_bytes = cfg.num_params() * jnp.dtype(cfg.dtype).itemsize / exp.mesh.shape['tensor']
  hbm_floor = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
               program.decode_steps * weight_bytes)
  hlo = collectives(hlo_text)
  terms = {'compute': flops / chip.peak_bf16, 'HBM': hbm_floor / chip.hbm_bandwidth}
  if chip.ici_bandwidth:
    # A ring collective over g chips moves (g - 1) / g of its buffer through each chip,
    # here at half the chip's bidirectional ICI bandwidth (one direction of every link).
    moved = sum(c['bytes_per_step'] / c['per_step'] * sum(
        n * (1 - 1 / int(g)) for g, n in c['groups'].items() if g != 'None')
                for c in hlo['by_kind'].values() if c['per_step'])
    terms['ICI'] = moved / (chip.ici_bandwidth / 2)
  bound = max(terms, key=terms.get)
  return {
      'compile_s': round(seconds, 1),
      'bytes_per_chip': {'arguments': mem.argument_size_in_bytes,
                         'outputs': mem.output_size_in_bytes,
                         'aliased': mem.alias_size_in_bytes, 'temp': mem.temp_size_in_bytes,
                         'code': mem.generated_code_size_in_bytes, 'peak': peak},
      'hbm_fraction': peak / chip.hbm_bytes,
      'flops_per_chip': flops,
      'flops_per_chip_model': program.model_flops / chips,
      'flops_per_chip_xla_cost_analysis': float(cost.get('flops', 0.0)),
      'roofline_s': terms[bound], 'bound': bound,
      'roofline_terms_s': terms,
      'collectives': hlo['by_kind'],
      'loops_of_unknown_trip_count': hlo['loops_of_unknown_trip_count'],
  }


def check(config, topology: str, programs=PROGRAMS, log=print) -> dict[str, Any]:
  """Compiles `programs` of `config` for `topology`; the report as a dict."""
  devices = topology_devices(topology)
  chip = CHIPS[devices[0].device_kind]
  exp = prepare(config, devices)
  cfg = exp.model_cfg
  report = {
      'topology': topology, 'chip': dataclasses.asdict(chip), 'chips': len(devices),
      'mesh': dict(exp.mesh.shape), 'params': cfg.num_params(),
      'model': {k: getattr(cfg, k) for k in ('num_layers', 'd_model', 'num_heads', 'mlp_dim',
                                             'vocab_size', 'prompt_len', 'seq_len', 'dtype',
                                             'remat', 'scan_layers')},
      'batch': {'pretrain': exp.config.train.batch_size,
                'finetune_rows': exp.config.finetune.batch_size * exp.config.finetune.k,
                'sampler_rows': exp.config.evaluate.num_prompts * exp.config.evaluate.k},
      'programs': {}}
  try:
    report['state'] = state_bytes(exp)
  except Exception as e:  # pylint: disable=broad-except
    error = _fit_error('params + optimiser state', chip, e)
    if error is None:
      raise
    raise error from None
  for name in programs:
    log(f'compiling {name} for {topology} (mesh {dict(exp.mesh.shape)}) ...')
    report['programs'][name] = analyse(exp, name, BUILDERS[name](exp), chip)
  report['fits'] = all(p['hbm_fraction'] <= 1.0 for p in report['programs'].values())
  return report


# ----------------------------------------------------------------------------- fit search


def scaled(config, fit: str, value: int) -> ml_collections.ConfigDict:
  """The config with its width (heads of 64, mlp 4x), depth or batch set to `value`."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    if fit == 'width':
      head_dim = c.model.d_model // c.model.num_heads
      c.model.d_model, c.model.num_heads, c.model.mlp_dim = value, value // head_dim, 4 * value
    elif fit == 'depth':
      c.model.num_layers = value
    else:
      c.train.batch_size = value
  return c


def fit_search(config, topology: str, fit: str, programs=('pretrain',), log=print):
  """Bisection for the largest width / depth / batch whose programs fit the chip's HBM.

  Steps: width in multiples of 256 (4 heads of 64), depth by 1, batch in multiples of
  the data x fsdp size. Returns (largest fitting value or None, its report, trials).
  """
  devices = topology_devices(topology)
  exp0 = prepare(config, devices)
  shards = sharding.batch_shards(exp0.mesh)
  unit = {'width': 256, 'depth': 1, 'batch': shards}[fit]
  start = {'width': exp0.model_cfg.d_model, 'depth': exp0.model_cfg.num_layers,
           'batch': exp0.config.train.batch_size}[fit] // unit
  trials = []

  def fits(k: int):
    try:
      rep = check(scaled(config, fit, k * unit), topology, programs, log=lambda *_: None)
    except AotError as e:
      log(f'  {fit}={k * unit}: does not fit ({e})')
      trials.append({fit: k * unit, 'fits': False, 'error': str(e)})
      return None
    peak = max(p['bytes_per_chip']['peak'] for p in rep['programs'].values())
    log(f'  {fit}={k * unit}: {rep["params"] / 1e6:.0f}M params, peak {peak / GiB:.2f} GiB '
        f'per chip: {"fits" if rep["fits"] else "does not fit"}')
    trials.append({fit: k * unit, 'params': rep['params'], 'peak_bytes': peak,
                   'fits': rep['fits']})
    return rep if rep['fits'] else None

  lo, best = 0, None
  hi = max(start, 1)
  while True:  # grow until a size does not fit
    rep = fits(hi)
    if rep is None:
      break
    lo, best, hi = hi, rep, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    rep = fits(mid)
    if rep is None:
      hi = mid
    else:
      lo, best = mid, rep
  return (lo * unit if best else None), best, trials


# ----------------------------------------------------------------------------- printing


def _gib(n: float) -> str:
  return f'{n / GiB:.2f}'


def print_report(rep: dict[str, Any]) -> None:
  chip = rep['chip']
  print(f"\n{rep['topology']}: {rep['chips']} x {chip['name']} ({chip['hbm_bytes'] / GiB:.0f} GiB "
        f"HBM, {chip['peak_bf16'] / 1e12:.0f} TFLOP/s bf16 per chip; {chip['source']}), mesh "
        f"{rep['mesh']}, {rep['params'] / 1e6:.1f}M params")
  st = rep['state']
  print(f"params + AdamW state: {_gib(st['total'])} GiB in all, {_gib(st['per_chip'])} GiB per chip "
        f"= {st['ratio']:.4f} x the FSDP ideal (all / (fsdp x tensor))")
  head = (f"{'program':>9} | {'args':>6} {'outs':>6} {'temp':>6} {'peak':>6} GiB {'of HBM':>6} | "
          f"{'TFLOP/chip':>10} {'model':>7} {'XLA raw':>7} | {'roofline':>9} {'bound':>7} | "
          f"{'compile':>7}")
  print(head)
  print('-' * len(head))
  for name, p in rep['programs'].items():
    b = p['bytes_per_chip']
    print(f"{name:>9} | {_gib(b['arguments']):>6} {_gib(b['outputs']):>6} {_gib(b['temp']):>6} "
          f"{_gib(b['peak']):>6}     {p['hbm_fraction']:>6.1%} | {p['flops_per_chip'] / 1e12:>10.3f} "
          f"{p['flops_per_chip_model'] / 1e12:>7.3f} {p['flops_per_chip_xla_cost_analysis'] / 1e12:>7.3f}"
          f" | {p['roofline_s'] * 1e3:>6.1f} ms {p['bound']:>7} | {p['compile_s']:>6.1f}s")
  print('\nroofline terms (ms): FLOPs at the bf16 peak; HBM floor (state in and out, weights '
        'per decode step); ICI (collective bytes at half the bidirectional bandwidth):')
  for name, p in rep['programs'].items():
    print(f'{name:>9}: ' + ', '.join(f'{k} {v * 1e3:.1f}' for k, v in p['roofline_terms_s'].items()))
  print('\ncollectives per step (count in the HLO / executed per step, GiB per step, '
        'per-step count by devices per group):')
  for name, p in rep['programs'].items():
    parts = []
    for kind, c in p['collectives'].items():
      if c['count']:
        groups = ' '.join(f'{g}:{n}' for g, n in sorted(c['groups'].items()))
        parts.append(f"{kind} {c['count']}/{c['per_step']} {_gib(c['bytes_per_step'])} [{groups}]")
    print(f"{name:>9}: " + ('; '.join(parts) or 'none'))


# ----------------------------------------------------------------------------- main


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise AotError(f'unexpected arguments {argv[1:]}')
  programs = csv_list(f.programs) or (['pretrain'] if f.fit else list(PROGRAMS))
  unknown = sorted(set(programs) - set(PROGRAMS))
  if unknown:
    raise AotError(f'--programs: unknown {unknown}; choose from {",".join(PROGRAMS)}')
  if f.config is None:
    raise AotError('--config is required, e.g. --config=configs/essen.py:pod')
  result = {'command': ' '.join(['python -m benchmarks.aot'] + sys.argv[1:]),
            'jax_version': jax.__version__, 'library': library_info()}
  try:
    import libtpu  # pylint: disable=g-import-not-at-top
    result['libtpu'] = getattr(libtpu, '__version__', None)
  except ImportError:
    result['libtpu'] = None
  if f.fit:
    value, best, trials = fit_search(f.config, f.topology, f.fit, programs)
    result.update({'fit': f.fit, 'largest': value, 'trials': trials, 'report': best})
    if best:
      print_report(best)
      rows = best['batch']['pretrain'] // (best['mesh']['data'] * best['mesh']['fsdp'])
      print(f"\nlargest {f.fit} that fits: {value} ({best['model']['d_model']} wide x "
            f"{best['model']['num_layers']} deep, {best['params'] / 1e6:.0f}M params, "
            f"{rows} rows per data x fsdp shard)")
    else:
      print(f'\nnothing fits: even {f.fit}={trials[0][f.fit]} does not')
  else:
    rep = check(f.config, f.topology, programs)
    result.update(rep)
    print_report(rep)
  write_json(f.json_out, result)


def run():
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file[:preset], e.g. configs/essen.py:pod.',
                                  lock_config=False)
  flags.DEFINE_string('topology', 'v5e:8x8', f'TPU topology, e.g. {TOPOLOGY_EXAMPLES}.')
  flags.DEFINE_string('programs', '', f'comma list of {",".join(PROGRAMS)} (default: all; '
                      'with --fit: pretrain).')
  flags.DEFINE_enum('fit', None, ['width', 'depth', 'batch'],
                    'search the largest width / depth / batch that fits the HBM.')
  flags.DEFINE_string('json_out', None, 'write the report here as JSON.')

  def guarded(argv):
    try:
      main(argv)
    except (AotError, config_lib.ConfigError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(guarded)


if __name__ == '__main__':
  run()
