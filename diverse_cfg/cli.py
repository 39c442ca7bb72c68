"""`diverse-cfg STAGE --config=... --workdir=...` (or `diverse-cfg sample ...`): the console script."""

import sys

from absl import app

from diverse_cfg import main


def run():
  if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
    print(f'usage: diverse-cfg {{{",".join(main.PIPELINE + ("all",))}}} --config=FILE[:preset] '
          '--workdir=DIR [--config.a.b=v ...]\n'
          '       diverse-cfg sample --checkpoint=DIR --prompt=attr=value,... [--num_samples=N '
          '--gamma=G --out_dir=DIR ...]', file=sys.stderr)
    sys.exit(2)
  stage = sys.argv.pop(1)
  sys.argv.insert(1, f'--stage={stage}')
  app.run(main.main)
