"""The one place that starts JAX's multi-process runtime (`jax.distributed`).

A launch is one of three modes, chosen by a flag of diverse_cfg.main or, when
the flag is not given, by an environment variable (flags win):

  none      one process, no coordinator (the default; tests, a laptop, one GPU box).
  auto      JAX's own cluster detection: `jax.distributed.initialize()` with no
            address reads the environment of a SLURM job step (SLURM_JOB_ID,
            SLURM_NTASKS, SLURM_PROCID, ...), a Cloud TPU VM / pod slice (the
            TPU metadata server), Open MPI or Kubernetes. Which one JAX will use
            is logged; `cluster` forces one (JAX's cluster_detection_method).
  explicit  coordinator address, process count and this process's id given
            (several CPU processes on one machine: launch/local_cpu.sh).

    flag                       environment variable
    --distributed              DIVERSE_CFG_DISTRIBUTED           none|auto|explicit
    --coordinator_address      DIVERSE_CFG_COORDINATOR           host:port (process 0's)
    --num_processes            DIVERSE_CFG_NUM_PROCESSES
    --process_id               DIVERSE_CFG_PROCESS_ID
    --distributed_timeout_s    DIVERSE_CFG_DISTRIBUTED_TIMEOUT_S  default 300
    --cluster_detection_method DIVERSE_CFG_CLUSTER               auto only: slurm, gcetpu, ...

Every process of a job must join within the timeout. When one cannot (the
coordinator's address is wrong or unreachable, process 0 never started, a
worker is missing), JAX's runtime would abort from C++ with a bare
DEADLINE_EXCEEDED, or wait for minutes. Here a watchdog ends the process at
the timeout instead, with a message that names the coordinator address, the
timeout and whether the address accepted connections at all (exit code
EXIT_INIT_TIMEOUT). The runtime itself is JAX's; nothing here talks to peers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
import time
from typing import Mapping

log = logging.getLogger('diverse_cfg')

MODES = ('none', 'auto', 'explicit')
DEFAULT_TIMEOUT_S = 300
EXIT_INIT_TIMEOUT = 3  # the process exit status when the processes did not all join
# JAX's own deadline is set this much later than ours, so that our message,
# not its C++ abort, is what a user sees.
_JAX_DEADLINE_MARGIN_S = 60

ENV = {'mode': 'DIVERSE_CFG_DISTRIBUTED', 'coordinator_address': 'DIVERSE_CFG_COORDINATOR',
       'num_processes': 'DIVERSE_CFG_NUM_PROCESSES', 'process_id': 'DIVERSE_CFG_PROCESS_ID',
       'timeout_s': 'DIVERSE_CFG_DISTRIBUTED_TIMEOUT_S', 'cluster': 'DIVERSE_CFG_CLUSTER'}


class DistributedConfigError(ValueError):
  """The launch settings are incomplete or contradictory; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a job (see the module docstring)."""
  mode: str = 'none'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S
  cluster: str | None = None  # auto only: JAX's cluster_detection_method

  def validate(self) -> None:
    if self.mode not in MODES:
      raise DistributedConfigError(f'--distributed={self.mode!r}: choose one of {MODES}')
    if self.timeout_s <= 0:
      raise DistributedConfigError(f'--distributed_timeout_s={self.timeout_s}: must be positive')
    if self.mode == 'explicit':
      missing = [f'--{n}' for n in ('coordinator_address', 'num_processes', 'process_id')
                 if getattr(self, n) is None]
      if missing:
        raise DistributedConfigError(
            f'--distributed=explicit needs {", ".join(missing)} (or the environment variables '
            f'{", ".join(ENV[m[2:]] for m in missing)})')
      host, _, port = self.coordinator_address.rpartition(':')
      if not host or not port.isdigit():
        raise DistributedConfigError(
            f'--coordinator_address={self.coordinator_address!r}: expected host:port')
      if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
        raise DistributedConfigError(
            f'--process_id={self.process_id} must lie in [0, --num_processes='
            f'{self.num_processes})')
    elif self.mode == 'none':
      given = [n for n in ('coordinator_address', 'num_processes', 'process_id', 'cluster')
               if getattr(self, n) is not None]
      if given:  # a forgotten --distributed would silently train N copies of one model
        raise DistributedConfigError(
            f'{", ".join("--" + g for g in given)} given but --distributed=none; pass '
            '--distributed=explicit (or auto) to start a multi-process job')


def resolve(mode: str | None = None, coordinator_address: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            timeout_s: int | None = None, cluster: str | None = None,
            env: Mapping[str, str] | None = None) -> Launch:
  """A Launch from flag values (None = not given), falling back to the environment."""
  env = os.environ if env is None else env
  given = {'mode': mode, 'coordinator_address': coordinator_address,
           'num_processes': num_processes, 'process_id': process_id, 'timeout_s': timeout_s,
           'cluster': cluster}
  values = {}
  for name, value in given.items():
    if value is None or value == '':
      value = env.get(ENV[name]) or None
      if value is not None and name in ('num_processes', 'process_id', 'timeout_s'):
        try:
          value = int(value)
        except ValueError as e:
          raise DistributedConfigError(f'{ENV[name]}={value!r}: expected an integer') from e
    if value is not None:
      values[name] = value
  launch = Launch(**values)
  launch.validate()
  return launch


def detect_cluster() -> str | None:
  """The cluster environment `jax.distributed.initialize()` would pick, by JAX's name for it.

  Reads JAX's own registry of cluster environments (the list its auto-detection
  walks, in the same order); None when none is present or the registry moved.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if not env.opt_in_only_method and env.is_env_present():
        return env.name or env.__name__
  except Exception:  # a private registry: never let a JAX refactor break a launch
    log.debug('could not read JAX cluster registry', exc_info=True)
  return None


