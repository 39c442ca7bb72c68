"""Soak test of preemption (issue 7): finetuning SIGTERMed every few steps ends bit-identical.

A small synthetic dataset (arithmetic sequences fixed by a 2-attribute prompt,
as tests/helpers.py builds) and a smoke base model pretrained once; then one
finetuning run (beta > 0, so the diversity reward path runs, with a
parameter-free bag-of-events embedder) in a child process that is sent
SIGTERM every few steps and relaunched each time, until it finishes; and the
same run uninterrupted in another work directory. Every SIGTERM must end the
child cleanly with a checkpoint at the current step (training.Preemption), each
relaunch must resume from it, and the final student params of the two runs
must be equal bit for bit. The per-step training metrics (loss, KL, diversity
reward, ...) of the two runs are compared too.

The smoke model's step takes ~20 ms, far less than it takes to notice a step and
signal; each child step therefore sleeps --step_delay seconds on the host (no
effect on the numbers, see pace_steps), and the SIGTERM follows the watched step
after a random delay in [0, --jitter], so it lands at varying points of a step.
Periodic checkpoints are off (ckpt_every is huge): every resume point is the
checkpoint the SIGTERM handler wrote.

Not part of the test suite (minutes of wall time on 2 CPU cores):

  python -m benchmarks.soak_preemption --restarts=10 --steps=40 --workdir=/tmp/soak
  python -m benchmarks.soak_preemption --devices=8   # 8 fake CPU devices (fsdp = 8)

The parent and every child use the same number of fake CPU devices (--devices,
through XLA_FLAGS). Under --workdir: data/ (the imported dataset), base/
(the pretrained model, reused by later invocations), soak/ and reference/
(recreated each time; soak/logs/ holds each launch's output). Exit status 0
when the two runs are identical, 1 when not, 2 when the soak itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from diverse_cfg import workdir as workdir_lib  # paths only: no JAX before the device env is set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPTED_EXIT = 75  # the child's exit status when it stopped on SIGTERM (EX_TEMPFAIL)
VOCAB = 23  # the synthetic dataset's 20 events + PAD/BOS/EOS


def _set_device_env(env, devices: int) -> dict:
  """XLA_FLAGS with exactly `devices` fake host devices (any other count in it replaced)."""
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


# --------------------------------------------------------------------------------------------
# Shared by parent and child: the dataset, the config, the embedder.


def make_config(root: str, args):
  """configs/essen.py:smoke on the imported synthetic data, sized for the soak."""
  from configs import essen as essen_config  # pylint: disable=g-import-not-at-top
  c = essen_config.get_config('smoke')
  c.data.name = 'imported'
  c.data.npz_path = os.path.join(root, 'arith.npz')
  c.data.data_dir = os.path.join(root, 'data')
  t = c.train
  t.num_steps = t.eval_every = t.ckpt_every = args.pretrain_steps
  t.lr = 3e-3
  f = c.finetune
  f.betas = (args.beta,)
  f.num_steps = args.steps
  f.batch_size = 8
  f.lr = 1e-3
  f.log_every = 1  # a metrics row per step: what the parent watches
  f.eval_every = 10 ** 6  # evaluation only at the last step
  f.ckpt_every = 10 ** 6  # no periodic saves: every resume point is a SIGTERM save
  f.eval_prompts = 8
  return c


def saved_steps(workdir: str, beta: float) -> list[int]:
  ckpt = workdir_lib.checkpoints(workdir_lib.WorkDir(workdir).student(beta))
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())


def logged_step(workdir: str, beta: float) -> int:
  """The last step in the student's metrics.jsonl (0 if none)."""
  path = workdir_lib.metrics_file(workdir_lib.WorkDir(workdir).student(beta))
  if not os.path.exists(path):
    return 0
  step = 0
  with open(path) as f:
    for line in f:
      try:
        step = max(step, json.loads(line)['step'])
      except (ValueError, KeyError):  # a line being written
        pass
  return step


# --------------------------------------------------------------------------------------------
# The child: one finetuning launch, resuming from its work directory.


def pace_steps(delay_s: float) -> None:
  """Makes each training step take at least delay_s more (a host-side sleep, no numeric effect).

  The smoke model's finetuning step takes ~20 ms on CPU; real ones take seconds. The sleep
  sits in the prompt iterator's __next__ (the same subclassing trick as
  tests/helpers.py's sigterm_on_batch; the grain state it checkpoints is unchanged),
  so that the parent's SIGTERM lands inside a step of the run rather than many steps later.
  """
  from diverse_cfg.data import pipeline  # pylint: disable=g-import-not-at-top
  real = pipeline.make_train_iterator

  def paced_iterator(*args, **kwargs):
    it = real(*args, **kwargs)

    class Paced(type(it)):
      def __next__(self):
        time.sleep(delay_s)
        return super().__next__()

    it.__class__ = Paced
    return it

  pipeline.make_train_iterator = paced_iterator


