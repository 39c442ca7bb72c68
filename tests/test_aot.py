"""benchmarks/aot.py: counting collectives and FLOPs, and the pod preset's per-chip state on a TPU topology.

The HLO and FLOP counters are checked on programs whose answer is known in
closed form. The topology tests need libtpu (`pip install -e '.[tpu_aot]'`,
compile-only: no TPU) and are skipped without it.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from benchmarks import aot
from configs import essen as essen_config

HAVE_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu_aot]'): no "
    'ahead-of-time compilation for TPU topologies')

# The smallest slice on which the pod preset's mesh has every axis > 1: 16 chips =
# data 2 x fsdp 4 x tensor 2.
SMALLEST_POD_TOPOLOGY = 'v5e:4x4'

# A loop of 5 iterations holding an all-gather and a TPU-style reduce-scatter (a custom
# fusion around an all-reduce), and an async all-reduce outside it.
HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: f32[16,8]) -> f32[4,8] {
  %input.1 = f32[16,8]{1,0} parameter(0)
  %all-reduce.9 = f32[16,8]{1,0} all-reduce(%input.1), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %slice = f32[4,8]{1,0} dynamic-slice(%all-reduce.9), dynamic_slice_sizes={4,8}
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %c = s32[]{:T(128)} constant(5)
  %p = (s32[], f32[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%q), index=1
  %ag = f32[16,8]{1,0} all-gather(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %rs = f32[4,8]{1,0} fusion(%ag), kind=kCustom, calls=%all-reduce-scatter.1
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %t = (s32[], f32[4,8]) tuple(%j, %rs)
}

ENTRY %main (x0: f32[4,8]) -> f32[4,8] {
  %x0 = f32[4,8]{1,0} parameter(0)
  %ars = f32[4,8]{1,0} all-reduce-start(%x0), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %ard = f32[4,8]{1,0} all-reduce-done(%ars)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]) tuple(%zero, %ard)
  %w = (s32[], f32[4,8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_iterations_and_tpu_reduce_scatter():
  out = aot.collectives(HLO)
  c = out['by_kind']
  assert out['loops_of_unknown_trip_count'] == 0
  # Inside the loop: once in the text, five times per step; 16 x 8 float32 = 512 bytes each.
  assert (c['all-gather']['count'], c['all-gather']['per_step']) == (1, 5)
  assert c['all-gather']['bytes_per_step'] == 5 * 512
  assert c['all-gather']['groups'] == {'4': 5}
  # The custom fusion is a reduce-scatter of its full 512-byte input, not an all-reduce.
  assert (c['reduce-scatter']['count'], c['reduce-scatter']['per_step']) == (1, 5)
  assert c['reduce-scatter']['bytes_per_step'] == 5 * 512
  assert c['reduce-scatter']['groups'] == {'4': 5}
  # Only the async all-reduce of the entry counts as one (its -done is not another).
  assert (c['all-reduce']['count'], c['all-reduce']['per_step']) == (1, 1)
  assert c['all-reduce']['bytes_per_step'] == 4 * 8 * 4
  assert c['all-reduce']['groups'] == {'2': 1}


def test_dot_flops_multiply_scanned_matmuls_by_the_trip_count():
  m, k, n, length = 8, 16, 32, 7

  def f(x_MxK, w_LxKxK, v_KxN):
    def body(h, w):
      return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(body, x_MxK, w_LxKxK)
    return jax.checkpoint(lambda h: h @ v_KxN)(h)

  args = (jnp.ones((m, k)), jnp.ones((length, k, k)), jnp.ones((k, n)))
  jaxpr = jax.make_jaxpr(f)(*args)
  assert aot.dot_flops(jaxpr) == 2 * m * k * k * length + 2 * m * k * n
  # Its gradient: every product's forward and its two backward products. (The checkpointed
  # product is not recomputed: a matmul's backward needs only its inputs.)
  grad_jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(1, 2)))(*args)
  assert aot.dot_flops(grad_jaxpr) == 3 * (2 * m * k * k * length + 2 * m * k * n)


@pytest.mark.parametrize('name', ['tpu64', 'v5e', 'v5e:8x8x', ''])
def test_malformed_topology_is_one_line_naming_it(name):
  with pytest.raises(aot.AotError, match='expected VERSION:SHAPE') as e:
    aot.topology_devices(name)
  assert '\n' not in str(e.value)


@needs_libtpu
def test_unknown_topology_is_one_line_naming_it():
  with pytest.raises(aot.AotError, match="'v5e:3x5'") as e:
    aot.topology_devices('v5e:3x5')
  assert '\n' not in str(e.value)


@needs_libtpu
def test_v4_is_one_device_per_chip_like_jax_on_a_v4():
  devices = aot.topology_devices('v4:2x2x4')  # v4-32: 16 chips of two TensorCores
  assert len(devices) == 16 and aot.CHIPS[devices[0].device_kind].name == 'v4'


def _pod_mlp_state_bytes(c) -> int:
  """gate, up, down of every layer, float32, times 3 (params, AdamW mu and nu)."""
  m = c.model
  return m.num_layers * 3 * m.d_model * m.mlp_dim * 4 * 3


@needs_libtpu
def test_pod_preset_state_per_chip_is_the_fsdp_ideal_and_a_replicated_mlp_costs_its_share():
  c = essen_config.get_config('pod')
  exp = aot.prepare(c, aot.topology_devices(SMALLEST_POD_TOPOLOGY))
  assert dict(exp.mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 2}
  sharded = aot.state_bytes(exp)
  # 404M float32 params + AdamW's two moments, over fsdp 4 x tensor 2 chips.
  # (+ 8: the int32 step counters of Adam and of the learning-rate schedule)
  assert sharded['total'] == exp.model_cfg.num_params() * 4 * 3 + 8
  assert sharded['fsdp_ideal'] == sharded['total'] / 8
  assert abs(sharded['ratio'] - 1) < 0.05

  # Without the 'mlp' rule the MLP matrices are split over fsdp only: their bytes per chip
  # double (x tensor = 2), everything else is unchanged.
  c.mesh.rules = tuple((name, None if name == 'mlp' else ax) for name, ax in c.mesh.rules)
  replicated = aot.state_bytes(aot.prepare(c, aot.topology_devices(SMALLEST_POD_TOPOLOGY)))
  mlp = _pod_mlp_state_bytes(c)
  expected_extra = mlp / 4 - mlp / 8
  assert abs((replicated['per_chip'] - sharded['per_chip']) / expected_extra - 1) < 0.01
  assert replicated['ratio'] > 1.7  # the MLP is 3/4 of this model's state


@needs_libtpu
@pytest.mark.slow
def test_pretrain_step_reduce_scatters_gradients_over_fsdp_and_counts_all_layers():
  """Two scanned layers of the pod preset on the smallest pod topology (~1-2 min)."""
  c = essen_config.get_config('pod')
  c.model.num_layers = 2
  rep = aot.check(c, SMALLEST_POD_TOPOLOGY, ['pretrain'], log=lambda *_: None)
  p = rep['programs']['pretrain']
  coll = p['collectives']
  # Gradients leave each layer as reduce-scatters over the 4 fsdp chips, inside the loop.
  assert coll['reduce-scatter']['groups'].get('4', 0) >= 2 * 7  # 7 matrices per layer
  assert p['loops_of_unknown_trip_count'] == 0
  # The compiled dots cover the model's FLOPs (plus remat's recomputed attention), while
  # XLA's cost analysis counts the layer loop once.
  assert 1.0 <= p['flops_per_chip'] / p['flops_per_chip_model'] < 1.1
  assert p['flops_per_chip_xla_cost_analysis'] < 0.75 * p['flops_per_chip']
  assert p['hbm_fraction'] < 1
