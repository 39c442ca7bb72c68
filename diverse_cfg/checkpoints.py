"""Orbax checkpoints: params, optimiser state, data-iterator state and config together.

Items are saved separately so that a later stage can restore just the params
(e.g. a student from the base model) onto any mesh: the restore target is an
abstract tree of ShapeDtypeStructs carrying the *current* mesh's shardings.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the model."""


def _manager(directory: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         enable_async_checkpointing=True, read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
  """Async keep-N checkpoints of a training run under `directory`."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.mngr = _manager(self.directory, keep)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def save(self, step: int, state: dict[str, Any], config: ml_collections.ConfigDict,
           data_iter=None, extra: dict | None = None, force: bool = False) -> bool:
    """Starts an async save of {'params', 'opt_state', ...} + config (+ iterator)."""
    items = {name: ocp.args.StandardSave(value) for name, value in state.items()}
    items['config'] = ocp.args.JsonSave(config.to_dict())
    items['extra'] = ocp.args.JsonSave(extra or {})
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return self.mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: dict[str, Any], data_iter=None) -> dict[str, Any]:
    items = {name: ocp.args.StandardRestore(value) for name, value in abstract_state.items()}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; name the checkpoint and the cause
      raise CheckpointError(f'cannot restore step {step} from {self.directory}: '
                            f'{type(e).__name__}: {e}') from e
    return {name: restored[name] for name in abstract_state}

  def wait(self) -> None:
    self.mngr.wait_until_finished()

  def close(self) -> None:
    self.mngr.wait_until_finished()
    self.mngr.close()


def read_config(directory: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a checkpointed run was trained with."""
  mngr = _manager(directory, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no checkpoint in {os.path.abspath(directory)}')
  try:
    cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  except Exception as e:
    raise CheckpointError(f'cannot read the config of step {step} in {directory}: {e}') from e
  finally:
    mngr.close()
  return ml_collections.ConfigDict(cfg)


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
  """Only the params of a checkpoint, laid out as `abstract_params` says (any mesh)."""
  mngr = _manager(directory, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no checkpoint in {os.path.abspath(directory)}')
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))['params']
  except Exception as e:
    raise CheckpointError(f'cannot restore the params of step {step} from {directory}: '
                          f'{type(e).__name__}: {e}') from e
  finally:
    mngr.close()
  return out


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
