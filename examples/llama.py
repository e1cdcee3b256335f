"""A small Llama-style decoder-only language model written with Flax NNX.

The model works on raw bytes (a 256-token vocabulary by default) and follows the
usual Llama recipe: pre-norm residual blocks with RMSNorm, causal multi-head
self-attention with rotary position embeddings (RoPE), a SwiGLU feed-forward
network, a final RMSNorm and an untied output head.

Every dense projection is an ``nnx.Linear`` without bias whose ``kernel`` is a
2-D ``(in_features, out_features)`` matrix, so that a later helper can replace
them with low-rank layers.

With ``LlamaConfig(scan_layers=True)`` the blocks are *stacked*: one
:class:`Block` whose every parameter has a leading layer axis (a kernel is
``(n_layers, in_features, out_features)``), run by ``nnx.scan``, as large JAX
models are written (compile time stays flat in depth).  The stacked model is
initialised with the same values as the unrolled one (the blocks are drawn in
the same order and stacked), so both compute the same function; low-rank
optimizers see each kernel as ``n_layers`` matrices through the reshape rule
:data:`STACKED_RULE` (``olr.low_rank(..., reshape=STACKED_RULE)``).

Example:
    >>> config = LlamaConfig.preset("tiny")
    >>> model = Llama(config, rngs=nnx.Rngs(0))
    >>> logits = model(jnp.zeros((2, 16), jnp.int32))  # (2, 16, 256)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lowrank as olr

__all__ = [
  "PRESETS",
  "Attention",
  "Block",
  "Llama",
  "LlamaConfig",
  "PAPER_RANKS",
  "STACKED_RULE",
  "SwiGLU",
  "apply_rope",
  "count_params",
  "loss_fn",
  "rope_angles",
]

_INIT_STD = 0.02

PRESETS: dict[str, dict[str, Any]] = {
  # For unit tests: compiles and runs in well under a second.
  "tiny": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_seq_len=32),
  # The CPU default: a few hundred steps in a few minutes on 2 cores.
  "small": dict(dim=128, n_layers=4, n_heads=4, hidden_dim=352, max_seq_len=128),
  # A larger model meant for an accelerator.
  "base": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, max_seq_len=512),
  # The LLaMA shapes the GaLore paper pre-trains (paper 003, Table 4; the heads
  # and layers of "1b" as in the reference GaLore repository's llama_1b.json,
  # 32 heads and 24 layers: the paper's table lists them swapped, and 2048 is
  # not divisible by 24 heads), plus LLaMA-13B's.  Sequence length 256 and
  # a 32000-token vocabulary as in the paper's runs; bf16 parameters are
  # `param_dtype=jnp.bfloat16`.  Stacked (scanned) blocks: these are planned
  # at full size, never unrolled.
  "60m": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, max_seq_len=256,
              vocab_size=32000, scan_layers=True),
  "130m": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=256,
               vocab_size=32000, scan_layers=True),
  "350m": dict(dim=1024, n_layers=24, n_heads=16, hidden_dim=2736, max_seq_len=256,
               vocab_size=32000, scan_layers=True),
  "1b": dict(dim=2048, n_layers=24, n_heads=32, hidden_dim=5461, max_seq_len=256,
             vocab_size=32000, scan_layers=True),
  "7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=256,
             vocab_size=32000, scan_layers=True),
  "13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=256,
              vocab_size=32000, scan_layers=True),
}

PAPER_RANKS: dict[str, int] = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024,
                               "13b": 1024}
"""GaLore's rank for each of its model sizes (paper 003, Tables 2 and 4; 13B not
in the paper: 7B's rank)."""


