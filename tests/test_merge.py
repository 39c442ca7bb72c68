"""Merging (merge.py): two models of one architecture, and the refusal of two that differ.

Interpolating two finetuned students (lambda = 0, 1 and 0.5) is checked on the students that
test_finetune.py trains, in its test_beta0_distils_teacher_and_beta_raises_diversity; merging
checkpoints while sampling, in test_sample.py.
"""

import numpy as np
import pytest

from diverse_cfg import merge


def test_merge_refuses_different_architectures(base_run):
  config, _ = base_run
  other = config.copy_and_resolve_references()
  other.model.d_model = 64
  with pytest.raises(merge.ArchitectureMismatch, match=r"d_model.*\(32, 64\)"):
    merge.check_same_architecture(config, other, 'a', 'b')
  a = {'w': np.zeros((2, 3), np.float32)}
  with pytest.raises(merge.ArchitectureMismatch, match=r'shapes \(2, 3\) and \(3, 2\)'):
    merge.merge_params(a, {'w': np.zeros((3, 2), np.float32)}, 0.5)
  with pytest.raises(merge.ArchitectureMismatch, match='different structure'):
    merge.merge_params(a, {'v': np.zeros((2, 3), np.float32)}, 0.5)