def child(args) -> int:
  import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from diverse_cfg import finetune  # pylint: disable=g-import-not-at-top
  from diverse_cfg.evaluators import baselines  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger('diverse_cfg').setLevel(logging.INFO)
  devices = jax.devices()
  assert len(devices) == args.devices, (len(devices), args.devices)
  config = make_config(args.root, args)
  if args.step_delay > 0:
    pace_steps(args.step_delay)
  start = saved_steps(args.child_workdir, args.beta)
  result = finetune.run(config, args.child_workdir, embedder=baselines.bag_of_events(VOCAB),
                        devices=devices, progress=False)[args.beta]
  with open(args.result, 'w') as f:
    json.dump({'start_step': start[-1] if start else 0, 'step': result.step,
               'preempted': bool(result.preempted)}, f)
  return PREEMPTED_EXIT if result.preempted else 0


# --------------------------------------------------------------------------------------------
# The parent.


class Launcher:
  """Starts children on one work directory; each launch logs to its own file."""

  def __init__(self, args, workdir: str):
    self.args, self.workdir = args, workdir
    self.logs = os.path.join(workdir, 'logs')
    os.makedirs(self.logs, exist_ok=True)
    self.count = 0
    self.env = _set_device_env(dict(os.environ), args.devices)
    self.env['PYTHONPATH'] = REPO + os.pathsep + self.env.get('PYTHONPATH', '')

  def start(self):
    self.count += 1
    self.log = os.path.join(self.logs, f'launch_{self.count:02d}.log')
    self.result = os.path.join(self.logs, f'launch_{self.count:02d}.json')
    a = self.args
    cmd = [sys.executable, '-m', 'benchmarks.soak_preemption', '--child',
           f'--child_workdir={self.workdir}', f'--result={self.result}', f'--root={a.workdir}',
           f'--devices={a.devices}', f'--steps={a.steps}', f'--beta={a.beta}',
           f'--pretrain_steps={a.pretrain_steps}', f'--step_delay={a.step_delay}']
    with open(self.log, 'w') as out:
      return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)

  def outcome(self, proc) -> dict:
    rc = proc.wait(timeout=self.args.launch_timeout)
    out = {'rc': rc}
    if os.path.exists(self.result):
      with open(self.result) as f:
        out.update(json.load(f))
    return out

  def tail(self, n: int = 40) -> str:
    with open(self.log) as f:
      return ''.join(f.readlines()[-n:])


class SoakFailure(RuntimeError):
  pass


