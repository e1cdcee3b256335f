"""olr.compiled_plans: memory plans read from XLA's buffer assignment, live ranges and HLO."""

import jax
import jax.numpy as jnp
import pytest

import optax_lowrank as olr
from optax_lowrank import compiled_plans, memory

L, D, B = 4, 64, 16
N = 128
upcasting = pytest.mark.skipif(not compiled_plans.backend_upcasts_low_precision(),
                               reason="this backend computes bf16 products natively")


def test_every_name_is_also_importable_from_memory():
  for name in compiled_plans.__all__:
    assert getattr(memory, name) is getattr(compiled_plans, name)
    assert name in memory.__all__


def test_a_donated_argument_is_counted_once():
  x = jax.ShapeDtypeStruct((N, N), jnp.float32)
  f = lambda a, b: a * b + 1.0  # elementwise: written in place of a donated `a`
  kept = compiled_plans.plan_function(f, x, x).memory
  donated = compiled_plans.plan_function(f, x, x, donate_argnums=(0,)).memory
  assert kept.arguments == donated.arguments == 2 * N * N * 4
  assert kept.outputs == donated.outputs == N * N * 4
  assert (kept.aliased, donated.aliased) == (0, N * N * 4)
  assert donated.peak == kept.peak - N * N * 4


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="LAPACK's gesdd runs on the CPU")
def test_lapack_workspace_is_the_largest_gesdd_query():
  # the thin SVD of a 64×172 float32 matrix: lwork = 4·64² + 7·64 floats
  # (LAPACK's workspace query) and iwork = 8·64 int32; the larger of two SVDs counts
  thin = lambda a: jnp.linalg.svd(a, full_matrices=False)
  svd = lambda a, b: (thin(a), thin(b))
  text = jax.jit(svd).lower(jax.ShapeDtypeStruct((64, 172), jnp.float32),
                            jax.ShapeDtypeStruct((16, 40), jnp.float32)).compile().as_text()
  assert compiled_plans.lapack_workspace_bytes(text) == (4 * 64 * 64 + 7 * 64) * 4 + 8 * 64 * 4
  assert compiled_plans.lapack_workspace_bytes(jax.jit(jnp.sin).lower(1.0).compile().as_text()) == 0


@upcasting
def test_a_bf16_product_holds_no_temporaries_on_the_accelerator():
  # XLA:CPU converts both operands to f32, multiplies in f32 and rounds the
  # result back: three f32 temporaries that a bf16-native device never makes.
  a = jax.ShapeDtypeStruct((N, N), jnp.bfloat16)
  p = compiled_plans.plan_function(lambda x, w: x @ w, a, a)
  assert p.memory.temporaries >= 3 * N * N * 4
  assert p.cpu_only.buffers == 3
  assert p.accelerator.temporaries == 0
  assert p.accelerator_peak == 3 * N * N * 2  # two arguments and the result, in bf16


@upcasting
def test_the_accelerator_keeps_a_computed_bf16_intermediate():
  # tanh(x·w)·w: the device holds tanh(x·w) in bf16 between the two products.
  a = jax.ShapeDtypeStruct((N, N), jnp.bfloat16)
  p = compiled_plans.plan_function(lambda x, w: jnp.tanh(x @ w) @ w, a, a)
  assert p.accelerator.temporaries == N * N * 2
  # the same program in float32 holds it in f32: nothing to remove there
  f = jax.ShapeDtypeStruct((N, N), jnp.float32)
  assert compiled_plans.plan_function(lambda x, w: jnp.tanh(x @ w) @ w, f, f).cpu_only is None


@pytest.mark.parametrize("count", [3, 10])
def test_the_assignment_read_in_a_child_is_the_in_process_compile(count):
  # plan_compiled(assignment_only=True) stops a child compile after the buffer
  # assignment; its figures must be the in-process compile's, byte for byte
  params = {"w": jax.ShapeDtypeStruct((L, D, 3 * D), jnp.bfloat16)}
  batch = jax.ShapeDtypeStruct((B, D), jnp.bfloat16)

  def loss(p, f, b):
    del f
    h = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w[:, :D]), None), b, p["w"])[0]
    return jnp.mean(h.astype(jnp.float32) ** 2)

  tx = olr.galore(1e-3, rank=8, refresh_every=10, reshape=olr.stacked())
  lowered = memory.lower_train_step(loss, tx, params, batch, count=count)
  assert compiled_plans._assignment_in_child(lowered, {}) is not None  # the child path ran
  child = compiled_plans.plan_compiled(lowered, assignment_only=True)
  here = compiled_plans.plan_compiled(lowered, assignment_only=False)
  assert child == here
  # the accelerator analysis ran on the child's dumps too (a refresh may have
  # nothing CPU-only at its peak once the projections slice bf16 stacks natively)
  assert child.cpu_only is not None and child.cpu_only.buffers > 0
  assert child.cpu_only.saved > 0 or count == 10
  assert (child.lapack_workspace > 0) == (count == 10)  # the refresh branch: SVDs


@upcasting
def test_peak_buffers_lists_what_the_temporaries_hold():
  a = jax.ShapeDtypeStruct((N, N), jnp.bfloat16)
  lowered = jax.jit(lambda x, w: jnp.tanh(x @ w) @ w).lower(a, a)
  accel = compiled_plans.peak_buffers(lowered)
  # on the accelerator figure: only tanh(x·w), in bf16
  assert sum(b.bytes for b in accel) == N * N * 2
  cpu = compiled_plans.peak_buffers(lowered, accelerator=False)
  assert sum(b.bytes for b in cpu) >= 2 * N * N * 4  # the CPU's f32 operands of the product
  assert all(b.shape and b.op for b in cpu)
