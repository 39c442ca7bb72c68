"""`diverse-cfg STAGE --config=... --workdir=...`: the console script."""

import sys

from absl import app


def run():
  from diverse_cfg import main  # pylint: disable=g-import-not-at-top
  if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
    print(f'usage: diverse-cfg {{{",".join(main.STAGES)}}} --config=FILE[:preset] --workdir=DIR '
          '[--config.a.b=v ...]', file=sys.stderr)
    sys.exit(2)
  stage = sys.argv.pop(1)
  sys.argv.insert(1, f'--stage={stage}')
  app.run(main.main)