def run_soak(args, workdir: str) -> dict:
  """Launch, SIGTERM a few steps later, relaunch; until a launch finishes all the steps."""
  launcher = Launcher(args, workdir)
  rng = random.Random(args.seed)
  preemptions, events = 0, []
  while True:
    start = (saved_steps(workdir, args.beta) or [0])[-1]
    left = args.restarts - preemptions
    target = None
    if left > 0:
      target = start + max(1, (args.steps - start) // (left + 1))
      if target >= args.steps:
        target = None
    proc = launcher.start()
    signalled = None
    if target is not None:
      deadline = time.time() + args.launch_timeout
      while logged_step(workdir, args.beta) < target and proc.poll() is None:
        if time.time() > deadline:
          proc.kill()
          raise SoakFailure(f'launch {launcher.count}: step {target} not reached in '
                            f'{args.launch_timeout} s\n{launcher.tail()}')
        time.sleep(0.02)
      time.sleep(rng.uniform(0.0, args.jitter))  # somewhere inside the next step or two
      if proc.poll() is None:
        signalled = logged_step(workdir, args.beta)
        proc.send_signal(signal.SIGTERM)
    out = launcher.outcome(proc)
    after = saved_steps(workdir, args.beta)
    event = {'launch': launcher.count, 'resumed_from': start, 'sigterm_after_step': signalled,
             **out, 'checkpoints': after}
    events.append(event)
    print(f'  launch {launcher.count:2d}: from step {start:3d}, '
          + (f'SIGTERM after step {signalled:3d}, ' if signalled is not None else 'no signal, ')
          + f'exit {out["rc"]}, stopped at step {out.get("step")}, checkpoints {after}',
          flush=True)
    if out['rc'] == PREEMPTED_EXIT:
      # A clean preemption: a checkpoint at the step it stopped at, past where it started.
      if out.get('start_step') != start or not out.get('preempted'):
        raise SoakFailure(f'launch {launcher.count}: unexpected result {out}')
      if out['step'] <= start or not after or after[-1] != out['step']:
        raise SoakFailure(f'launch {launcher.count}: preempted at step {out.get("step")} but the '
                          f'checkpoints are {after} (started from {start})')
      preemptions += 1
      continue
    if out['rc'] == 0 and out.get('step') == args.steps and not out.get('preempted'):
      break
    raise SoakFailure(f'launch {launcher.count} ended with {out}; log tail:\n{launcher.tail()}')
  return {'restarts': preemptions, 'launches': launcher.count, 'events': events}


def run_reference(args, workdir: str) -> dict:
  launcher = Launcher(args, workdir)
  out = launcher.outcome(launcher.start())
  if out['rc'] != 0 or out.get('step') != args.steps:
    raise SoakFailure(f'the uninterrupted run ended with {out}; log tail:\n{launcher.tail()}')
  return out


def metric_rows(workdir: str, beta: float) -> tuple[dict[int, dict], dict[int, dict], int]:
  """step -> training metrics (timing fields dropped), step -> eval/* metrics, and how many
  steps were logged twice (a redone step would be)."""
  train, evals, repeats = {}, {}, 0
  with open(workdir_lib.metrics_file(workdir_lib.WorkDir(workdir).student(beta))) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop('step')
      ev = {k: v for k, v in row.items() if k.startswith('eval/')}
      tr = {k: v for k, v in row.items() if not k.startswith('eval/')
            and not k.endswith('_per_sec') and k != 'mfu'}
      for rows, new in ((train, tr), (evals, ev)):
        if new:
          repeats += step in rows
          rows[step] = new
  return train, evals, repeats


def first_difference(a: dict, b: dict):
  for step in sorted(set(a) | set(b)):
    if a.get(step) != b.get(step):
      return {'step': step, 'soak': a.get(step), 'reference': b.get(step)}
  return None


def compare(args, config, soak_dir: str, ref_dir: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diverse_cfg import checkpoints, experiment  # pylint: disable=g-import-not-at-top
  exp = experiment.prepare(config, jax.devices())
  restore = lambda run_dir: checkpoints.restore_model_params(
      workdir_lib.checkpoints(run_dir), exp.model_cfg, exp.mesh, exp.rules)[0]
  params = {name: restore(workdir_lib.WorkDir(d).student(args.beta))
            for name, d in (('soak', soak_dir), ('reference', ref_dir))}
  leaves = jax.tree.leaves(params['soak'])
  try:
    jax.tree.map(np.testing.assert_array_equal, params['soak'], params['reference'])
    identical, detail = True, ''
  except AssertionError as e:
    identical, detail = False, str(e)[:2000]
  differ = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(leaves, jax.tree.leaves(params['reference'])))
  base = restore(workdir_lib.WorkDir(ref_dir).pretrain)
  moved = sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
              zip(jax.tree.leaves(base), jax.tree.leaves(params['reference'])))
  soak_train, soak_eval, repeated = metric_rows(soak_dir, args.beta)
  ref_train, ref_eval, _ = metric_rows(ref_dir, args.beta)
  return {'identical': identical, 'leaves': len(leaves), 'leaves_differing': differ,
          'leaves_moved_from_base': moved, 'metrics_identical': soak_train == ref_train,
          'metric_steps': len(ref_train), 'steps_logged_twice': repeated,
          'first_metric_difference': first_difference(soak_train, ref_train),
          # The final evaluation samples from the final params with a fixed key: equal params
          # give equal figures, unless diverse_cfg's code changed between the two runs.
          'eval_identical': soak_eval == ref_eval,
          'first_eval_difference': first_difference(soak_eval, ref_eval), 'detail': detail}


