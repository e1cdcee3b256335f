"""LowRankLinear's two evaluations: through the factors, or W0 + SᵀΛ formed on the fly.

Both compute the same function and the same gradients (float64: equal to
round-off); ``"auto"`` picks per call the one ``LowRankLinear.flops`` counts
cheaper, and the FLOP model agrees with XLA's count of the compiled gradient.
"""

import math
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

import optax_lowrank as olr
from optax_lowrank import quantization

SIDES = ("left", "right", "two")


def _layer(m, n, r, side, tokens=5, seed=0, dtype=jnp.float64):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  base = jax.random.normal(k[0], (m, n), dtype)
  left = jax.random.normal(k[1], (m, r), dtype) if side in ("left", "two") else None
  right = jax.random.normal(k[2], (n, r), dtype) if side in ("right", "two") else None
  lam = jax.random.normal(k[3], (r if left is not None else m, r if right is not None else n),
                          dtype)
  x = jax.random.normal(k[4], (tokens, 2, m), dtype)
  return olr.nnx.LowRankLinear(base, left, right, lam, jnp.ones((n,), dtype)), x


def _grads(layer, x, mode, wrt=nnx.Param):
  layer.evaluation = mode
  graphdef, diff, rest = nnx.split(layer, wrt, ...)

  def f(diff, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, diff, rest)(x)))

  value = nnx.merge(graphdef, diff, rest)(x)
  g, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(diff, x)
  return value, g, gx


@settings(max_examples=4, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), r=st.integers(1, 4), side=st.sampled_from(SIDES),
       tokens=st.integers(1, 6))
def test_merged_equals_factors_in_value_and_every_gradient(m, n, r, side, tokens):
  layer, x = _layer(m, n, r, side, tokens)
  for wrt in (nnx.Param, nnx.Variable):  # Λ and bias; then the frozen base and factors too
    v1, g1, x1 = _grads(layer, x, "factors", wrt)
    v2, g2, x2 = _grads(layer, x, "merged", wrt)
    np.testing.assert_allclose(v2, v1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x2, x1, rtol=1e-11, atol=1e-11)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_merged_with_a_quantized_base_equals_factors():
  layer, x = _layer(16, 12, 3, "left", tokens=7)
  layer.base.set_value(quantization.quantize(layer.base.get_value(), "int8", 32))
  v1, g1, x1 = _grads(layer, x, "factors")
  v2, g2, x2 = _grads(layer, x, "merged")
  # the same dequantized W0 either way: round-off of float64 products
  np.testing.assert_allclose(v2, v1, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(x2, x1, rtol=1e-11, atol=1e-11)
  np.testing.assert_allclose(g2["lam"][...], g1["lam"][...], rtol=1e-11, atol=1e-11)


_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]")


def _dot_flops(layer, x, mode):
  """FLOPs of the matrix products XLA keeps in the jitted gradient w.r.t. Λ and x.

  Read from the optimized HLO (dead code removed): ``2 · |output| · |contracted|``
  for every dot.
  """
  layer.evaluation = mode
  graphdef, lam, rest = nnx.split(layer, nnx.Param, ...)
  fresh = lambda t: jax.tree.map(lambda v: v, t)  # Variables at the current trace level
  loss = lambda p, x, rest: jnp.sum(jnp.sin(nnx.merge(graphdef, p, fresh(rest))(x)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))  # dΛ and dx, as inside a network
  text = grad.lower(lam, x, rest).compile().as_text()
  dims = {}
  for line in text.splitlines():
    d = _DEF.match(line)
    if d:
      dims[d.group(1)] = [int(v) for v in d.group(2).split(",") if v]
  total = 0
  for line in text.splitlines():
    if " dot(" not in line:
      continue
    out = _DEF.match(line).group(2)
    lhs = re.search(r" dot\(%?([\w.\-]+)", line).group(1)
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
    k = math.prod(dims[lhs][int(c)] for c in contract.split(",") if c)
    total += 2 * math.prod(int(v) for v in out.split(",") if v) * k
  return total


@pytest.mark.parametrize("side", SIDES)
def test_flop_model_matches_xla_count(side):
  m, n, r, tokens = 96, 64, 8, 128
  layer, x = _layer(m, n, r, side, tokens=tokens // 2, dtype=jnp.float32)
  model = layer.flops(tokens, m, n, r if side != "right" else None, r if side != "left" else None)
  for mode in ("factors", "merged"):
    counted = _dot_flops(layer, x, mode)
    assert counted == model[mode], (mode, counted, model[mode])


def test_auto_follows_the_flop_model():
  m, n, r = 64, 48, 4
  few = olr.nnx.LowRankLinear.flops(4, m, n, r, None)
  many = olr.nnx.LowRankLinear.flops(1024, m, n, r, None)
  assert few["factors"] < few["merged"] and many["merged"] < many["factors"]
  assert many["merged"] < many["dense"]  # no weight gradient: cheaper than a dense layer
  for tokens, model in ((4, few), (1024, many)):
    layer, x = _layer(m, n, r, "left", tokens=tokens // 2, dtype=jnp.float32)
    assert _dot_flops(layer, x, "auto") == min(model["factors"], model["merged"])


def test_bad_evaluation_names_the_layer():
  layer, x = _layer(4, 3, 2, "left")
  layer.path = "blocks/0/fc/kernel"
  layer.evaluation = "fast"
  with pytest.raises(ValueError, match="blocks/0/fc/kernel.*'fast'"):
    layer(x)
