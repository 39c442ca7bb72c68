"""Config validation (config_lib.validate): a valid config passes, a bad one names its field."""

import pytest

from diverse_cfg import config_lib


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
])
def test_bad_configs_name_the_field(changes, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
    _validate(**changes)


def test_unknown_config_key_is_named():
  c = config_lib.base_config()
  c.model.vocab_size, c.model.prompt_vocab_size, c.model.prompt_len, c.model.seq_len = 40, 10, 3, 16
  with c.unlocked():
    c.model.num_layer = 3
  with pytest.raises(config_lib.ConfigError, match=r'config\.model\.num_layer'):
    config_lib.validate(c)
