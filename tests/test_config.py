"""Config validation (config_lib.validate): a valid config passes, a bad one names its field."""

import pytest

from diverse_cfg import config_lib
from diverse_cfg import training


def _validate(**changes):
  c = config_lib.base_config()
  c.model.vocab_size, c.model.prompt_vocab_size, c.model.prompt_len, c.model.seq_len = 40, 10, 3, 16
  for path, value in changes.items():
    section, key = path.split('__')
    c[section][key] = value
  config_lib.validate(c, num_devices=8)


def test_valid_config_passes():
  _validate()
  _validate(mesh__fsdp=4, mesh__tensor=2)


@pytest.mark.parametrize('changes,field', [
    (dict(mesh__fsdp=3), 'config.mesh'),
    (dict(mesh__data=4, mesh__fsdp=4), 'mesh'),
    (dict(mesh__data=-1, mesh__fsdp=-1), '(data and fsdp are)'),
    (dict(model__num_heads=5), 'model.num_heads'),
    (dict(model__d_model=20, model__num_heads=4), 'model.num_heads'),  # odd head dim: no rotary
    (dict(finetune__teacher_gamma=-0.5), 'finetune.teacher_gamma'),
    (dict(evaluate__temperature=0.0), 'evaluate.temperature'),
    (dict(model__dtype='float16'), 'model.dtype'),
    (dict(model__prompt_dropout=1.0), 'model.prompt_dropout'),
    (dict(classifier__class_balance=-0.5), 'classifier.class_balance'),
    (dict(finetune__decay_steps=5), 'finetune.decay_steps'),  # inside the warmup (10)
    (dict(finetune__decay_steps=301), 'finetune.decay_steps'),  # past num_steps (300)
])
def test_bad_configs_name_the_field(changes, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    _validate(**changes)


def test_schedule_decays_until_decay_steps_and_holds():
  c = config_lib.base_config().finetune
  c.lr, c.warmup_steps, c.num_steps, c.min_lr_ratio, c.decay_steps = 1e-3, 10, 300, 0.05, 150
  _, schedule = training.make_optimizer(c)
  assert float(schedule(5)) == pytest.approx(5e-4)  # linear warmup
  assert float(schedule(80)) == pytest.approx(5.25e-4, rel=1e-5)  # cosine half-way: (1 + 0.05) / 2
  for step in (150, 200, 300):
    assert float(schedule(step)) == pytest.approx(5e-5, rel=1e-5)
  c.decay_steps = 0  # the default: the cosine ends at num_steps
  _, schedule = training.make_optimizer(c)
  assert float(schedule(155)) == pytest.approx(5.25e-4, rel=1e-5)
  assert float(schedule(300)) == pytest.approx(5e-5, rel=1e-5)


def test_unknown_config_key_is_named():
  c = config_lib.base_config()
  c.model.vocab_size, c.model.prompt_vocab_size, c.model.prompt_len, c.model.seq_len = 40, 10, 3, 16
  with c.unlocked():
    c.model.num_layer = 3
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.num_layer'):
    config_lib.validate(c)
