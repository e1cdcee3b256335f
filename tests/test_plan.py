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
  # float32: nothing the CPU holds that a device would not
  assert plan.cpu_only is None and plan.accelerator == plan.memory
  assert plan.accelerator_peak == plan.peak and plan.lapack_workspace == 0
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


upcasting = pytest.mark.skipif(not memory.backend_upcasts_low_precision(),
                               reason="this backend computes bf16 products natively")


@upcasting
def test_bf16_upcasts_of_a_scanned_stack_are_not_carried_to_the_accelerator():
  params = _params(jnp.bfloat16)
  batch = jax.ShapeDtypeStruct((B, D), jnp.bfloat16)
  plan = memory.plan_train_step(_loss, optax.sgd(0.1), params, batch)
  assert plan.upcasts_low_precision and plan.cpu_only is not None
  # the CPU hoists f32 copies of the whole (L, D, D) stack out of the loop
  assert plan.cpu_only.saved >= L * D * D * 4
  assert plan.accelerator.temporaries == plan.memory.temporaries - plan.cpu_only.saved
  # what remains is at most the bf16 program's own buffers: below the f32 program's
  f32 = memory.plan_train_step(_loss, optax.sgd(0.1), _params(jnp.float32),
                               jax.ShapeDtypeStruct((B, D), jnp.float32))
  assert plan.accelerator.temporaries < f32.memory.temporaries
  off = memory.plan_train_step(_loss, optax.sgd(0.1), params, batch, accelerator=False)
  assert off.cpu_only is None and off.accelerator == off.memory == plan.memory


def test_count_plans_the_ordinary_step_or_the_refresh():
  import optax_lowrank as olr

  m, n, r = 64, 172, 8
  params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  batch = jax.ShapeDtypeStruct((4, m), jnp.float32)
  loss = lambda p, f, b: jnp.sum((b @ p["w"]) ** 2)
  tx = olr.galore(1e-3, rank=r, refresh_every=10)
  both = memory.plan_train_step(loss, tx, params, batch)
  ordinary = memory.plan_train_step(loss, tx, params, batch, count=3)
  refresh = memory.plan_train_step(loss, tx, params, batch, count=10)
  # LAPACK's sgesdd workspace for the thin SVD of the 64×172 gradient:
  # lwork = 4·64² + 7·64 floats (LAPACK's query) and iwork = 8·64 int32
  workspace = (4 * m * m + 7 * m) * 4 + 8 * m * 4
  assert refresh.lapack_workspace == both.lapack_workspace == workspace
  assert ordinary.lapack_workspace == 0
  assert ordinary.peak < refresh.peak <= both.peak + 64
  assert refresh.accelerator_peak == refresh.accelerator.peak + workspace


def test_non_scalar_loss_is_rejected():
  with pytest.raises(ValueError, match="scalar"):
    memory.plan_train_step(lambda p, f, b: p["w"], optax.sgd(0.1), _params(jnp.float32),
                           jax.ShapeDtypeStruct((B, D), jnp.float32))


def test_plan_cli_writes_rows_for_every_method(tmp_path, capsys):
  from benchmarks import plan

  path = tmp_path / "plan.json"
  plan.main(["--size", "tiny", "--tokens", "32", "--ranks", "8", "--donation", "yes",
             "--workers", "1", "--methods", "adamw-8bit", "galore", "adapter-nf4-8bit",
             "--json", str(path)])
  rows = json.loads(path.read_text())
  names = [r["method"] for r in rows]
  assert names == ["adamw-8bit", "galore-r8", "adapter-nf4-8bit-r8"]
  for r in rows:
    assert r["donated"] is True
    assert r["step_kinds"] == list(plan.step_kinds(r["method"].split("-r")[0]))
    assert r["accelerator_peak_bytes"] == max(r[k]["accelerator_peak_bytes"]
                                              for k in r["step_kinds"])
    # the CPU's own plan holds at least what a bf16-native device would
    assert r["ordinary"]["accelerator_peak_bytes"] <= r["peak_bytes"]
    assert r["accelerator_temp_bytes"] == r["temp_bytes"] - r["cpu_only_bytes"]
  by = {r["method"]: r for r in rows}
  # every argument counts, used or not: the NF4 base's merge residual (read only by
  # the merge) is held by the ordinary step too
  for r in rows:
    assert r["argument_bytes"] >= r["weights_bytes"] + r["optimizer_state_bytes"]
  # GaLore's refresh runs the SVDs (LAPACK workspace); its ordinary step none
  assert by["galore-r8"]["refresh"]["lapack_workspace_bytes"] > 0
  assert by["galore-r8"]["ordinary"]["lapack_workspace_bytes"] == 0
  # a merge rewrites the quantized base: it holds the base's codes at least
  nf4 = by["adapter-nf4-8bit-r8"]
  assert nf4["merge"]["argument_bytes"] >= nf4["weights_bytes"] - nf4["gradient_bytes"] * 8
  assert "adapter-nf4-8bit-r8" in capsys.readouterr().out


def test_adapter_svd_refresh_is_planned_with_the_full_weight_gradient(tmp_path):
  from benchmarks import plan

  path = tmp_path / "plan.json"
  plan.main(["--size", "tiny", "--tokens", "32", "--ranks", "8", "--donation", "yes",
             "--workers", "1", "--methods", "adapter-svd", "--json", str(path)])
  (row,) = json.loads(path.read_text())
  assert row["step_kinds"] == ["ordinary", "refresh"]
  refresh = row["refresh"]
  # the SVDs of the full weight gradients run (LAPACK workspace), and the step
  # holds those gradients, which the ordinary step never forms
  assert refresh["lapack_workspace_bytes"] > 0
  assert refresh["accelerator_peak_bytes"] > row["ordinary"]["accelerator_peak_bytes"]
  assert row["accelerator_peak_bytes"] == refresh["accelerator_peak_bytes"]
