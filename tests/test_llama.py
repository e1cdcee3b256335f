"""Tests for the example Llama model in ``examples/llama.py``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples.llama import (
  PAPER_RANKS,
  PRESETS,
  Llama,
  LlamaConfig,
  apply_rope,
  count_params,
  loss_fn,
  rope_angles,
)

TINY = LlamaConfig.preset("tiny")


@pytest.fixture(scope="module")
def model() -> Llama:
  """A tiny model shared by the read-only tests."""
  return Llama(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch() -> jax.Array:
  """A fixed batch of random bytes of shape (4, max_seq_len + 1)."""
  rng = np.random.default_rng(1)
  return jnp.asarray(rng.integers(0, 256, (4, TINY.max_seq_len + 1)), jnp.int32)


# Jitted entry points: one compilation each is much cheaper than eager dispatch.
forward = nnx.jit(lambda model, tokens: model(tokens))
jit_loss = nnx.jit(loss_fn)
jit_value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))


def test_presets_build_valid_configs() -> None:
  for name in PRESETS:
    config = LlamaConfig.preset(name)
    # byte-level presets; the GaLore paper's sizes keep its 32000-token vocabulary
    assert config.vocab_size == (32000 if name in PAPER_RANKS else 256)
    assert config.scan_layers == (name in PAPER_RANKS)
    assert config.dim % config.n_heads == 0
  assert LlamaConfig.preset("tiny", n_layers=1).n_layers == 1
  with pytest.raises(ValueError, match="preset"):
    LlamaConfig.preset("huge")


def test_forward_shape_and_dtype(model: Llama, batch: jax.Array) -> None:
  tokens = batch[:, :-1]
  logits = forward(model, tokens)
  assert logits.shape == (*tokens.shape, TINY.vocab_size)
  assert logits.dtype == jnp.float32


def test_linear_kernels_are_2d_without_bias(model: Llama) -> None:
  linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Linear)]
  assert len(linears) == 7 * TINY.n_layers + 1
  for layer in linears:
    assert layer.bias is None
    assert layer.kernel.ndim == 2
    assert layer.kernel.shape == (layer.in_features, layer.out_features)


def test_param_count_matches_formula(model: Llama) -> None:
  c = TINY
  per_block = 4 * c.dim * c.dim + 3 * c.dim * c.hidden_dim + 2 * c.dim
  expected = 2 * c.vocab_size * c.dim + c.n_layers * per_block + c.dim
  assert count_params(model) == expected


def test_too_long_sequence_raises(model: Llama) -> None:
  with pytest.raises(ValueError, match="max_seq_len"):
    model(jnp.zeros((1, TINY.max_seq_len + 1), jnp.int32))


def test_causality(model: Llama, batch: jax.Array) -> None:
  tokens = batch[:, :-1]
  cut = 10
  changed = tokens.at[:, cut:].set((tokens[:, cut:] + 7) % 256)
  before, after = forward(model, tokens), forward(model, changed)
  np.testing.assert_allclose(before[:, :cut], after[:, :cut], atol=1e-6, rtol=0)
  assert not np.allclose(before[:, cut:], after[:, cut:], atol=1e-6)


def test_initial_loss_near_uniform(model: Llama, batch: jax.Array) -> None:
  loss = float(jit_loss(model, batch))
  assert abs(loss - math.log(256)) < 0.5


def test_grads_are_finite(model: Llama, batch: jax.Array) -> None:
  loss, grads = jit_value_and_grad(model, batch)
  assert np.isfinite(float(loss))
  leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
  assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  for leaf in leaves:
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in leaves)


def test_jitted_adam_step_decreases_loss(batch: jax.Array) -> None:
  model = Llama(TINY, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model: Llama, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  first = float(train_step(model, optimizer, batch))
  second = float(train_step(model, optimizer, batch))
  assert second < first
  assert float(jit_loss(model, batch)) < first


def test_rope_preserves_norms() -> None:
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 3, 8)), jnp.float32)
  cos, sin = rope_angles(12, 8)
  rotated = apply_rope(x, cos, sin)
  assert rotated.shape == x.shape
  np.testing.assert_allclose(
    jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
  )
  # Position 0 is not rotated.
  np.testing.assert_allclose(rotated[:, 0], x[:, 0], atol=1e-6)


def test_rope_scores_depend_on_relative_position() -> None:
  q, k = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8)), jnp.float32)
  cos, sin = rope_angles(16, 8)
  tile = lambda v: jnp.broadcast_to(v, (16, 1, 8))
  rq, rk = apply_rope(tile(q), cos, sin)[:, 0], apply_rope(tile(k), cos, sin)[:, 0]
  np.testing.assert_allclose(rq[5] @ rk[2], rq[13] @ rk[10], rtol=1e-4)


@pytest.mark.parametrize(
  ("overrides", "field"),
  [
    (dict(dim=30, n_heads=4), "dim"),
    (dict(dim=24, n_heads=8), "head_dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(rope_theta=0.0), "rope_theta"),
  ],
)
def test_config_validation(overrides: dict, field: str) -> None:
  with pytest.raises(ValueError, match=rf"LlamaConfig\.{field}\b") as info:
    LlamaConfig.preset("tiny", **overrides)
  assert "\n" not in str(info.value)
