"""Command-line entry point: one absl app for every stage.

    python -m diverse_cfg.main --stage=pretrain --config=configs/essen.py:smoke --workdir=/tmp/run
    python -m diverse_cfg.main --config=configs/essen.py:cpu --workdir=/tmp/run --config.train.lr=1e-3

--workdir is the root of one experiment; each stage reads and writes its own
subdirectory (workdir.py: DIR/pretrain, DIR/students/beta_0, ...) and resumes
from it automatically when started again. Every stage is run(config, workdir)
in its module; STAGES maps the --stage names to them.

Sampling from any checkpoint (diverse_cfg/sample_cli.py; no --config, the checkpoint has it):

    python -m diverse_cfg.main --stage=sample --checkpoint=/tmp/run/pretrain --gamma=3 \
        --prompt=region=german_speaking,meter=3/4,mode=major --num_samples=4 --out_dir=/tmp/samples

Several processes (diverse_cfg/distributed.py; launch/ has scripts for a TPU
pod, a SLURM GPU cluster and local CPU processes): every process runs the same
command plus --distributed=auto (TPU pod, SLURM: JAX reads the environment) or
--distributed=explicit --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

from __future__ import annotations

import logging
import sys
import time

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from diverse_cfg import checkpoints
from diverse_cfg import config_lib
from diverse_cfg import distributed
from diverse_cfg import evaluate
from diverse_cfg import finetune
from diverse_cfg import merge
from diverse_cfg import pretrain
from diverse_cfg import sample_cli
from diverse_cfg.evaluators import classifier
from diverse_cfg.evaluators import embedder

log = logging.getLogger('diverse_cfg')

# The pipeline in order: each stage is run(config, workdir). The evaluators read real data only.
STAGES = {'pretrain': pretrain.run, 'embedder': embedder.run, 'classifier': classifier.run,
          'finetune': finetune.run, 'merge': merge.run, 'evaluate': evaluate.run}
PIPELINE = tuple(STAGES)
COMMANDS = PIPELINE + ('all', 'sample')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:preset].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, "The experiment's root: each stage uses its own subdirectory "
                               '(workdir.py).')
_STAGE = flags.DEFINE_enum('stage', 'pretrain', COMMANDS, 'Which stage to run.')

# Multi-process launch; unset flags fall back to the DIVERSE_CFG_* environment variables.
_DISTRIBUTED = flags.DEFINE_enum('distributed', None, distributed.MODES,
                                 'none: one process; auto: JAX detects a TPU pod / SLURM job; '
                                 'explicit: --coordinator_address, --num_processes, --process_id.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_DIST_TIMEOUT = flags.DEFINE_integer('distributed_timeout_s', None,
                                     'Seconds for all processes to join (default 300).')
_CLUSTER = flags.DEFINE_string('cluster_detection_method', None,
                               "auto only: force JAX's detector (slurm, gcetpu, ...).")

# --stage=sample (diverse_cfg/sample_cli.py).
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None,
    'sample: a run dir (DIR/pretrain, DIR/students/beta_0, DIR/merged/lambda_0.5).')
_MERGE_WITH = flags.DEFINE_string('merge_with', None, 'sample: a second checkpoint to LERP with.')
_MERGE_LAMBDA = flags.DEFINE_float('merge_lambda', 0.5, 'sample: (1-l) checkpoint + l merge_with.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'sample: attribute=value,... (repeatable).')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 4, 'sample: samples per prompt.')
_GAMMA = flags.DEFINE_float('gamma', 1.0, 'sample: CFG strength; 1 = no CFG (one pass per token).')
_PLAUSIBILITY = flags.DEFINE_float(
    'plausibility', None, 'sample: CFG guides only tokens with p_cond >= this x the most likely '
    "one's (0 = plain CFG); default: the checkpoint's guidance.plausibility.")
_MIN_LENGTH = flags.DEFINE_integer('min_length', None, 'sample: fewest events before EOS '
                                   "(default: the data's; a fixed-length dataset's length).")
_MAX_LENGTH = flags.DEFINE_integer('max_length', None, 'sample: most events before EOS '
                                   "(default: the data's; none for variable-length data).")
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'sample: sampling temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens; 0 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'sample: random seed.')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'sample: output dir (default: CHECKPOINT/samples).')
_MESH = flags.DEFINE_string('mesh', None, 'sample: DATA,FSDP,TENSOR (default: the checkpoint\'s '
                            'mesh if it fits the devices, else all devices on fsdp).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'sample: the dataset dir, if it moved.')


def run_stage(stage: str, config, workdir: str):
  """One stage of the pipeline, or all of them in order ('all'; finished stages are reused)."""
  if stage not in STAGES and stage != 'all':
    raise ValueError(f'unknown stage {stage!r}; choose from {COMMANDS}')
  for name in PIPELINE if stage == 'all' else (stage,):
    start = time.perf_counter()
    STAGES[name](config, workdir)
    log.info('stage %s done in %.1f s', name, time.perf_counter() - start)


def sample_stage():
  if not _CHECKPOINT.value:
    raise app.UsageError('--stage=sample needs --checkpoint=DIR (e.g. DIR/students/beta_0)')
  if _CONFIG.value is not None:
    log.warning('--stage=sample takes the model config from the checkpoint; --config is unused')
  return sample_cli.run(_CHECKPOINT.value, _PROMPT.value, num_samples=_NUM_SAMPLES.value,
                        gamma=_GAMMA.value, plausibility=_PLAUSIBILITY.value,
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                        min_length=_MIN_LENGTH.value, max_length=_MAX_LENGTH.value,
                        seed=_SEED.value, out_dir=_OUT_DIR.value, merge_with=_MERGE_WITH.value,
                        merge_lambda=_MERGE_LAMBDA.value, mesh=_MESH.value,
                        data_dir=_DATA_DIR.value, workdir=_WORKDIR.value)


# A user's mistake (a config, a checkpoint path, a prompt, a launch setting): one line, no traceback.
USER_ERRORS = (config_lib.ConfigError, checkpoints.CheckpointError, sample_cli.SampleArgumentError,
               distributed.DistributedConfigError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/grain chatter off
  logging.getLogger('diverse_cfg').setLevel(logging.INFO)
  if _STAGE.value != 'sample' and (_CONFIG.value is None or _WORKDIR.value is None):
    raise app.UsageError(f'--stage={_STAGE.value} needs --config=FILE[:preset] and --workdir=DIR')
  try:
    # Before anything touches a JAX backend: the runtime must know its peers first.
    distributed.initialize(distributed.resolve(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        _DIST_TIMEOUT.value, _CLUSTER.value))
    if _STAGE.value == 'sample':
      sample_stage()
    else:
      run_stage(_STAGE.value, _CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:  # the message names the problem; the flags' help would bury it
    print(f'diverse_cfg: error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
