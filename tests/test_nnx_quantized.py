"""LowRankLinear with a quantized base: the function and gradients of the float path.

A :class:`~optax_lowrank.quantization.QuantizedArray` base goes through a
``custom_vjp`` whose backward dequantizes again instead of keeping the float
``W`` alive (see ``olr.nnx._dequantized_matmul``).  The reference here is the
plain path on the *dequantized* base: the same ``W`` values, so the results
must agree to float64 round-off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_lowrank as olr
from optax_lowrank import adapters, quantization

# Both paths multiply the same float64 operands; the only freedom XLA has is
# the summation order of the dots (the backward's dy·Wᵀ is a dot with a
# transposed operand on one side and a transposed dot_general on the other),
# a relative difference of a few n·eps ≈ 1e-14 for the sizes below.
RTOL = 1e-12

FORMATS = ["int8", "nf4"]


class MLP(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float64):
    self.fc1 = nnx.Linear(300, 40, param_dtype=dtype, rngs=rngs)  # 12000 = 46.9 blocks of 256
    self.fc2 = nnx.Linear(40, 3, use_bias=False, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.tanh(self.fc1(x)))


def is_kernel(path, leaf):
  return "kernel" in path


def _models(format, spec=None, dtype=jnp.float64):
  """(quantized-base model, the same model with the dequantized float base)."""
  spec = spec or olr.gaussian(4)
  dense = MLP(nnx.Rngs(0), dtype)
  adapter = adapters.init(nnx.state(dense, nnx.Param), spec, where=is_kernel)
  adapter = adapters.quantize_base(adapter, format)
  models = []
  for _ in range(2):
    model = MLP(nnx.Rngs(0), dtype)
    olr.nnx.to_low_rank(model, adapter)
    models.append(model)
  quantized, plain = models
  rng = np.random.default_rng(1)
  for name in ("fc1", "fc2"):
    q_layer, p_layer = getattr(quantized, name), getattr(plain, name)
    assert isinstance(q_layer.base.get_value(), quantization.QuantizedArray)
    p_layer.base.set_value(quantization.dequantize(q_layer.base.get_value()))
    lam = jnp.asarray(rng.normal(size=q_layer.lam.get_value().shape), q_layer.lam.get_value().dtype)
    q_layer.lam.set_value(lam)  # Λ ≠ 0: the low-rank term takes part
    p_layer.lam.set_value(lam)
  return quantized, plain


def _data(dtype=jnp.float64):
  rng = np.random.default_rng(2)
  return (jnp.asarray(rng.normal(size=(2, 5, 300)), dtype),
          jnp.asarray(rng.normal(size=(2, 5, 3)), dtype))


def loss_of(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=RTOL, atol=0), a, b)


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("spec", [olr.gaussian(4, side="left"), olr.gaussian(4, side="right"),
                                  olr.two_sided(3, 2)], ids=["left", "right", "two-sided"])
def test_value_and_lambda_gradient_equal_the_dequantized_float_path(format, spec):
  quantized, plain = _models(format, spec)
  x, y = _data()

  @nnx.jit
  def value_and_grad(model):
    return nnx.value_and_grad(loss_of)(model, x, y)

  (lq, gq), (lp, gp) = value_and_grad(quantized), value_and_grad(plain)
  np.testing.assert_allclose(lq, lp, rtol=RTOL)
  _close(nnx.to_pure_dict(gq), nnx.to_pure_dict(gp))  # Λ and the biases
  np.testing.assert_allclose(quantized(x), plain(x), rtol=RTOL)  # eager, no jit


@pytest.mark.parametrize("format", FORMATS)
def test_input_gradient_equals_the_dequantized_float_path(format):
  quantized, plain = _models(format)
  x, y = _data()
  q_layer, p_layer = quantized.fc1, plain.fc1
  w = jnp.asarray(np.random.default_rng(3).normal(size=(40,)))

  def f(layer):
    return jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(layer(x)) * w)))

  dq, dp = f(q_layer)(x), f(p_layer)(x)
  np.testing.assert_allclose(dq, dp, rtol=RTOL)
  # jax.vjp with an arbitrary cotangent, outside jit
  yq, vjp_q = jax.vjp(q_layer, x)
  yp, vjp_p = jax.vjp(p_layer, x)
  np.testing.assert_allclose(yq, yp, rtol=RTOL)
  ct = jnp.asarray(np.random.default_rng(4).normal(size=yq.shape))
  np.testing.assert_allclose(vjp_q(ct)[0], vjp_p(ct)[0], rtol=RTOL)


@pytest.mark.parametrize("format", FORMATS)
def test_the_backward_pass_keeps_the_codes_not_the_float_weight(format):
  # The residuals of the layer's VJP hold the quantized codes and scales, and
  # no array of the kernel's (in, out) shape: the float W is rebuilt in the
  # backward pass instead of being kept alive from the forward pass.
  quantized, plain = _models(format)
  x, _ = _data()
  graphdef, lam_state, rest = nnx.split(quantized.fc1, nnx.Param, ...)

  def f(lam_state, x):
    return nnx.merge(graphdef, lam_state, rest)(x)

  _, vjp = jax.vjp(f, lam_state, x)
  shapes = {tuple(leaf.shape) for leaf in jax.tree.leaves(vjp)}
  assert (300, 40) not in shapes
  codes = quantized.fc1.base.get_value().codes
  assert any(leaf.dtype == codes.dtype and leaf.shape == codes.shape
             for leaf in jax.tree.leaves(vjp))
  # the plain path on a float base keeps W (the behaviour the custom VJP avoids)
  graphdef, lam_state, rest = nnx.split(plain.fc1, nnx.Param, ...)
  _, vjp = jax.vjp(f, lam_state, x)
  assert (300, 40) in {tuple(leaf.shape) for leaf in jax.tree.leaves(vjp)}


def test_dtypes_follow_the_input_as_on_the_float_path():
  # float32 inputs with a float64-stored base: the product runs in x's dtype.
  quantized, plain = _models("int8")
  x, y = _data(jnp.float32)
  yq, yp = quantized.fc1(x), plain.fc1(x)
  assert yq.dtype == yp.dtype
  # float32 dots: agreement to float32 round-off of a 300-term sum
  np.testing.assert_allclose(yq, yp, rtol=1e-5, atol=1e-5)
  dq = jax.grad(lambda x: jnp.sum(quantized.fc1(x)))(x)
  dp = jax.grad(lambda x: jnp.sum(plain.fc1(x)))(x)
  assert dq.dtype == dp.dtype == jnp.float32
  np.testing.assert_allclose(dq, dp, rtol=1e-5, atol=1e-5)


def test_empty_batch():
  quantized, plain = _models("int8")
  x = jnp.zeros((0, 300))
  assert quantized.fc1(x).shape == (0, 40)
  g = jax.grad(lambda x: jnp.sum(quantized.fc1(x)))(x)
  assert g.shape == (0, 300)



class _Stack(nnx.Module):
  """Two stacked 6 × 4 layers (kernel (2, 6, 4): 24 elements a layer)."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(6, 4, use_bias=False, rngs=rngs)

    self.layers = make(rngs)


@pytest.mark.parametrize(("block_size", "fits"), [(8, True), (12, True), (16, False)])
def test_a_stacked_quantized_base_is_sliced_by_layer_or_refused(block_size, fits):
  model = _Stack(nnx.Rngs(0))
  adapter = adapters.init(nnx.state(model, nnx.Param), olr.gaussian(2), where=is_kernel,
                          reshape=((0,), (1,), (2,)))
  adapter = adapters.quantize_base(adapter, "nf4", block_size)
  if not fits:
    with pytest.raises(ValueError, match="24 elements to fill whole blocks of block_size 16"):
      olr.nnx.to_low_rank(model, adapter)
    return
  olr.nnx.to_low_rank(model, adapter)
  base = model.layers.base.get_value()
  assert base.shape == (6, 4) and base.codes.shape == (2, 12) and base.scales.shape[0] == 2
  flat = adapter.base["layers"]["kernel"]
  w = olr.nnx.dense_weight(model.layers)  # Λ = 0: the dequantized base, layer by layer
  np.testing.assert_array_equal(w, quantization.dequantize(flat))
