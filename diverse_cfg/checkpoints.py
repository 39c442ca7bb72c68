"""Orbax checkpoints: params, optimiser state, data-iterator state and config together.

Items are saved separately so that a later stage can restore just the params
(e.g. a student from the base model) onto any mesh: the restore target is an
abstract tree of ShapeDtypeStructs carrying the *current* mesh's shardings.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

from diverse_cfg import model as model_lib
from diverse_cfg import sharding as sharding_lib


log = logging.getLogger('diverse_cfg')


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not fit the model."""


class IncompatibleCheckpoint(CheckpointError):
  """The checkpoint is intact but holds a different architecture: no fallback helps."""


def _path_str(path) -> str:
  """'a/b/0/mu': the same for a NamedTuple field and the dict key Orbax saves it as."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def check_shapes(item_dir: str, abstract: Any, what: str) -> None:
  """Compares a saved pytree's shapes/structure with the target before reading any array."""
  try:
    saved = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
  except Exception as e:
    raise CheckpointError(f'cannot read the metadata of {item_dir}: {type(e).__name__}: {e}') from e
  saved_leaves = {_path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  want_leaves = {_path_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
  if not saved_leaves:
    raise CheckpointError(f'{what} in {item_dir} has no readable array metadata (truncated?)')
  missing = sorted(set(want_leaves) - set(saved_leaves))
  extra = sorted(set(saved_leaves) - set(want_leaves))
  if missing or extra:
    raise IncompatibleCheckpoint(
        f'{what} in {item_dir} does not match the configured model: missing {missing[:5]}, '
        f'unexpected {extra[:5]} (was it trained with another config, or on other data?)')
  for k, want in want_leaves.items():
    have = tuple(saved_leaves[k].shape)
    if have != tuple(want.shape):
      raise IncompatibleCheckpoint(
          f'{what} {k} in {item_dir} has shape {have} but the configured model needs '
          f'{tuple(want.shape)} (was it trained with another config, or on other data?)')


class _QuietReadOnly(logging.Filter):
  """Drops Orbax's 'Given directory is read only' warning, logged on every read-only open.

  Restoring a base model, students and evaluators printed ten of them per
  evaluation; reading is what read-only is for, so it says nothing.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('Given directory is read only')


logging.getLogger('absl').addFilter(_QuietReadOnly())


def _manager(directory: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  if read_only:  # the values Orbax would otherwise force, with a warning each
    options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0, create=False,
                                           read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
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
    # params first: a mismatch is reported on a parameter, not on its optimiser moments.
    for name in sorted(abstract_state, key=lambda n: n != 'params'):
      value = abstract_state[name]
      check_shapes(os.path.join(self.directory, str(step), name), value, name)
    items = {name: ocp.args.StandardRestore(value) for name, value in abstract_state.items()}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; name the checkpoint and the cause
      raise CheckpointError(f'cannot restore step {step} from {self.directory}: '
                            f'{type(e).__name__}: {e}') from e
    return {name: restored[name] for name in abstract_state}

  def restore_latest(self, abstract_state: dict[str, Any], data_iter=None):
    """(step, state) of the newest readable checkpoint, or (None, None) if there is none.

    A step that cannot be read (truncated, corrupt) is moved aside to
    `<step>.unreadable-<time>` (kept for inspection, never deleted) and the
    previous step is tried, with a warning. A checkpoint of another
    architecture is an error at once: older steps would not fit either.
    """
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        return step, self.restore(step, abstract_state, data_iter)
      except IncompatibleCheckpoint:
        raise
      except CheckpointError as e:
        aside = os.path.join(self.directory, f'{step}.unreadable-{int(time.time())}')
        if jax.process_index() == 0:
          os.rename(os.path.join(self.directory, str(step)), aside)
        multihost_utils.sync_global_devices(f'checkpoint_fallback_{step}')
        log.warning('checkpoint step %d is unreadable, moved to %s; trying the previous one. '
                    'Cause: %s', step, aside, e)
        self.mngr.reload()
    return None, None

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


def saved_steps(directory: str) -> list[int]:
  """The steps of the checkpoints kept in a directory, ascending."""
  mngr = _manager(directory, read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


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


def restore_model_params(ckpt_dir: str, cfg: model_lib.ModelConfig, mesh, rules):
  """A decoder checkpoint's params on this mesh, and their shardings; the architecture is
  checked first (a mismatch names each differing field)."""
  saved = model_lib.ModelConfig.from_config(read_config(ckpt_dir).model)
  if saved != cfg:
    raise CheckpointError(f'{ckpt_dir} holds a different architecture (saved vs '
                          f'configured): {saved.differences(cfg)}')
  abstract = sharding_lib.abstract_sharded(functools.partial(model_lib.init_params, cfg), mesh,
                                           rules, jax.random.key(0))
  return restore_params(ckpt_dir, abstract), jax.tree.map(lambda a: a.sharding, abstract)


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)
