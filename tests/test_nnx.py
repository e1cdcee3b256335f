"""The Flax NNX low-rank layer: same function, same gradients, same trajectory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_lowrank as olr
from optax_lowrank import adapters


class MLP(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float64):
    self.fc1 = nnx.Linear(6, 8, param_dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(8, 3, use_bias=False, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


def is_kernel(path, leaf):
  return "kernel" in path


def _data(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(16, 6))), jnp.asarray(rng.normal(size=(16, 3)))


def loss_of(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("spec", [olr.gaussian(2), olr.svd(2, side="left"), olr.two_sided(2, 2)])
def test_layer_matches_the_materialized_model_in_value_and_gradient(spec):
  x, y = _data()
  dense = MLP(nnx.Rngs(0))
  params = nnx.state(dense, nnx.Param)
  dgrads = nnx.grad(loss_of)(dense, x, y)
  adapter = adapters.init(params, spec, where=is_kernel, grads=dgrads)
  model = MLP(nnx.Rngs(0))
  olr.nnx.to_low_rank(model, adapter)
  assert isinstance(model.fc1, olr.nnx.LowRankLinear)
  # Λ = 0: the same function
  np.testing.assert_allclose(loss_of(model, x, y), loss_of(dense, x, y), rtol=1e-12)
  # ∂L/∂Λ = S ∂L/∂W, computed through the factors
  lgrads = nnx.grad(loss_of)(model, x, y)
  bases = adapters.bases(adapter)
  for name in ("fc1", "fc2"):
    basis = bases[name]["kernel"]
    want = olr.project(basis, dgrads[name]["kernel"][...])
    np.testing.assert_allclose(lgrads[name]["lam"][...], want, atol=1e-12)
  # only Λ (and the bias) are parameters of the converted layer
  names = {jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
  assert not any("base" in n or "left" in n or "right" in n for n in names)


def test_no_full_size_weight_gradient_in_the_backward_pass():
  # The jaxpr of the gradient has no (in, out)-shaped dot output for fc1 other
  # than the forward x·W0: dΛ comes from the factors.
  x, _ = _data()
  big = nnx.Linear(64, 48, use_bias=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  params = nnx.state(big, nnx.Param)
  adapter = adapters.init(params, olr.gaussian(4), where=lambda p, v: True)
  layer = olr.nnx.LowRankLinear(big.kernel[...], *adapters.bases(adapter)["kernel"].factors,
                                jnp.zeros((64, 4)))
  xs = jnp.ones((10, 64))
  graphdef, lam_state, rest = nnx.split(layer, nnx.Param, ...)

  def f(lam_state):
    return jnp.sum(nnx.merge(graphdef, lam_state, rest)(xs) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(f))(lam_state)
  shapes = [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars]
  assert (64, 48) not in shapes


def test_trajectory_equals_the_gradient_path():
  # Gaussian bases, refresh every 3 steps with merge, Adam, α = 0.5, float64.
  x, y = _data(1)
  spec, scale, every, steps = olr.gaussian(2), 0.5, 3, 8
  dense = MLP(nnx.Rngs(1))
  tx = olr.low_rank(optax.adam(0.05), spec, refresh_every=every, scale=scale, where=is_kernel)
  graphdef, params = nnx.split(dense, nnx.Param)
  state = tx.init(params)

  @jax.jit
  def dense_step(params, state):
    g = jax.grad(lambda p: loss_of(nnx.merge(graphdef, p), x, y))(params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  model = MLP(nnx.Rngs(1))
  adapter = adapters.init(nnx.state(model, nnx.Param), spec, where=is_kernel)
  olr.nnx.to_low_rank(model, adapter)
  opt = nnx.Optimizer(model, olr.nnx.optimizer(optax.adam(0.05), scale), wrt=nnx.Param)

  @nnx.jit
  def lr_step(model, opt):
    grads = nnx.grad(loss_of)(model, x, y)
    opt.update(model, grads)

  for t in range(steps):
    if t and t % every == 0:
      adapter = olr.nnx.merge(model, adapter)
    params, state = dense_step(params, state)
    lr_step(model, opt)
    for name in ("fc1", "fc2"):
      layer = getattr(model, name)
      basis = adapters.bases(adapter)[name]["kernel"]
      eff = layer.base[...] + olr.project_back(basis, layer.lam[...])
      np.testing.assert_allclose(eff, params[name]["kernel"][...], atol=1e-10,
                                 err_msg=f"{name} at step {t}")
    np.testing.assert_allclose(model.fc1.bias[...], params["fc1"]["bias"][...], atol=1e-10)


def test_conversion_errors():
  model = MLP(nnx.Rngs(0))
  adapter = adapters.init(nnx.state(model, nnx.Param), olr.gaussian(2),
                          where=lambda p, v: False)
  with pytest.raises(ValueError, match="projects no nnx.Linear"):
    olr.nnx.to_low_rank(model, adapter)
  adapter = adapters.init(nnx.state(model, nnx.Param), olr.dense(3), where=is_kernel)
  with pytest.raises(ValueError, match="matrix projection"):
    olr.nnx.to_low_rank(model, adapter)


def test_layer_with_an_int8_base_is_close_to_the_dense_layer():
  # int8 absmax blocks: |ΔW| ≤ absmax/254 per element, so |Δy| ≤ Σ_i |x_i| · absmax/254.
  x, y = _data(2)
  dense = MLP(nnx.Rngs(2), dtype=jnp.float32)
  adapter = adapters.init(nnx.state(dense, nnx.Param), olr.gaussian(2), where=is_kernel)
  adapter = adapters.quantize_base(adapter, "int8")
  model = MLP(nnx.Rngs(2), dtype=jnp.float32)
  olr.nnx.to_low_rank(model, adapter)
  assert isinstance(model.fc1.base.get_value(), olr.quantization.QuantizedArray)
  h_dense = dense.fc1(x.astype(jnp.float32))
  h_q = model.fc1(x.astype(jnp.float32))
  w = dense.fc1.kernel[...]
  bound = jnp.sum(jnp.abs(x), axis=1, keepdims=True) * jnp.max(jnp.abs(w)) / 254
  assert bool(jnp.all(jnp.abs(h_q - h_dense) <= bound * (1 + 1e-4) + 1e-6))
  # merging re-quantizes the layer's base
  adapter = olr.nnx.merge(model, adapter)
  assert isinstance(model.fc1.base.get_value(), olr.quantization.QuantizedArray)


@pytest.mark.parametrize("make", [lambda: olr.galore(1e-2, rank=2, refresh_every=2),
                                  lambda: olr.adamem(1e-2, rank=2, refresh_every=2)],
                         ids=["galore", "adamem"])
def test_nnx_optimizer_with_stored_bases_matches_the_functional_step(make):
  # nnx.Optimizer hands optax trees of nnx.Param; stored bases must not end up
  # inside Param wrappers (regression: the second step used to fail).
  x, y = _data(3)
  model = MLP(nnx.Rngs(3))
  opt = nnx.Optimizer(model, make(), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_of)(model, x, y)
    opt.update(model, grads)
    return loss

  nnx_losses = [float(step(model, opt)) for _ in range(4)]
  model = MLP(nnx.Rngs(3))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make()
  state = tx.init(params)
  losses = []
  for _ in range(4):
    loss, g = jax.value_and_grad(lambda p: loss_of(nnx.merge(graphdef, p), x, y))(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    losses.append(float(loss))
  np.testing.assert_allclose(nnx_losses, losses, rtol=1e-12)
  assert losses[-1] < losses[0]