def _accepts_connections(address: str, timeout_s: float = 2.0) -> bool:
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s):
      return True
  except (OSError, ValueError):
    return False


def _watchdog(launch: Launch, address: str | None, done: threading.Event) -> None:
  """Ends the process with a clear message if the job has not formed by the deadline.

  jax.distributed.initialize blocks inside C++ (with the GIL released), so the
  main thread cannot raise: this thread reports and exits instead.
  """
  if done.wait(launch.timeout_s):
    return
  if launch.process_id is not None:
    who = f'process {launch.process_id} of {launch.num_processes}'
  else:
    who = 'this process'
  if address is None:  # auto: JAX derived the address from the cluster environment
    where = f'the coordinator JAX derived from the {launch.cluster or detect_cluster()} environment'
    cause = 'not every process of the job started, or they cannot reach process 0'
  elif launch.process_id == 0:
    where = address
    cause = (f'this process runs the coordinator; the other {launch.num_processes - 1} '
             'process(es) did not all connect to it')
  elif _accepts_connections(address):
    where = address
    cause = ('it accepts connections but the job did not form: another process is missing '
             'or was started with a different --num_processes')
  else:
    where = address
    cause = ('nothing accepts connections there: process 0 is not running, or the address '
             'or port is wrong or blocked from this host')
  message = (f'jax.distributed could not initialise within {launch.timeout_s} s '
             f'(--distributed_timeout_s): {who} could not join the job at coordinator '
             f'{where}; {cause}. Exiting with status {EXIT_INIT_TIMEOUT}.')
  print(f'FATAL: {message}', file=sys.stderr, flush=True)
  os._exit(EXIT_INIT_TIMEOUT)  # pylint: disable=protected-access


def initialize(launch: Launch) -> dict[str, object]:
  """Starts jax.distributed as `launch` says (no-op for mode none); returns what it found.

  Must run before anything touches a JAX backend (jax.devices(), any array).
  """
  launch.validate()
  import jax  # pylint: disable=g-import-not-at-top
  if launch.mode != 'none':
    if jax.distributed.is_initialized():
      raise RuntimeError('jax.distributed is already initialised: initialise it only here')
    kwargs = {'initialization_timeout': launch.timeout_s + _JAX_DEADLINE_MARGIN_S}
    address = launch.coordinator_address
    if launch.mode == 'explicit':
      kwargs.update(coordinator_address=address, num_processes=launch.num_processes,
                    process_id=launch.process_id)
      log.info('jax.distributed (explicit): process %d of %d, coordinator %s, timeout %d s',
               launch.process_id, launch.num_processes, address, launch.timeout_s)
    else:
      cluster = launch.cluster or detect_cluster()
      if cluster is None and address is None:
        raise DistributedConfigError(
            '--distributed=auto found no cluster environment JAX can read (SLURM job step, '
            'Cloud TPU VM, Open MPI, Kubernetes). Use --distributed=explicit with '
            '--coordinator_address/--num_processes/--process_id, or --distributed=none')
      if launch.cluster:
        kwargs['cluster_detection_method'] = launch.cluster
      for name in ('coordinator_address', 'num_processes', 'process_id'):
        if getattr(launch, name) is not None:  # explicit values override detection
          kwargs[name] = getattr(launch, name)
      log.info('jax.distributed (auto): cluster environment %r detected by JAX, timeout %d s',
               cluster, launch.timeout_s)
    done = threading.Event()
    threading.Thread(target=_watchdog, args=(launch, address, done), daemon=True,
                     name='jax-distributed-watchdog').start()
    start = time.perf_counter()
    try:
      jax.distributed.initialize(**kwargs)
    finally:
      done.set()
    log.info('jax.distributed ready in %.1f s', time.perf_counter() - start)
  info = {'mode': launch.mode, 'process_index': jax.process_index(),
          'process_count': jax.process_count(), 'local_devices': jax.local_device_count(),
          'global_devices': jax.device_count(), 'platform': jax.default_backend()}
  if launch.mode != 'none':
    log.info('process %d of %d: %d local / %d global %s devices', info['process_index'],
             info['process_count'], info['local_devices'], info['global_devices'],
             info['platform'])
  return info
