"""Command-line entry point: one absl app for every stage.

    python -m diverse_cfg.main --stage=pretrain --config=configs/essen.py:smoke --workdir=/tmp/run
    python -m diverse_cfg.main --config=configs/essen.py:cpu --workdir=/tmp/run --config.train.lr=1e-3

Each stage writes under its own subdirectory of --workdir (e.g. DIR/pretrain)
and resumes from it automatically when started again.
"""

from __future__ import annotations

import logging
import os

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from diverse_cfg import config_lib

STAGES = ('pretrain',)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:preset].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory (checkpoints, metrics, reports).')
_STAGE = flags.DEFINE_enum('stage', 'pretrain', STAGES, 'Which stage to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_stage(stage: str, config, workdir: str):
  if stage == 'pretrain':
    from diverse_cfg import pretrain  # pylint: disable=g-import-not-at-top
    return pretrain.run(config, os.path.join(workdir, 'pretrain'))
  raise ValueError(f'unknown stage {stage!r}; choose from {STAGES}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax/grain chatter off
  logging.getLogger('diverse_cfg').setLevel(logging.INFO)
  try:
    run_stage(_STAGE.value, _CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e


if __name__ == '__main__':
  app.run(main)
