"""The sample command: samples from any checkpoint, on whatever devices are present.

    python -m diverse_cfg.main --stage=sample --checkpoint=DIR/students/beta_0 \
        --prompt=region=german_speaking,meter=3/4,mode=major --num_samples=4 --out_dir=/tmp/samples
    diverse-cfg sample --checkpoint=DIR/pretrain --gamma=3 --prompt=...     (CFG teacher)
    diverse-cfg sample --checkpoint=DIR/students/beta_0 --merge_with=DIR/students/beta_8 \
        --merge_lambda=0.5 --prompt=...                                      (merged on the fly)

--checkpoint is a run directory (DIR/pretrain, DIR/students/beta_X,
DIR/merged/lambda_Y) or its checkpoints/ subdirectory. Everything else comes
from the checkpoint: the model config it was trained with, and the dataset's
vocabularies through its data config (--data_dir when the data moved). The
params are restored straight onto the current mesh (Orbax reads each device's
shard), so a checkpoint saved on a pod slice samples on one CPU and back.

The mesh: the checkpoint's own mesh config if it fits the devices present,
else every device on the fsdp axis (or --mesh=DATA,FSDP,TENSOR). The rows
(prompts x num_samples) are padded to a multiple of data*fsdp and the padding
dropped. Each row's random draws depend on the key and the row's index only,
so the padding does not change the samples.

Writes to --out_dir (default: <checkpoint run dir>/samples), from process 0:
  samples.json   settings, and per sample its readable prompt, tokens (up to
                 and including EOS), log-probability, length, and file names
  tokens.npy     int32 [prompts, num_samples, seq_len] (PAD after EOS)
  p<i>_s<j>.*    each sample through evaluate.renderer: MIDI, audio and piano roll
                 for melodies, a picture of the tokens otherwise
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from diverse_cfg import checkpoints
from diverse_cfg import config_lib
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import measure
from diverse_cfg import merge as merge_lib
from diverse_cfg import model as model_lib
from diverse_cfg import report
from diverse_cfg import sampling
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg import workdir as workdir_lib

log = logging.getLogger('diverse_cfg')


class SampleArgumentError(ValueError):
  """A --prompt or sampling setting is wrong; the message says what is accepted."""


def checkpoint_dir(path: str, workdir: str | None = None) -> str:
  """The Orbax directory of a run directory (or the directory itself if it is one).

  A relative path that does not exist is looked up under workdir.
  """
  found = workdir_lib.find_checkpoints(path, workdir)
  if found is None:
    raise checkpoints.CheckpointError(
        f'no checkpoint directory at {path}: give a run directory such as DIR/pretrain, '
        'DIR/students/beta_0 or DIR/merged/lambda_0.5')
  return found


def parse_mesh(spec: str) -> tuple[int, int, int]:
  try:
    sizes = tuple(int(v) for v in spec.split(','))
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise config_lib.ConfigError(f'--mesh={spec!r}: expected DATA,FSDP,TENSOR, e.g. 1,-1,1')
  return sizes


def sampling_mesh(saved_mesh: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                  spec: str | None = None):
  """(mesh, rules): --mesh, else the checkpoint's mesh if it fits, else all devices on fsdp."""
  mesh_cfg = ml_collections.ConfigDict(saved_mesh.to_dict())
  if spec:
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = parse_mesh(spec)
  else:
    try:
      config_lib.validate_mesh(mesh_cfg, len(devices))
    except config_lib.ConfigError:
      log.info('the checkpoint was saved on mesh data=%d fsdp=%d tensor=%d, which does not '
               'fit %d devices: sampling with fsdp over all of them', mesh_cfg.data,
               mesh_cfg.fsdp, mesh_cfg.tensor, len(devices))
      mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, -1, 1
  return sharding_lib.make_mesh(mesh_cfg, devices), sharding_lib.rules_of(mesh_cfg)


@dataclasses.dataclass
class Model:
  """Params on a mesh, with what it takes to sample and read the tokens."""
  config: ml_collections.ConfigDict  # the checkpoint's (model sizes filled)
  model_cfg: model_lib.ModelConfig
  params: Any
  mesh: jax.sharding.Mesh
  rules: Any
  meta: Any  # data.meta.DatasetMeta
  description: dict[str, Any]

  @property
  def plausibility(self) -> float:
    """The guidance threshold the checkpoint's run used (the default if it predates it)."""
    return float(self.config.get('guidance', {}).get('plausibility',
                                                     sampling.DEFAULT_PLAUSIBILITY))

  @property
  def length_bounds(self) -> sampling.LengthBounds:
    return sampling.data_length_bounds(self.meta.fixed_length)

  @property
  def renderer(self) -> str:
    """How the checkpoint's run shows samples (evaluate.renderer; 'auto' if it predates it)."""
    return str(self.config.get('evaluate', {}).get('renderer', 'auto'))

  @functools.cached_property
  def sampler(self) -> sampling.Sampler:  # one per model: its jitted samplers compile once
    return sampling.Sampler(self.model_cfg, self.model_cfg.seq_len, self.mesh, self.rules)


