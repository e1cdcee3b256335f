"""olr.memory.plan_train_step and benchmarks.plan: compiled memory plans from shapes."""

import json

import jax
import jax.numpy as jnp
import optax
import pytest

from optax_lowrank import memory

L, D, B = 4, 64, 16


def _loss(params, frozen, batch, remat=False):
  """A scanned stack of L tanh layers (weights (L, D, D)) and a squared-error loss."""
  del frozen

  def layer(h, w):
    return jnp.tanh(h @ w.astype(h.dtype)), None

  body = jax.checkpoint(layer) if remat else layer
  h, _ = jax.lax.scan(body, batch.astype(params["w"].dtype), params["w"])
  return jnp.mean(h.astype(jnp.float32) ** 2)


def _params(dtype):
  return {"w": jax.ShapeDtypeStruct((L, D, D), dtype)}


def test_plan_reads_xla_and_the_analytic_parts_are_exact():
  params = _params(jnp.float32)
  batch = jax.ShapeDtypeStruct((B, D), jnp.float32)
  tx = optax.adam(1e-3)
  plan = memory.plan_train_step(_loss, tx, params, batch)
  m = plan.memory
  assert m.peak == m.arguments + m.outputs + m.temporaries - m.aliased
  assert plan.weights == plan.gradients == L * D * D * 4
  assert plan.optimizer_state == memory.state_bytes(tx, params).total
  # donated params and Adam moments are aliased to the step's outputs
  assert m.aliased >= 3 * L * D * D * 4
  # arguments: params, moments, the count, the batch
  assert m.arguments == 3 * L * D * D * 4 + 4 + B * D * 4
  assert plan.transfer is None and plan.transfer_peak == plan.peak  # float32: nothing to move
  undonated = memory.plan_train_step(_loss, tx, params, batch, donate=False)
  assert undonated.memory.aliased == 0 and undonated.peak > plan.peak


def test_activations_are_the_saved_residuals():
  params = _params(jnp.float32)
  batch = jax.ShapeDtypeStruct((B, D), jnp.float32)
  full = memory.plan_train_step(_loss, optax.sgd(0.1), params, batch)
  remat = memory.plan_train_step(lambda p, f, b: _loss(p, f, b, remat=True), optax.sgd(0.1),
                                 params, batch)
  # without remat each layer keeps its tanh output (B×D) per layer; with it, its input only
  assert full.activations >= L * B * D * 4
  assert remat.activations < full.activations


@pytest.mark.skipif(not memory.backend_upcasts_low_precision(),
                    reason="this backend computes bf16 products natively")
def test_bf16_upcast_is_detected_and_the_transfer_plan_drops_the_hoisted_copies():
  params = _params(jnp.bfloat16)
  batch = jax.ShapeDtypeStruct((B, D), jnp.bfloat16)
  plan = memory.plan_train_step(_loss, optax.sgd(0.1), params, batch)
  assert plan.upcasts_low_precision and plan.transfer is not None
  # the hoisted f32 copy of the whole (L, D, D) stack is gone without hoisting
  assert plan.transfer.peak <= plan.memory.peak - (L - 1) * D * D * 4
  assert memory.plan_train_step(_loss, optax.sgd(0.1), params, batch, transfer=False).transfer \
      is None


def test_non_scalar_loss_is_rejected():
  with pytest.raises(ValueError, match="scalar"):
    memory.plan_train_step(lambda p, f, b: p["w"], optax.sgd(0.1), _params(jnp.float32),
                           jax.ShapeDtypeStruct((B, D), jnp.float32))


def test_plan_cli_writes_rows_for_every_method(tmp_path, capsys):
  from benchmarks import plan

  path = tmp_path / "plan.json"
  plan.main(["--size", "tiny", "--tokens", "32", "--ranks", "8", "--donation", "yes",
             "--no-transfer", "--json", str(path)])
  rows = json.loads(path.read_text())
  names = [r["method"] for r in rows]
  assert names == ["adamw-bf16", "adamw-8bit", "galore-r8", "galore-8bit-r8", "adapter-r8",
                   "adapter-int8-r8", "adapter-nf4-8bit-r8"]
  for r in rows:
    assert r["donated"] is True
    assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                               - r["alias_bytes"])
  by = {r["method"]: r for r in rows}
  # the frozen base is smaller quantized: INT8 < BF16, NF4 < INT8 (the same factors and Λ)
  assert by["adapter-nf4-8bit-r8"]["weights_bytes"] < by["adapter-int8-r8"]["weights_bytes"] \
      < by["adapter-r8"]["weights_bytes"]
  # 8-bit moments are smaller than BF16 Adam's
  assert by["adamw-8bit"]["optimizer_state_bytes"] < by["adamw-bf16"]["optimizer_state_bytes"]
  assert "adapter-nf4-8bit-r8" in capsys.readouterr().out
