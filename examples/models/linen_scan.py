"""A linen transformer with ``nn.scan``'d blocks and a ``TrainState``.

The kernels carry logical axis names (``nn.with_logical_partitioning``, as
MaxText's do) and ``nn.scan`` inserts ``"layers"`` for the stacked axis
(``metadata_params={nn.PARTITION_NAME: "layers"}``).  ``olr.galore`` reads
those names from the boxed params (and gradients) ``TrainState`` hands it, so
with no argument every stacked kernel is ``layers`` matrices, each with its
own basis, and the unnamed ``(layers, d)`` biases and norm scales beside them
are stacks of vectors, never projected.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 256
  dim: int = 64
  heads: int = 4
  hidden: int = 256
  layers: int = 4
  seq: int = 16


def _named(names):
  return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Block(nn.Module):
  """Pre-norm attention and MLP; ``(x, None) -> (x, None)`` for ``nn.scan``."""

  config: Config

  @nn.compact
  def __call__(self, x, _):
    c = self.config
    head_dim = c.dim // c.heads
    h = nn.LayerNorm()(x)
    qkv = [nn.DenseGeneral((c.heads, head_dim), kernel_init=_named(("embed", "heads", "kv")),
                           name=name)(h) for name in ("query", "key", "value")]
    q, k, v = qkv
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    attn = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    x = x + nn.DenseGeneral(c.dim, axis=(-2, -1), kernel_init=_named(("heads", "kv", "embed")),
                            name="out")(o)
    h = nn.LayerNorm()(x)
    h = nn.Dense(c.hidden, kernel_init=_named(("embed", "mlp")), name="up")(h)
    x = x + nn.Dense(c.dim, kernel_init=_named(("mlp", "embed")), name="down")(jax.nn.gelu(h))
    return x, None


class Transformer(nn.Module):
  config: Config

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    x = nn.Embed(c.vocab, c.dim, embedding_init=_named(("vocab", "embed")))(tokens)
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=c.layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(c, name="blocks")(x, None)
    x = nn.LayerNorm()(x)
    return nn.Dense(c.vocab, kernel_init=_named(("embed", "vocab")), name="head")(x)


def batch(config: Config, seed: int = 0) -> jax.Array:
  """Random token ids ``(8, seq + 1)``: inputs and next-token targets."""
  return jax.random.randint(jax.random.PRNGKey(seed), (8, config.seq + 1), 0, config.vocab)


def create_state(tx: optax.GradientTransformation, config: Config = Config(),
                 seed: int = 0) -> train_state.TrainState:
  """A ``TrainState`` over the boxed params (the names stay with them)."""
  model = Transformer(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), batch(config)[:, :-1])["params"]
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def abstract_params(config: Config = Config()):
  """The boxed params as ``jax.ShapeDtypeStruct`` (nothing allocated), for memory plans."""
  model = Transformer(config)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), batch(config)[:, :-1])["params"]


def loss_fn(params, apply_fn, tokens) -> jax.Array:
  logits = apply_fn({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@jax.jit
def train_step(state: train_state.TrainState, tokens: jax.Array):
  loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, tokens)
  return state.apply_gradients(grads=grads), loss