def load(checkpoint: str, *, merge_with: str | None = None, merge_lambda: float = 0.5,
         devices: Sequence[jax.Device] | None = None, mesh: str | None = None,
         data_dir: str | None = None, workdir: str | None = None) -> Model:
  """Restores a checkpoint (or a LERP of two) onto `devices` (default: all)."""
  if merge_with and not 0.0 <= merge_lambda <= 1.0:
    raise SampleArgumentError(f'--merge_lambda={merge_lambda}: must lie in [0, 1]')
  devices = list(jax.devices() if devices is None else devices)
  ckpt_dir = checkpoint_dir(checkpoint, workdir)
  config = checkpoints.read_config(ckpt_dir)
  if data_dir:
    config.data.data_dir = data_dir
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  jax_mesh, rules = sampling_mesh(config.mesh, devices, mesh)
  params, _ = checkpoints.restore_model_params(ckpt_dir, model_cfg, jax_mesh, rules)
  description = {'checkpoint': os.path.abspath(ckpt_dir),
                 'mesh': {k: int(v) for k, v in jax_mesh.shape.items()}}
  if merge_with:
    other_dir = checkpoint_dir(merge_with, workdir)
    merge_lib.check_same_architecture(config, checkpoints.read_config(other_dir), ckpt_dir,
                                      other_dir)
    other, _ = checkpoints.restore_model_params(other_dir, model_cfg, jax_mesh, rules)
    params = merge_lib.merge_params(params, other, float(merge_lambda))
    description.update(merge_with=os.path.abspath(other_dir), merge_lambda=float(merge_lambda))
  _, meta = experiment_lib.load_data(config)
  experiment_lib.fill_model_sizes(config, meta, checkpoint=os.path.abspath(ckpt_dir))
  return Model(config=config, model_cfg=model_cfg, params=params, mesh=jax_mesh, rules=rules,
               meta=meta, description=description)


def describe_prompts(meta) -> str:
  """'region: [...]; meter: [...]' - what --prompt accepts."""
  return '; '.join(f'{name}: {list(meta.value_names(i))}'
                   for i, name in enumerate(meta.attribute_names))


def parse_prompt(text: str) -> dict[str, str]:
  """'region=german_speaking,meter=3/4,mode=major' -> {'region': 'german_speaking', ...}."""
  values = {}
  for part in text.split(','):
    name, sep, value = part.partition('=')
    name, value = name.strip(), value.strip()
    if not sep or not name or not value:
      raise SampleArgumentError(f'--prompt={text!r}: expected attribute=value pairs separated by '
                                'commas, e.g. --prompt=region=german_speaking,meter=3/4,mode=major')
    if name in values:
      raise SampleArgumentError(f'--prompt={text!r}: attribute {name!r} given twice')
    values[name] = value
  return values


def encode_prompts(meta, texts: Sequence[str]) -> np.ndarray:
  """int32 [P, C] prompt ids; a bad prompt's error lists every attribute's valid values."""
  if not texts:
    raise SampleArgumentError('give at least one --prompt=attribute=value,...; attributes and '
                              f'their values: {describe_prompts(meta)}')
  out = []
  for text in texts:
    values = parse_prompt(text)  # its errors already name the --prompt
    try:
      out.append(meta.encode_prompt(values))
    except ValueError as e:  # DatasetMeta names the bad attribute or value
      raise SampleArgumentError(f'--prompt={text!r}: {e}. All attributes and their values: '
                                f'{describe_prompts(meta)}') from e
  return np.stack(out).astype(np.int32)


