"""Essen folk melodies (music21's corpus): every stage of the pipeline.

Presets (the arg after the colon):
  smoke  a seconds-long CPU run on a small subset (tests, quick checks)
  cpu    the default, sized for a 2-core CPU machine (`make demo`)
  pod    a realistic model and mesh for a TPU pod slice / GPU cluster

Launch:
  python -m diverse_cfg.main --stage=pretrain --config=configs/essen.py:cpu --workdir=/tmp/essen
  python -m diverse_cfg.main --stage=pretrain --config=configs/essen.py:smoke --workdir=/tmp/smoke \
      --config.train.num_steps=20
  python -m diverse_cfg.main --stage=embedder --config=configs/essen.py:cpu --workdir=/tmp/essen
  python -m diverse_cfg.main --stage=classifier --config=configs/essen.py:cpu --workdir=/tmp/essen
"""

from diverse_cfg import config_lib


def get_config(arg: str = 'cpu'):
  preset = arg or 'cpu'
  c = config_lib.base_config()
  c.data.name = 'essen_folk'
  c.data.seq_len = 128

  if preset == 'smoke':
    c.data.max_files = 1
    c.data.max_tunes = 300
    c.data.seq_len = 64
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 2, 32, 2, 64
    c.train.batch_size = 8
    c.train.num_steps = 20
    c.train.warmup_steps = 2
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.train.ckpt_every = 10
    c.finetune.objective_prompts, c.finetune.objective_rollouts = 16, 64
  elif preset == 'cpu':
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 4, 128, 4, 384
    c.train.batch_size = 32
    c.train.num_steps = 800  # ~10 min on 2 cores (1.1-1.5 steps/s)
    c.train.lr = 2e-3
    c.train.warmup_steps = 50
    c.train.eval_every = 200
    c.train.eval_batches = 0
    c.train.ckpt_every = 200
    # ~0.55 s/step (beta 0) and ~0.4 s/step (beta 8) on 2 cores (32 rollouts compacted as
    # they finish, packed scoring and update). At 300 steps beta = 8 is shown converged (from
    # ~250 steps); beta = 0 is not: its KL still falls at 480 (docs/evaluation.md, "Converged
    # students").
    c.finetune.num_steps = 300
    c.finetune.rollout_min_rows = 8
    c.finetune.lr = 3e-4
    c.finetune.eval_every = 150
    c.finetune.ckpt_every = 150
    # 192 test prompts x 4: the claim-2 quality difference's 95 % interval was +-0.023 at 128
    # prompts on the demo's model with 100-step students (+-0.032 at 32), so +-0.02 needs ~170;
    # at 192 it is +-0.018 with those students, +-0.016 with the 200-step ones
    # (docs/results_essen.md).
    c.evaluate.num_prompts = 192
  elif preset == 'pod':
    # ~300M params; a v5e-64 / 8x8 GPU layout: 8-way data, 4-way fsdp, 2-way tensor.
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.mlp_dim = 24, 1024, 16, 4096
    c.model.dtype = 'bfloat16'
    c.model.remat = 'dots'
    c.model.scan_layers = True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 4, 2
    c.train.batch_size = 512
    c.train.num_steps = 20_000
    c.train.lr = 3e-4
    c.train.warmup_steps = 1000
    c.train.eval_every = 1000
    c.train.ckpt_every = 1000
    c.train.peak_flops = 197e12  # TPU v5e bf16 per chip
    # Prompt batches must split over data*fsdp (= chips / 2 here): 64 prompts x k = 4
    # rollouts per step fits 16 to 128 chips (v4-32 .. v5e-128).
    c.finetune.batch_size = 64
    c.finetune.peak_flops = 197e12
  else:
    raise ValueError(f'unknown preset {preset!r} for configs/essen.py; use smoke, cpu or pod')
  _evaluator_presets(c, preset)
  return c


def _evaluator_presets(c, preset: str) -> None:
  """The embedder and classifier stages (--stage=embedder / --stage=classifier)."""
  em, cl = c.embedder, c.classifier
  if preset == 'smoke':  # seconds
    for s in (em, cl):
      s.num_layers, s.d_model, s.num_heads, s.mlp_dim = 1, 32, 2, 64
      s.batch_size, s.num_steps, s.warmup_steps, s.lr = 16, 30, 3, 3e-3
      s.log_every, s.eval_every, s.eval_batches, s.ckpt_every = 5, 15, 2, 15
    em.emb_dim, em.chunk_len = 32, 16
  elif preset == 'cpu':  # a few minutes each on 2 CPU cores
    for s in (em, cl):
      s.num_layers, s.d_model, s.num_heads, s.mlp_dim = 2, 64, 4, 192
      s.warmup_steps, s.eval_every, s.ckpt_every, s.eval_batches = 50, 250, 250, 0
    em.batch_size, em.num_steps, em.lr, em.emb_dim, em.chunk_len = 64, 1000, 2e-3, 64, 32
    cl.batch_size, cl.num_steps, cl.lr = 32, 1600, 3e-3
  elif preset == 'pod':
    for s in (em, cl):
      s.num_layers, s.d_model, s.num_heads, s.mlp_dim = 6, 512, 8, 2048
      s.dtype = 'bfloat16'
      s.lr, s.warmup_steps, s.eval_every, s.ckpt_every = 5e-4, 500, 1000, 1000
      s.peak_flops = 197e12
    em.batch_size, em.num_steps, em.emb_dim, em.chunk_len = 1024, 10_000, 256, 48
    cl.batch_size, cl.num_steps = 512, 10_000