STACKED_RULE = olr.stacked(layer_axis=0)
"""Reshape rule of the scanned model: the library's public :func:`optax_lowrank.stacked`.

``(n_layers, in, out)`` kernels are ``n_layers`` separate ``in × out``
matrices, and the ``(n_layers, dim)`` norm scales beside them stacks of
vectors (never projected); the embedding and head keep the default treatment.
Kept under this name for the code that imports it.
"""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of the :class:`Llama` model.

  Attributes:
      vocab_size: Number of token ids (256 for byte-level text).
      dim: Width of the residual stream.
      n_layers: Number of transformer blocks.
      n_heads: Number of attention heads; must divide ``dim``.
      hidden_dim: Inner width of the SwiGLU feed-forward network.
      max_seq_len: Longest input sequence the model accepts.
      rope_theta: Base of the RoPE frequency schedule.
      norm_eps: Epsilon of every RMSNorm.
      dtype: Computation dtype of the layers.
      param_dtype: Storage dtype of the parameters.
      scan_layers: stack the blocks along a leading layer axis and run them
          with ``nnx.scan`` (see the module docstring).
      remat: with ``scan_layers``, recompute each block's activations in the
          backward pass (``nnx.remat``) instead of keeping them: activation
          memory of one block instead of all.
  """

  vocab_size: int = 256
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  hidden_dim: int = 352
  max_seq_len: int = 128
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: bool = False

  def __post_init__(self) -> None:
    """Checks that the fields describe a buildable model.

    Raises:
        ValueError: If a size is not positive, ``dim`` is not divisible by
            ``n_heads``, or the head dimension is odd (RoPE rotates pairs).
    """
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
    if self.rope_theta <= 0:
      raise ValueError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta!r}")
    if self.norm_eps <= 0:
      raise ValueError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps!r}")
    if self.dim % self.n_heads:
      raise ValueError(
        f"LlamaConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})"
      )
    if self.head_dim % 2:
      raise ValueError(
        f"LlamaConfig.head_dim (dim / n_heads = {self.head_dim}) must be even for RoPE"
      )

  @property
  def head_dim(self) -> int:
    """Width of a single attention head."""
    return self.dim // self.n_heads

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
    """Builds a named configuration, optionally overriding some fields.

    Args:
        name: One of the keys of :data:`PRESETS` (``"tiny"``, ``"small"``, ``"base"``,
            and the GaLore paper's sizes ``"60m"`` … ``"7b"`` plus ``"13b"``).
        **overrides: Fields to replace in the preset.

    Returns:
        The resulting configuration.

    Raises:
        ValueError: If ``name`` is not a known preset.
    """
    if name not in PRESETS:
      raise ValueError(f"unknown LlamaConfig preset {name!r}; choose from {sorted(PRESETS)}")
    return cls(**{**PRESETS[name], **overrides})


def rope_angles(seq_len: int, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
  """Computes the RoPE cosine and sine tables.

  Channel pair ``i`` (channels ``i`` and ``i + head_dim // 2``) at position
  ``p`` is rotated by the angle ``p * theta ** (-2 i / head_dim)``.

  Args:
      seq_len: Number of positions (starting at 0).
      head_dim: Width of an attention head; must be even.
      theta: Base of the frequency schedule.

  Returns:
      ``(cos, sin)``, each of shape ``(seq_len, head_dim // 2)`` in float32.
  """
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates query or key vectors by their position-dependent angles.

  Args:
      x: Array of shape ``(..., seq_len, n_heads, head_dim)``.
      cos: Cosine table of shape ``(seq_len, head_dim // 2)``.
      sin: Sine table of shape ``(seq_len, head_dim // 2)``.

  Returns:
      The rotated array, same shape and dtype as ``x``. Each channel pair is
      rotated in its plane, so the norm of every head vector is unchanged.
  """
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  cos = cos[:, None, :]  # broadcast over heads
  sin = sin[:, None, :]
  rotated = jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
  return rotated.astype(x.dtype)


def _linear(
  config: LlamaConfig, d_in: int, d_out: int, *, std: float, rngs: nnx.Rngs
) -> nnx.Linear:
  """Creates a bias-free dense layer with a normal(0, std) kernel."""
  return nnx.Linear(
    d_in,
    d_out,
    use_bias=False,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    kernel_init=nnx.initializers.normal(stddev=std),
    rngs=rngs,
  )


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """Creates an RMSNorm over the model width."""
  return nnx.RMSNorm(
    config.dim,
    epsilon=config.norm_eps,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    rngs=rngs,
  )


def _residual_std(config: LlamaConfig) -> float:
  """Initial std of the projections that write into the residual stream."""
  return _INIT_STD / math.sqrt(2 * config.n_layers)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary position embeddings."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs) -> None:
    """Creates the query, key, value and output projections.

    Args:
        config: Model configuration.
        rngs: Random number generators for initialisation.
    """
    self.n_heads = config.n_heads
    self.head_dim = config.head_dim
    self.rope_theta = config.rope_theta
    self.wq = _linear(config, config.dim, config.dim, std=_INIT_STD, rngs=rngs)
    self.wk = _linear(config, config.dim, config.dim, std=_INIT_STD, rngs=rngs)
    self.wv = _linear(config, config.dim, config.dim, std=_INIT_STD, rngs=rngs)
    self.wo = _linear(config, config.dim, config.dim, std=_residual_std(config), rngs=rngs)

  def _heads(self, x: jax.Array) -> jax.Array:
    """Reshapes ``(batch, seq, dim)`` into ``(batch, seq, heads, head_dim)``."""
    return x.reshape(*x.shape[:-1], self.n_heads, self.head_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies attention to a ``(batch, seq, dim)`` input.

    Args:
        x: Normalised residual stream of shape ``(batch, seq, dim)``.

    Returns:
        The attention output, shape ``(batch, seq, dim)``.
    """
    cos, sin = rope_angles(x.shape[-2], self.head_dim, self.rope_theta)
    q = apply_rope(self._heads(self.wq(x)), cos, sin)
    k = apply_rope(self._heads(self.wk(x)), cos, sin)
    v = self._heads(self.wv(x))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.wo(out.reshape(x.shape[:-1] + (-1,)))


class SwiGLU(nnx.Module):
  """Gated feed-forward network: ``w2(silu(w1 x) * w3 x)``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs) -> None:
    """Creates the gate, up and down projections.

    Args:
        config: Model configuration.
        rngs: Random number generators for initialisation.
    """
    self.w1 = _linear(config, config.dim, config.hidden_dim, std=_INIT_STD, rngs=rngs)
    self.w3 = _linear(config, config.dim, config.hidden_dim, std=_INIT_STD, rngs=rngs)
    self.w2 = _linear(config, config.hidden_dim, config.dim, std=_residual_std(config), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the feed-forward network to a ``(..., dim)`` input."""
    return self.w2(nnx.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
  """One pre-norm transformer block: attention then SwiGLU, each residual."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs) -> None:
    """Creates the two norms and the two sub-layers.

    Args:
        config: Model configuration.
        rngs: Random number generators for initialisation.
    """
    self.attention_norm = _rms_norm(config, rngs)
    self.attention = Attention(config, rngs=rngs)
    self.ffn_norm = _rms_norm(config, rngs)
    self.ffn = SwiGLU(config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Updates the ``(batch, seq, dim)`` residual stream."""
    x = x + self.attention(self.attention_norm(x))
    return x + self.ffn(self.ffn_norm(x))


class Llama(nnx.Module):
  """Decoder-only Llama-style language model."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs) -> None:
    """Creates the embedding, the blocks, the final norm and the output head.

    Args:
        config: Model configuration.
        rngs: Random number generators for initialisation.
    """
    self.config = config
    self.embed = nnx.Embed(
      config.vocab_size,
      config.dim,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      embedding_init=nnx.initializers.normal(stddev=_INIT_STD),
      rngs=rngs,
    )
    blocks = [Block(config, rngs=rngs) for _ in range(config.n_layers)]
    self.layers = stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
    self.norm = _rms_norm(config, rngs)
    self.output = _linear(config, config.dim, config.vocab_size, std=_INIT_STD, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Computes next-token logits.

    Args:
        tokens: Integer token ids of shape ``(batch, seq)`` with
            ``seq <= config.max_seq_len``.

    Returns:
        Float32 logits of shape ``(batch, seq, vocab_size)``.

    Raises:
        ValueError: If the sequence is longer than ``config.max_seq_len``.
    """
    seq_len = tokens.shape[-1]
    if seq_len > self.config.max_seq_len:
      raise ValueError(
        f"sequence length {seq_len} exceeds LlamaConfig.max_seq_len ({self.config.max_seq_len})"
      )
    x = self.embed(tokens)
    if self.config.scan_layers:
      x = _scan_blocks(self.layers, x, self.config.remat)
    else:
      for layer in self.layers:
        x = layer(x)
    return self.output(self.norm(x)).astype(jnp.float32)


def stack_blocks(blocks: list[Block]) -> Block:
  """One :class:`Block` whose every variable stacks those of ``blocks`` on axis 0."""
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(b) for b in blocks))
  return nnx.merge(graphdef, stacked)


def _scan_blocks(layers: Block, x: jax.Array, remat: bool) -> jax.Array:
  """Run the stacked ``layers`` over ``x``, one block per scan step."""

  def body(block: Block, h: jax.Array) -> jax.Array:
    return block(h)

  if remat:
    body = nnx.remat(body)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def scan(h: jax.Array, block: Block) -> jax.Array:
    return body(block, h)

  return scan(x, layers)


def loss_fn(model: Llama, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of a batch of token windows.

  Args:
      model: The language model.
      batch: Integer array of shape ``(batch, seq + 1)``; positions ``[:-1]``
          are the inputs and positions ``[1:]`` the targets.

  Returns:
      The scalar mean cross-entropy in nats.
  """
  logits = model(batch[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])
  return losses.mean()


def count_params(model: nnx.Module) -> int:
  """Counts the scalar entries of all ``nnx.Param`` variables of a model."""
  params = nnx.state(model, nnx.Param)
  return sum(int(leaf.size) for leaf in jax.tree.leaves(params))
