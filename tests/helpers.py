"""Shared test helpers: a small learnable dataset brought in through the import path, a tiny
decoder with its mesh, params and batches, and a counter of XLA compilations."""

import contextlib
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from configs import essen as essen_config
from diverse_cfg import config_lib
from diverse_cfg import model as model_lib
from diverse_cfg import pretrain
from diverse_cfg import sampling
from diverse_cfg import sharding
from diverse_cfg import specials
from diverse_cfg.data import synthetic


synthetic_npz = synthetic.arithmetic_npz  # rows fixed by a 2-attribute prompt


def smoke_config(tmp_dir: str, npz_path: str, **train):
  """configs/essen.py:smoke pointed at an imported dataset (the config's dataset entry only)."""
  c = essen_config.get_config('smoke')
  c.data.name = 'imported'
  c.data.npz_path = npz_path
  c.data.data_dir = os.path.join(tmp_dir, 'data')
  for k, v in train.items():
    c.train[k] = v
  return c


def pretrain_run(tmp_path, npz: str, workdir: str = 'run', **train):
  """The RunResult of pretraining smoke_config(**train) in tmp_path/workdir on 8 devices."""
  config = smoke_config(str(tmp_path), npz, **train)
  return pretrain.run(config, str(tmp_path / workdir), devices=jax.devices()[:8], progress=False)


def sigterm_on_batch(monkeypatch, module, n: int) -> None:
  """Makes `module.make_train_iterator`'s iterators SIGTERM this process on their n-th batch."""
  real = module.make_train_iterator

  def preempting_iterator(*args, **kwargs):
    it = real(*args, **kwargs)

    class Preempting(type(it)):  # the same iterator, but the n-th batch brings a SIGTERM
      count = 0

      def __next__(self):
        Preempting.count += 1
        if Preempting.count == n:
          os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()

    it.__class__ = Preempting
    return it

  monkeypatch.setattr(module, 'make_train_iterator', preempting_iterator)


# --- a tiny decoder: its config, mesh, params and random batches ------------------------------

CFG = model_lib.ModelConfig(vocab_size=37, prompt_vocab_size=11, prompt_len=3, seq_len=12,
                            num_layers=2, d_model=32, num_heads=4, mlp_dim=64)


forward = jax.jit(model_lib.forward, static_argnums=0)
score = jax.jit(sampling.score, static_argnums=0)


def mesh(devices, data=1, fsdp=-1, tensor=1):
  """(mesh, rules) of the base config's mesh section with these axes over `devices`."""
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return sharding.make_mesh(c.mesh, devices), sharding.rules_of(c.mesh)


def params(cfg, mesh_rules=None, seed=0):
  """Random params of `cfg`, sharded over mesh_rules (default: one device)."""
  mesh_, rules = mesh_rules or mesh(jax.devices()[:1])
  out, _ = sharding.create_sharded(functools.partial(model_lib.init_params, cfg), mesh_, rules,
                                   jax.random.key(seed))
  return out


def batch(cfg, batch=4, seed=1):  # pylint: disable=redefined-outer-name
  """Random (tokens [batch, seq_len], prompt [batch, prompt_len]), no EOS or PAD in the tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(specials.NUM_SPECIAL, cfg.vocab_size, (batch, cfg.seq_len)).astype(np.int32)
  prompt = rng.integers(0, cfg.prompt_vocab_size, (batch, cfg.prompt_len)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(prompt)


def gather(logp_BxTxV, tokens_BxT):
  """Each token's log-prob under logp_BxTxV, 0 after its row's EOS."""
  lp = jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], -1)[..., 0]
  return lp * sampling.token_mask(tokens_BxT)


@contextlib.contextmanager
def count_compiles():
  """Yields a list that gets one entry per XLA backend compilation inside the block."""
  count = []
  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      count.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