def generate(model: Model, prompts_PxC: np.ndarray, num_samples: int, *, gamma: float = 1.0,
             plausibility: float | None = None, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, bounds: sampling.LengthBounds | None = None):
  """(tokens [P, K, T], per-token log-probs [P, K, T]) as numpy on every process.

  gamma != 1 samples with CFG (cond and uncond rows, two forward passes per
  token), guiding the tokens that pass the plausibility threshold (None: the
  checkpoint's guidance.plausibility); gamma = 1 samples the model as it is.
  bounds: the length bounds (None: the data's, see Model.length_bounds).
  """
  if num_samples < 1:
    raise SampleArgumentError(f'--num_samples={num_samples}: must be >= 1')
  prompts_PxC = np.asarray(prompts_PxC, np.int32)
  num_prompts = len(prompts_PxC)
  rows_BxC = np.repeat(prompts_PxC, num_samples, axis=0)  # row p * K + k: sample k of prompt p
  rows = len(rows_BxC)
  shards = sharding_lib.batch_shards(model.mesh)
  padded = -(-rows // shards) * shards
  rows_BxC = np.concatenate([rows_BxC, np.repeat(rows_BxC[-1:], padded - rows, axis=0)])
  sampler = model.sampler
  key = jax.random.key(seed)
  bounds = model.length_bounds if bounds is None else bounds
  if gamma != 1.0:
    alpha = model.plausibility if plausibility is None else plausibility
    tokens, logprobs = sampler.sample_cfg(model.params, rows_BxC, key, gamma=gamma,
                                          plausibility=alpha, temperature=temperature,
                                          top_k=top_k, bounds=bounds)
  else:
    tokens, logprobs = sampler.sample(model.params, rows_BxC, key, temperature=temperature,
                                      top_k=top_k, bounds=bounds)
  shape = (num_prompts, num_samples, -1)
  return (sharding_lib.to_host(tokens)[:rows].reshape(shape),
          sharding_lib.to_host(logprobs)[:rows].reshape(shape))


def write_outputs(meta, prompts_PxC, tokens_PxKxT, logprobs_PxKxT, out_dir: str,
                  settings: dict[str, Any], renderer: str = 'auto') -> str:
  """samples.json, tokens.npy and each sample's files through the renderer (report.py:
  MIDI/WAV/piano roll for melodies, a picture of the tokens otherwise); returns the json path."""
  render = report.resolve_renderer(renderer, meta)
  well_formed = measure.well_formed_check(meta)
  os.makedirs(out_dir, exist_ok=True)
  np.save(os.path.join(out_dir, 'tokens.npy'), np.asarray(tokens_PxKxT, np.int32))
  entries = []
  for p, prompt_C in enumerate(prompts_PxC):
    readable = meta.decode_prompt(prompt_C)
    for k, row_T in enumerate(tokens_PxKxT[p]):
      length = int(np.sum(row_T != specials.PAD))  # events + EOS; PAD only after EOS
      entry = {'prompt': readable, 'prompt_ids': prompt_C.tolist(), 'sample': k,
               'tokens': row_T[:length].tolist(), 'num_tokens': length,
               'ended_with_eos': bool(np.any(row_T == specials.EOS)),
               'log_prob': float(np.sum(logprobs_PxKxT[p, k]))}
      files = render(np.asarray(row_T)[None], meta, os.path.join(out_dir, f'p{p}_s{k}'))
      entry['files'] = {ext: os.path.relpath(path, out_dir) for ext, path in files.items()}
      if well_formed is not None:
        entry['well_formed'] = well_formed(row_T)
      entries.append(entry)
  path = os.path.join(out_dir, 'samples.json')
  with open(path, 'w') as f:
    json.dump({'settings': settings, 'dataset': meta.name, 'samples': entries}, f, indent=1)
  return path


def check_settings(*args) -> None:
  """sampling.check_settings, its ValueError as a SampleArgumentError (one line at the CLI)."""
  try:
    sampling.check_settings(*args)
  except ValueError as e:
    raise SampleArgumentError(str(e)) from e


def run(checkpoint: str, prompts: Sequence[str], *, num_samples: int = 4, gamma: float = 1.0,
        plausibility: float | None = None, temperature: float = 1.0, top_k: int = 0,
        min_length: int | None = None, max_length: int | None = None, seed: int = 0,
        out_dir: str | None = None, merge_with: str | None = None, merge_lambda: float = 0.5,
        mesh: str | None = None, data_dir: str | None = None, workdir: str | None = None,
        devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Loads, samples, writes (process 0); returns {'out_dir', 'tokens', 'logprobs', ...}.

  plausibility None: the checkpoint's; min_length / max_length None: the data's
  bounds (events before EOS; a fixed-length dataset's rows end at its length).
  """
  guidance = sampling.Guidance(gamma, 0.0 if plausibility is None else plausibility)
  check_settings(guidance, temperature, top_k, sampling.LengthBounds())  # before any loading
  model = load(checkpoint, merge_with=merge_with, merge_lambda=merge_lambda, devices=devices,
               mesh=mesh, data_dir=data_dir, workdir=workdir)
  data_bounds = model.length_bounds
  bounds = sampling.LengthBounds(data_bounds.min if min_length is None else min_length,
                                 data_bounds.max if max_length is None else max_length)
  check_settings(guidance, temperature, top_k, bounds, model.sampler.num_new_tokens)
  plausibility = model.plausibility if plausibility is None else plausibility
  prompts_PxC = encode_prompts(model.meta, prompts)
  tokens, logprobs = generate(model, prompts_PxC, num_samples, gamma=gamma,
                              plausibility=plausibility, temperature=temperature, top_k=top_k,
                              seed=seed, bounds=bounds)
  out_dir = out_dir or workdir_lib.samples(workdir_lib.run_dir_of(model.description['checkpoint']))
  settings = {**model.description, 'gamma': gamma, 'guided': gamma != 1.0,
              'plausibility': plausibility, 'temperature': temperature, 'top_k': top_k,
              'min_length': int(bounds.min),
              'max_length': None if bounds.max >= sampling.NO_MAX_LENGTH else int(bounds.max),
              'seed': seed, 'num_samples': num_samples}
  if jax.process_index() == 0:
    path = write_outputs(model.meta, prompts_PxC, tokens, logprobs, out_dir, settings,
                         model.renderer)
    log.info('%d samples for %d prompt(s) written to %s', tokens.shape[0] * tokens.shape[1],
             len(prompts_PxC), path)
  return {'out_dir': out_dir, 'tokens': tokens, 'logprobs': logprobs, 'prompts': prompts_PxC,
          'model': model}
