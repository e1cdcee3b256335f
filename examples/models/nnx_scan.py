"""A Flax NNX model whose blocks are made by ``nnx.vmap`` and run by ``nnx.scan``.

Kernels carry logical axis names (``nnx.with_partitioning``); the transforms,
given ``transform_metadata={nnx.PARTITION_NAME: "layers"}``, insert
``"layers"`` for the stacked axis.  ``nnx.Optimizer`` hands ``olr.galore`` the
``Param`` variables at ``init``, so the names are read there: with no argument
every stacked kernel is ``layers`` matrices, each with its own basis, and the
``(layers, d)`` biases and norm scales beside them are never projected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LAYERS = {nnx.PARTITION_NAME: "layers"}


def _named(names):
  # eager_sharding=False: only the names, no device placement (no mesh needed)
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names, eager_sharding=False)


class Block(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, hidden, kernel_init=_named(("embed", "mlp")), rngs=rngs)
    self.down = nnx.Linear(hidden, dim, kernel_init=_named(("mlp", "embed")), rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Model(nnx.Module):
  def __init__(self, dim: int = 32, hidden: int = 64, layers: int = 4, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
    def make_blocks(rngs):
      return Block(dim, hidden, rngs=rngs)

    self.embed = nnx.Linear(8, dim, kernel_init=_named(("features", "embed")), rngs=rngs)
    self.blocks = make_blocks(rngs)
    self.head = nnx.Linear(dim, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=LAYERS)
    def run(h, block):
      return block(h)

    return self.head(run(self.embed(x), self.blocks))


def data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(jax.random.PRNGKey(seed), (64, 8))
  return x, jnp.sin(x[:, :1]) + x[:, 1:2] ** 2


def loss_fn(model: Model, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


def make(tx: optax.GradientTransformation, seed: int = 0) -> tuple[Model, nnx.Optimizer]:
  model = Model(rngs=nnx.Rngs(seed))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