def parent(args) -> int:
  _set_device_env(os.environ, args.devices)  # before JAX initialises, as in the children
  import jax  # pylint: disable=g-import-not-at-top
  from diverse_cfg import pretrain  # pylint: disable=g-import-not-at-top
  from diverse_cfg.data import synthetic  # pylint: disable=g-import-not-at-top
  assert len(jax.devices()) == args.devices, jax.devices()
  root = args.workdir = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  wall_start = time.perf_counter()
  synthetic.arithmetic_npz(os.path.join(root, 'arith.npz'))
  config = make_config(root, args)
  print(f'pretraining the base model ({args.pretrain_steps} steps, reused if present) ...',
        flush=True)
  base = workdir_lib.WorkDir(os.path.join(root, 'base'))
  pretrain.run(config, base, devices=jax.devices(), progress=False)
  base_ckpt = workdir_lib.checkpoints(base.pretrain)
  dirs = {}
  for name in ('soak', 'reference'):
    dirs[name] = os.path.join(root, name)
    shutil.rmtree(dirs[name], ignore_errors=True)
    shutil.copytree(base_ckpt, workdir_lib.checkpoints(workdir_lib.WorkDir(dirs[name]).pretrain))
  print(f'finetuning beta={args.beta:g} for {args.steps} steps with SIGTERM every few steps, '
        f'{args.devices} device(s) ...', flush=True)
  t0 = time.perf_counter()
  try:
    soak = run_soak(args, dirs['soak'])
  except SoakFailure as e:
    print(f'SOAK FAILED: {e}', flush=True)
    return 2
  soak_s = time.perf_counter() - t0
  print('the same finetuning uninterrupted ...', flush=True)
  t0 = time.perf_counter()
  try:
    run_reference(args, dirs['reference'])
  except SoakFailure as e:
    print(f'REFERENCE FAILED: {e}', flush=True)
    return 2
  ref_s = time.perf_counter() - t0
  cmp = compare(args, config, dirs['soak'], dirs['reference'])
  total_s = time.perf_counter() - wall_start
  summary = {'restarts': soak['restarts'], 'launches': soak['launches'], 'steps': args.steps,
             'devices': args.devices, 'beta': args.beta, 'step_delay_s': args.step_delay,
             'soak_wall_s': round(soak_s, 1),
             'reference_wall_s': round(ref_s, 1), 'total_wall_s': round(total_s, 1),
             **{k: v for k, v in cmp.items() if k != 'detail'}}
  with open(os.path.join(root, 'soak_summary.json'), 'w') as f:
    json.dump({**summary, 'events': soak['events'], 'detail': cmp['detail']}, f, indent=1)
  print(f'restarts (SIGTERM, clean save, relaunch): {soak["restarts"]} '
        f'({soak["launches"]} launches)')
  print(f'wall time: soak {soak_s:.1f} s, uninterrupted {ref_s:.1f} s, total {total_s:.1f} s')
  print(f'final student params identical to the uninterrupted run: {cmp["identical"]} '
        f'({cmp["leaves"]} arrays, {cmp["leaves_differing"]} differ; '
        f'{cmp["leaves_moved_from_base"]} moved from the base model)')
  print(f'per-step training metrics identical: {cmp["metrics_identical"]} '
        f'({cmp["metric_steps"]} steps, {cmp["steps_logged_twice"]} logged twice); final '
        f'evaluation identical: {cmp["eval_identical"]}')
  if not cmp['identical']:
    print(cmp['detail'])
  if cmp['first_metric_difference']:
    print('first training-metric difference:', cmp['first_metric_difference'])
  if cmp['first_eval_difference']:
    print('evaluation difference (did diverse_cfg change between the runs?):',
          cmp['first_eval_difference'])
  print(f'summary: {os.path.join(root, "soak_summary.json")}')
  return 0 if cmp['identical'] and cmp['metrics_identical'] else 1


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--restarts', type=int, default=10, help='SIGTERM + relaunch cycles')
  ap.add_argument('--steps', type=int, default=40, help='finetuning steps')
  ap.add_argument('--workdir', default='/tmp/diverse_cfg_soak')
  ap.add_argument('--devices', type=int, default=1, choices=(1, 8),
                  help='fake CPU devices, parent and children alike')
  ap.add_argument('--beta', type=float, default=8.0, help='diversity weight (> 0)')
  ap.add_argument('--pretrain_steps', type=int, default=30)
  ap.add_argument('--step_delay', type=float, default=0.2,
                  help='seconds each child step sleeps, so that a SIGTERM lands mid-run '
                  '(the smoke step itself takes ~20 ms); 0 = none')
  ap.add_argument('--jitter', type=float, default=None,
                  help='max seconds between seeing the target step logged and the SIGTERM '
                  '(default: --step_delay)')
  ap.add_argument('--seed', type=int, default=0, help='for the jitter')
  ap.add_argument('--launch_timeout', type=float, default=900)
  # Internal: one finetuning launch.
  ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--child_workdir', help=argparse.SUPPRESS)
  ap.add_argument('--result', help=argparse.SUPPRESS)
  ap.add_argument('--root', help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.beta <= 0:
    ap.error('--beta must be > 0 (the soak exercises the diversity reward)')
  if args.restarts < 0 or args.steps < 2:
    ap.error('need --restarts >= 0 and --steps >= 2')
  if args.jitter is None:
    args.jitter = args.step_delay
  if args.child:
    return child(args)
  return parent(args)


if __name__ == '__main__':
  sys.exit(main())
