"""An Equinox model whose blocks are stacked by ``eqx.filter_vmap``.

Equinox params are a plain pytree with no axis names, so the layer axis is
given with one argument, ``reshape=olr.stacked()``: every leaf with three or
more axes has its leading axis as the layer axis, and the ``(layers, d)``
biases and norm weights beside them are stacks of vectors, never projected.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax


class Block(eqx.Module):
  norm: eqx.nn.LayerNorm
  up: eqx.nn.Linear
  down: eqx.nn.Linear

  def __init__(self, dim: int, hidden: int, key: jax.Array):
    k1, k2 = jax.random.split(key)
    self.norm = eqx.nn.LayerNorm(dim)
    self.up = eqx.nn.Linear(dim, hidden, key=k1)     # weight (hidden, dim)
    self.down = eqx.nn.Linear(hidden, dim, key=k2)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Model(eqx.Module):
  embed: eqx.nn.Linear
  blocks: Block          # every array with a leading layer axis
  head: eqx.nn.Linear

  def __init__(self, dim: int = 32, hidden: int = 64, layers: int = 4, *, key: jax.Array):
    k1, k2, k3 = jax.random.split(key, 3)
    self.embed = eqx.nn.Linear(8, dim, key=k1)
    self.blocks = eqx.filter_vmap(lambda k: Block(dim, hidden, k))(jax.random.split(k2, layers))
    self.head = eqx.nn.Linear(dim, 1, key=k3)

  def __call__(self, x):  # one example (8,)
    dynamic, static = eqx.partition(self.blocks, eqx.is_array)

    def step(h, layer):
      return eqx.combine(layer, static)(h), None

    h, _ = jax.lax.scan(step, self.embed(x), dynamic)
    return self.head(h)


def data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.PRNGKey(seed), (64, 8))
  return x, jnp.sin(x[:, :1]) + x[:, 1:2] ** 2


def loss_fn(model: Model, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def make_step(tx: optax.GradientTransformation):
  @eqx.filter_jit
  def step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss

  return step
