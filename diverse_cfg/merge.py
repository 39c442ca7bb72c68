"""Weight interpolation of two students: theta = (1 - lambda) theta_q + lambda theta_d.

Both students start from the same base model, so their weights interpolate
(DESIGN.md 1.3); lambda slides from quality (0) to diversity (1) at no
inference cost.

    python -m diverse_cfg.main --stage=merge --config=configs/essen.py:cpu --workdir=DIR
writes DIR/merged/lambda_<l> for every lambda in evaluate.lambdas, merging the
students of the smallest and the largest finetune.betas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diverse_cfg import checkpoints
from diverse_cfg import experiment as experiment_lib
from diverse_cfg import model as model_lib
from diverse_cfg import workdir as workdir_lib


class ArchitectureMismatch(ValueError):
  """The two checkpoints cannot be interpolated."""


def check_same_architecture(cfg_a, cfg_b, name_a: str = 'a', name_b: str = 'b') -> None:
  a, b = model_lib.ModelConfig.from_config(cfg_a.model), model_lib.ModelConfig.from_config(cfg_b.model)
  if a != b:
    raise ArchitectureMismatch(f'cannot merge {name_a} and {name_b}: different architectures '
                               f'(field: ({name_a}, {name_b})) {a.differences(b)}')


def merge_params(params_a, params_b, lam: float):
  """(1 - lam) a + lam b, leaf by leaf; lam = 0 and 1 return the endpoints exactly."""
  sa, sb = jax.tree.structure(params_a), jax.tree.structure(params_b)
  if sa != sb:
    raise ArchitectureMismatch(f'cannot merge parameter trees of different structure: {sa} vs {sb}')
  def lerp(a, b):
    if a.shape != b.shape:
      raise ArchitectureMismatch(f'cannot merge parameters of shapes {a.shape} and {b.shape}')
    if lam == 0.0:
      return a
    if lam == 1.0:
      return b
    return ((1.0 - lam) * a.astype(jnp.float32) + lam * b.astype(jnp.float32)).astype(a.dtype)
  return jax.tree.map(lerp, params_a, params_b)


def load_students(exp: experiment_lib.Experiment, workdir: workdir_lib.WorkDir):
  """(quality student params, diversity student params, their betas)."""
  betas = sorted(float(b) for b in exp.config.finetune.betas)
  lo, hi = betas[0], betas[-1]
  dirs = [workdir_lib.checkpoints(workdir.student(b)) for b in (lo, hi)]
  check_same_architecture(checkpoints.read_config(dirs[0]), checkpoints.read_config(dirs[1]),
                          dirs[0], dirs[1])
  pq, pd = (checkpoints.restore_model_params(d, exp.model_cfg, exp.mesh, exp.rules)[0]
            for d in dirs)
  return pq, pd, (lo, hi)


def run(config, workdir: workdir_lib.WorkDir | str, devices=None) -> list[str]:
  """Writes one merged checkpoint (params + config) per lambda; returns their dirs."""
  wd = workdir_lib.of(workdir)
  exp = experiment_lib.prepare(config, devices)
  pq, pd, _ = load_students(exp, wd)
  out = []
  for lam in exp.config.evaluate.lambdas:
    path = wd.merged(lam)
    ckpt = checkpoints.Checkpointer(workdir_lib.checkpoints(path), keep=1)
    if ckpt.latest_step() is None:
      ckpt.save(0, {'params': merge_params(pq, pd, float(lam))}, exp.config,
                extra={'task': 'merge', 'lambda': float(lam)}, force=True)
    ckpt.close()
    out.append(path)
  return out
