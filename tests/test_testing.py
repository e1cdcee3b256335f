"""``olr.testing``: the default tolerance of ``assert_dual`` follows dtype and steps."""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowrank as olr


def _problem(dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 48), dtype)
  y = jax.random.normal(jax.random.PRNGKey(1), (16, 24), dtype)
  params = {"w": jnp.zeros((48, 24), dtype), "b": jnp.zeros(24, dtype)}
  return params, lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def test_default_tolerance_follows_dtype_steps_and_scale():
  # The documented behaviour, not the formula again: the least precise floating leaf
  # decides, integer leaves do not count, the drift allowed grows linearly with the
  # steps and with weights above 1, and it stays in round-off territory.
  f32 = {"w": jnp.zeros(3, jnp.float32)}
  f64 = {"w": jnp.zeros(3, jnp.float64)}
  bf16 = {"w": jnp.zeros(3, jnp.bfloat16)}
  t = olr.testing.default_tolerance
  assert t(f64, 20) < t(f32, 20) < t(bf16, 20)
  assert t({**bf16, "v": jnp.zeros(3, jnp.float32)}, 20) == t(bf16, 20)
  assert t({**f64, "step": jnp.zeros((), jnp.int32)}, 20) == t(f64, 20)
  assert t(f32, 40) == pytest.approx(2 * t(f32, 20))
  assert t(f32, 20, scale=3.0) == pytest.approx(3 * t(f32, 20))
  assert t(f32, 20, scale=0.1) == t(f32, 20)
  for params in (f32, f64, bf16):  # within 100 rounding units of the weights per step
    eps = float(jnp.finfo(params["w"].dtype).eps)
    assert 1 <= t(params, 1) / eps <= 100


@pytest.mark.parametrize("spec", [olr.gaussian(8), olr.svd(8)])
def test_float32_run_passes_by_default_and_a_real_break_still_fails(spec):
  """JAX's default float32, as the README's quick start runs (issue 16's failure).

  The old default (1e-10 absolute, a float64 tolerance) failed the README's
  float32 example at 8.8e-8.  A real break — weight decay on the full weights
  on one path and on Λ on the other (paper 000, App. B) — must still fail.
  """
  with jax.enable_x64(False):
    params, loss = _problem(jnp.float32)
    result = olr.testing.assert_dual(loss, params, optax.adam(1e-2), spec, steps=12,
                                     refresh_every=4)
    assert 0 < result.max_deviation <= olr.testing.default_tolerance(params, 12, 1.0)
    with pytest.raises(AssertionError, match="differ by"):
      olr.testing.assert_dual(loss, params, optax.adam(1e-2), spec, steps=12, refresh_every=4,
                              decay=1e-2, decay_view=("gradient", "adapter"))


def test_float64_default_stays_sharp():
  params, loss = _problem(jnp.float64)
  result = olr.testing.assert_dual(loss, params, optax.adam(1e-2), olr.gaussian(8), steps=6,
                                   refresh_every=3)
  assert olr.testing.default_tolerance(params, 6) < 1e-12
  assert result.max_deviation < 1e-13
