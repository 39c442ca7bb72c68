"""Sampling from checkpoints: any mesh in, the same params and samples out; the CLI's files."""

import json
import os
import subprocess
import sys
import wave

import jax
import numpy as np
import pytest

import helpers
from configs import essen as essen_config
from diverse_cfg import config_lib
from diverse_cfg import pretrain
from diverse_cfg import sample_cli
from diverse_cfg import sharding as sharding_lib
from diverse_cfg import specials
from diverse_cfg.data import essen
from diverse_cfg.data import melody

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ('region=german_speaking,meter=3/4,mode=major', 'region=china,meter=2/4,mode=minor')


@pytest.fixture(scope='module')
def base_ckpt(tmp_path_factory):
  """A 2-step melody model (a small Essen subset) saved from an fsdp = 8 mesh."""
  root = tmp_path_factory.mktemp('sample')
  c = essen_config.get_config('smoke')
  c.data.data_dir = str(root / 'data')
  c.data.max_tunes = 40  # one file, a few seconds to parse
  c.train.num_steps = c.train.eval_every = c.train.ckpt_every = c.train.log_every = 2
  c.train.eval_batches = 1
  pretrain.run(c, str(root / 'run'), devices=jax.devices()[:8], progress=False)
  return str(root / 'run' / 'pretrain')


def test_checkpoint_lands_on_other_meshes_with_identical_params_and_samples(base_ckpt, caplog):
  models = {'fsdp8': sample_cli.load(base_ckpt, devices=jax.devices()[:8]),
            'fsdp4_tensor2': sample_cli.load(base_ckpt, devices=jax.devices()[:8], mesh='1,4,2'),
            'one_device': sample_cli.load(base_ckpt, devices=jax.devices()[:1])}
  # Reading a checkpoint does not log Orbax's read-only notice (it did, twice per load).
  assert not [r for r in caplog.records if 'is read only' in r.getMessage()]
  assert {n: dict(m.mesh.shape) for n, m in models.items()} == {
      'fsdp8': {'data': 1, 'fsdp': 8, 'tensor': 1},
      'fsdp4_tensor2': {'data': 1, 'fsdp': 4, 'tensor': 2},
      'one_device': {'data': 1, 'fsdp': 1, 'tensor': 1}}
  # Really laid out differently: the MLP kernel [embed=32, mlp=64] is cut into other pieces.
  up = lambda m: m.params['layer_0']['mlp']['up']['kernel']
  assert {n: up(m).sharding.shard_shape(up(m).shape) for n, m in models.items()} == {
      'fsdp8': (4, 64), 'fsdp4_tensor2': (8, 32), 'one_device': (32, 64)}

  ref = models['fsdp8']
  prompts_PxC = sample_cli.encode_prompts(ref.meta, PROMPTS)
  tokens, logprobs = sample_cli.generate(ref, prompts_PxC, 4, seed=3)
  for name, m in models.items():
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(sharding_lib.to_host(a),
                                                           sharding_lib.to_host(b)),
                 m.params, ref.params)
    got_tokens, got_logprobs = sample_cli.generate(m, prompts_PxC, 4, seed=3)
    np.testing.assert_array_equal(got_tokens, tokens, err_msg=name)
    np.testing.assert_allclose(got_logprobs, logprobs, atol=1e-4)
  # 2 x 3 rows are padded to 8 on the fsdp = 8 mesh and not at all on one device:
  # the padding changes nothing.
  np.testing.assert_array_equal(sample_cli.generate(ref, prompts_PxC, 3, seed=5)[0],
                                sample_cli.generate(models['one_device'], prompts_PxC, 3, seed=5)[0])


