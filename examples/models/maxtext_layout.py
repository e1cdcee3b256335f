"""A plain parameter tree in MaxText's scanned layout (``param_scan_axis=1``).

MaxText stacks its decoder layers along axis 1 of every parameter: MLP
kernels ``(embed, layers, mlp)``, attention kernels ``(embed, layers, heads,
head_dim)`` and ``(heads, layers, head_dim, embed)``, norm scales
``(embed, layers)``.  As a plain tree (no axis names), the layer axis is given
with one argument, ``reshape=olr.stacked(layer_axis=1)``.  (MaxText itself
builds its params with linen logical names, ``"layers"`` among them: trained
boxed, as in :mod:`examples.models.linen_scan`, no argument is needed.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VOCAB, EMBED, LAYERS, HEADS, HEAD_DIM, MLP = 64, 32, 3, 2, 16, 64


def init(seed: int = 0) -> dict:
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
  normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / jnp.sqrt(fan_in)
  layers = {
      "self_attention": {
          "query": {"kernel": normal((EMBED, LAYERS, HEADS, HEAD_DIM), EMBED)},
          "key": {"kernel": normal((EMBED, LAYERS, HEADS, HEAD_DIM), EMBED)},
          "value": {"kernel": normal((EMBED, LAYERS, HEADS, HEAD_DIM), EMBED)},
          "out": {"kernel": normal((HEADS, LAYERS, HEAD_DIM, EMBED), HEADS * HEAD_DIM)},
      },
      "mlp": {"wi": {"kernel": normal((EMBED, LAYERS, MLP), EMBED)},
              "wo": {"kernel": normal((MLP, LAYERS, EMBED), MLP)}},
      "pre_self_attention_layer_norm": {"scale": jnp.ones((EMBED, LAYERS))},
      "post_self_attention_layer_norm": {"scale": jnp.ones((EMBED, LAYERS))},
  }
  return {"token_embedder": {"embedding": normal((VOCAB, EMBED), 1.0)},
          "decoder": {"layers": layers, "decoder_norm": {"scale": jnp.ones((EMBED,))}}}


def _rms(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def apply(params: dict, tokens: jax.Array) -> jax.Array:
  """Logits ``(batch, seq, vocab)``: embed, scan the layers over axis 1, tied head."""
  emb = params["token_embedder"]["embedding"]
  x = emb[tokens]
  per_layer = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), params["decoder"]["layers"])

  def layer(x, p):
    a = p["self_attention"]
    h = _rms(x, p["pre_self_attention_layer_norm"]["scale"])
    q, k, v = (jnp.einsum("bse,ehd->bshd", h, a[n]["kernel"]) for n in ("query", "key", "value"))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(HEAD_DIM), -1)
    x = x + jnp.einsum("bqhd,hde->bqe", jnp.einsum("bhqk,bkhd->bqhd", w, v), a["out"]["kernel"])
    h = _rms(x, p["post_self_attention_layer_norm"]["scale"])
    return x + jax.nn.gelu(h @ p["mlp"]["wi"]["kernel"]) @ p["mlp"]["wo"]["kernel"], None

  x, _ = jax.lax.scan(layer, x, per_layer)
  return _rms(x, params["decoder"]["decoder_norm"]["scale"]) @ emb.T


def loss_fn(params: dict, tokens: jax.Array) -> jax.Array:
  logits = apply(params, tokens[:, :-1])
  labels = jax.nn.one_hot(tokens[:, 1:], VOCAB)
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))


def batch(seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (4, 9), 0, VOCAB)
