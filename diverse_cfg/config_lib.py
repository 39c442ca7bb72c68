"""The one schema every config follows, and its validation.

Config files under `configs/` start from `base_config()` and change values;
`validate()` runs before any work starts and names the offending field. A key
that is not in the schema is an error (a typo must not silently do nothing).
"""

from __future__ import annotations

from typing import Any

import ml_collections

FROM_DATA = -1  # model sizes taken from the dataset's metadata


class ConfigError(ValueError):
  """A config value is wrong; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = FROM_DATA  # incl. PAD/BOS/EOS
  m.prompt_vocab_size = FROM_DATA
  m.prompt_len = FROM_DATA  # C condition tokens; 0 = unconditional model
  m.seq_len = FROM_DATA  # T target tokens (events, EOS, PAD)
  m.num_layers = 2
  m.d_model = 64
  m.num_heads = 4
  m.mlp_dim = 256
  m.tie_embeddings = True
  m.prompt_dropout = 0.2  # P(prompt -> learned null prompt) in training
  m.dtype = 'float32'  # activations; parameters stay float32
  m.rope_base = 10_000.0
  m.remat = 'none'  # 'none' | 'full' | 'dots'
  m.scan_layers = False

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = 1
  ms.fsdp = -1  # -1: whatever the devices leave
  ms.tensor = 1
  # Logical axis name -> mesh axes. Order matters (first match wins per dim).
  ms.rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('vocab', 'tensor'),
      ('prompt_vocab', None),
      ('prompt_len', None),
      ('kv', None),
      ('length', None),
      ('cache_len', None),
      ('layers', None),
  )

  c.sampling = s = ml_collections.ConfigDict()
  s.gamma = 3.0  # CFG strength; 1 = no guidance
  s.temperature = 1.0
  s.top_k = 0  # 0 = full distribution
  return c


_DTYPES = ('float32', 'bfloat16')
_REMAT = ('none', 'full', 'dots')


def _check_keys(cfg: Any, ref: Any, path: str) -> None:
  if not isinstance(ref, ml_collections.ConfigDict):
    return
  if not isinstance(cfg, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f'config{path} must be a section, got {cfg!r}')
  unknown = sorted(set(cfg.keys()) - set(ref.keys()))
  if unknown:
    raise ConfigError(
        f'unknown config key(s) {", ".join("config" + path + "." + k for k in unknown)}; '
        f'valid keys in config{path or " (top level)"}: {", ".join(sorted(ref.keys()))}')
  for k in ref.keys():
    if k in cfg:
      _check_keys(cfg[k], ref[k], f'{path}.{k}')


def _require(cond: bool, field: str, msg: str, value: Any) -> None:
  if not cond:
    raise ConfigError(f'config.{field}={value!r}: {msg}')


def validate_model(m: ml_collections.ConfigDict, *, sizes_known: bool = True) -> None:
  if sizes_known:
    for f in ('vocab_size', 'prompt_vocab_size', 'seq_len'):
      _require(m[f] > 0, f'model.{f}', 'must be positive (or set from the dataset)', m[f])
    _require(m.prompt_len >= 0, 'model.prompt_len', 'must be >= 0', m.prompt_len)
  for f in ('num_layers', 'd_model', 'num_heads', 'mlp_dim'):
    _require(m[f] > 0, f'model.{f}', 'must be positive', m[f])
  _require(m.d_model % m.num_heads == 0, 'model.num_heads',
           f'must divide config.model.d_model={m.d_model}', m.num_heads)
  _require((m.d_model // m.num_heads) % 2 == 0, 'model.num_heads',
           'head dim d_model/num_heads must be even for rotary positions', m.num_heads)
  _require(0.0 <= m.prompt_dropout < 1.0, 'model.prompt_dropout', 'must be in [0, 1)',
           m.prompt_dropout)
  _require(m.dtype in _DTYPES, 'model.dtype', f'must be one of {_DTYPES}', m.dtype)
  _require(m.remat in _REMAT, 'model.remat', f'must be one of {_REMAT}', m.remat)


def validate_sampling(s: ml_collections.ConfigDict) -> None:
  _require(s.gamma >= 0, 'sampling.gamma', 'CFG strength must be >= 0', s.gamma)
  _require(s.temperature > 0, 'sampling.temperature', 'must be > 0', s.temperature)
  _require(s.top_k >= 0, 'sampling.top_k', 'must be >= 0 (0 = off)', s.top_k)


def validate_mesh(ms: ml_collections.ConfigDict, num_devices: int) -> None:
  sizes = {a: ms[a] for a in ('data', 'fsdp', 'tensor')}
  for a, n in sizes.items():
    _require(n == -1 or n >= 1, f'mesh.{a}', 'must be >= 1 or -1', n)
  free = [a for a, n in sizes.items() if n == -1]
  _require(len(free) <= 1, f'mesh.{free[-1] if free else "data"}',
           'at most one mesh axis may be -1', -1)
  fixed = 1
  for n in sizes.values():
    fixed *= max(n, 1)
  if free:
    _require(num_devices % fixed == 0, f'mesh.{free[0]}',
             f'cannot fill {num_devices} devices: the other axes take {fixed}', -1)
  else:
    _require(fixed == num_devices, 'mesh',
             f'data*fsdp*tensor = {fixed} does not match the {num_devices} devices present',
             dict(sizes))


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, *,
             sizes_known: bool = True, reference: ml_collections.ConfigDict | None = None) -> None:
  """Raises ConfigError naming the first bad field. Call before any work."""
  _check_keys(cfg, reference if reference is not None else base_config(), '')
  validate_model(cfg.model, sizes_known=sizes_known)
  validate_sampling(cfg.sampling)
  if num_devices is not None:
    validate_mesh(cfg.mesh, num_devices)