def test_sample_cli_writes_tokens_midi_wav_and_piano_rolls(base_ckpt, tmp_path):
  out = tmp_path / 'samples'
  script = os.path.join(os.path.dirname(sys.executable), 'diverse-cfg')
  cmd = ([script, 'sample'] if os.path.exists(script)
         else [sys.executable, '-m', 'diverse_cfg.main', '--stage=sample'])
  proc = subprocess.run(cmd + [f'--checkpoint={base_ckpt}', *[f'--prompt={p}' for p in PROMPTS],
                               '--num_samples=2', '--gamma=2', '--top_k=20', f'--out_dir={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / 'samples.json') as f:
    written = json.load(f)
  assert written['settings']['guided'] and written['settings']['gamma'] == 2.0
  tokens_PxKxT = np.load(out / 'tokens.npy')
  assert tokens_PxKxT.shape == (2, 2, 64)
  assert len(written['samples']) == 4
  for entry in written['samples']:
    p, k = PROMPTS.index(','.join(f'{a}={v}' for a, v in entry['prompt'].items())), entry['sample']
    row_T = tokens_PxKxT[p, k]
    assert entry['tokens'] == row_T[:entry['num_tokens']].tolist()
    assert not row_T[entry['num_tokens']:].any()  # PAD after the sequence
    for ext in ('mid', 'wav', 'png'):
      assert entry['files'][ext] == f'p{p}_s{k}.{ext}' and (out / entry['files'][ext]).stat().st_size
    assert (out / entry['files']['mid']).read_bytes()[:4] == b'MThd'
    assert (out / entry['files']['png']).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # The audio lasts as long as the melody's events (plus the synth's 0.25 s tail).
    quarters = sum(float(d) for _, d in melody.tokens_to_events(row_T))
    with wave.open(str(out / entry['files']['wav'])) as w:
      seconds = w.getnframes() / w.getframerate()
    assert abs(seconds - (quarters * 60 / melody.DEFAULT_TEMPO_QPM + 0.25)) < 0.01


def test_unknown_prompt_values_are_rejected_with_the_valid_ones(base_ckpt):
  with pytest.raises(sample_cli.SampleArgumentError) as info:
    sample_cli.run(base_ckpt, ['region=atlantis,meter=3/4,mode=major'],
               devices=jax.devices()[:1])
  message = str(info.value)
  assert "unknown value 'atlantis' for attribute 'region'" in message
  assert all(name in message for name in ('german_speaking', 'china', 'eastern_europe', '6/8', 'dorian'))
  with pytest.raises(sample_cli.SampleArgumentError, match="missing \\['mode'\\]"):
    sample_cli.run(base_ckpt, ['region=german_speaking,meter=3/4'], devices=jax.devices()[:1])
  with pytest.raises(sample_cli.SampleArgumentError, match='attribute=value pairs'):
    sample_cli.run(base_ckpt, ['germany'], devices=jax.devices()[:1])


def test_a_checkpoint_whose_data_changed_is_refused_naming_both(base_ckpt, tmp_path, monkeypatch):
  # The same subset built with one more region (as essen_folk 2.0.0 changed the regions).
  regions = essen.REGIONS + ('atlantis',)
  monkeypatch.setattr(essen, 'ATTRIBUTES', (('region', regions),) + essen.ATTRIBUTES[1:])
  with pytest.raises(config_lib.ConfigError) as info:
    sample_cli.load(base_ckpt, devices=jax.devices()[:1], data_dir=str(tmp_path / 'data'))
  message = str(info.value)
  assert os.path.abspath(base_ckpt) in message and str(tmp_path / 'data') in message
  assert f'prompt_vocab_size={sum(map(len, (essen.REGIONS, essen.METERS, essen.MODES)))}' in message
  assert f'prompt_vocab_size={len(regions) + len(essen.METERS) + len(essen.MODES)}' in message


def test_merging_on_the_fly_restores_both_and_interpolates(base_ckpt):
  alone = sample_cli.load(base_ckpt, devices=jax.devices()[:1]).params
  merged = sample_cli.load(base_ckpt, merge_with=os.path.join(base_ckpt, 'checkpoints'),
                       merge_lambda=0.5, devices=jax.devices()[:1]).params
  jax.tree.map(np.testing.assert_array_equal, merged, alone)  # 0.5 a + 0.5 a == a exactly
  with pytest.raises(sample_cli.SampleArgumentError, match='merge_lambda'):
    sample_cli.load(base_ckpt, merge_with=base_ckpt, merge_lambda=1.5, devices=jax.devices()[:1])


def test_fixed_length_data_samples_end_exactly_at_its_length(tmp_path):
  """An imported dataset whose rows all hold 10 events: every sampler ends every row there."""
  npz = helpers.synthetic_npz(str(tmp_path / 'fixed.npz'), n=64, seq_len=10, fixed_length=True)
  c = helpers.smoke_config(str(tmp_path), npz, num_steps=2, eval_every=2, ckpt_every=2,
                           log_every=2, eval_batches=1)
  pretrain.run(c, str(tmp_path), devices=jax.devices()[:1], progress=False)
  model = sample_cli.load(str(tmp_path / 'pretrain'), devices=jax.devices()[:1])
  assert model.meta.fixed_length == 10 and model.length_bounds == (10, 10)
  prompts = ['attr0=1,attr1=2', 'attr0=3,attr1=0']
  for gamma, alpha in ((1.0, None), (3.0, 0.0), (3.0, 0.2)):
    out = sample_cli.run(str(tmp_path / 'pretrain'), prompts, num_samples=8, gamma=gamma,
                     plausibility=alpha, out_dir=str(tmp_path / 'out'), devices=jax.devices()[:1])
    tokens = out['tokens'].reshape(16, -1)
    # 10 events, then EOS (certain: log-prob 0), then PAD.
    assert (tokens[:, :10] >= specials.NUM_SPECIAL).all() and (tokens[:, 10] == specials.EOS).all()
    np.testing.assert_array_equal(out['logprobs'].reshape(16, -1)[:, 10], 0.0)
  with open(tmp_path / 'out' / 'samples.json') as f:
    settings = json.load(f)['settings']
  assert (settings['plausibility'], settings['min_length'], settings['max_length']) == (0.2, 10, 10)
  # The bounds can be overridden; impossible ones are refused with one clear message.
  out = sample_cli.run(str(tmp_path / 'pretrain'), prompts, num_samples=8, min_length=0, max_length=4,
                   out_dir=str(tmp_path / 'out'), devices=jax.devices()[:1])
  assert ((out['tokens'] == specials.EOS).argmax(-1) <= 4).all()
  with pytest.raises(sample_cli.SampleArgumentError, match='leaves no room for EOS'):
    sample_cli.run(str(tmp_path / 'pretrain'), prompts, min_length=11, max_length=11,
               devices=jax.devices()[:1])
  with pytest.raises(sample_cli.SampleArgumentError, match='plausibility must be in'):
    sample_cli.run(str(tmp_path / 'pretrain'), prompts, gamma=3.0, plausibility=1.5)
