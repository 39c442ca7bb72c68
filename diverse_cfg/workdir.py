"""The work-directory layout: every path of every stage, in one place.

`--workdir=DIR` always names the root; each stage reads and writes below it:

    DIR/pretrain/              the base model            (a run directory)
    DIR/embedder/              the frozen embedder       (a run directory + heldout.json)
    DIR/classifier/            the frozen classifier     (a run directory + heldout.json)
    DIR/students/beta_<b>/     one per finetune.betas    (a run directory + convergence.json)
    DIR/merged/lambda_<l>/     one per evaluate.lambdas  (checkpoints/ only)
    DIR/evaluate/              claims.json, results.csv/.json, front.png, curves.png, samples/,
                               report.html

A run directory is what the training loop writes: checkpoints/ (Orbax, with the
config), metrics.jsonl and tensorboard/. `sample` writes to <run directory>/samples
unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class WorkDir:
  """The paths under one work directory (the root, as given by --workdir)."""
  root: str

  @property
  def pretrain(self) -> str:
    return os.path.join(self.root, 'pretrain')

  @property
  def embedder(self) -> str:
    return os.path.join(self.root, 'embedder')

  @property
  def classifier(self) -> str:
    return os.path.join(self.root, 'classifier')

  def student(self, beta: float) -> str:
    return os.path.join(self.root, 'students', f'beta_{float(beta):g}')

  def merged(self, lam: float) -> str:
    return os.path.join(self.root, 'merged', f'lambda_{float(lam):g}')

  @property
  def evaluate(self) -> str:
    return os.path.join(self.root, 'evaluate')


def of(workdir: WorkDir | str) -> WorkDir:
  """A WorkDir from itself or from its root path."""
  return workdir if isinstance(workdir, WorkDir) else WorkDir(os.fspath(workdir))


def _in_run_dir(name: str, doc: str):
  def path(run_dir: str) -> str:
    return os.path.join(run_dir, name)
  path.__doc__ = doc
  return path


# Inside a run directory.
checkpoints = _in_run_dir('checkpoints', 'Orbax checkpoints, each step with its config.')
metrics_file = _in_run_dir('metrics.jsonl', 'The logged metrics, one JSON object per line.')
tensorboard = _in_run_dir('tensorboard', 'The same metrics for TensorBoard.')
heldout_file = _in_run_dir('heldout.json', "An evaluator's held-out figures.")
convergence_file = _in_run_dir('convergence.json', "A student's convergence verdict.")
samples = _in_run_dir('samples', 'Where `sample` writes by default.')


def run_dir_of(ckpt_dir: str) -> str:
  """The run directory of a checkpoints/ directory (itself if it is not one)."""
  return os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == 'checkpoints' else ckpt_dir


def find_checkpoints(path: str, root: str | None = None) -> str | None:
  """The Orbax directory of a run directory, or of the checkpoints/ directory itself; None if
  neither exists. A relative path that does not exist is looked up under root."""
  if root and not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(root, path)
  for candidate in (checkpoints(path), path):
    if os.path.isdir(candidate):
      return candidate
  return None
