"""Adam with block-wise 8-bit optimizer state (8-bit Adam).

Dettmers, Lewis, Shleifer and Zettlemoyer 2022, "8-bit Optimizers via
Block-wise Quantization" (ICLR 2022, arXiv:2110.02861).  Between steps Adam's
moments are stored with one byte per element and one float32 absmax scale per
block of ``block_size`` elements; each step decodes them, runs Adam in float32
and re-encodes them:

.. math::

  m_t &= \\beta_1 \\hat m_{t-1} + (1 - \\beta_1) g_t, \\qquad
  v_t = \\beta_2 \\hat v_{t-1} + (1 - \\beta_2) g_t^2, \\\\
  u_t &= \\frac{m_t / (1 - \\beta_1^t)}{\\sqrt{v_t / (1 - \\beta_2^t)} + \\epsilon}, \\qquad
  \\hat m_t = Q_s(m_t), \\quad \\hat v_t = Q_u(\\sqrt{v_t})^2,

with ``Q_s`` / ``Q_u`` the signed / unsigned dynamic tree codes of
:mod:`optax_lowrank.quantization` (``"dynamic8"``, ``"dynamic8_unsigned"``).
Re-encoding uses unbiased stochastic rounding by default (a counter-based hash
of ``(seed, step, leaf, moment, element)``: no key in the state);
``stochastic_rounding=False`` rounds to nearest, as bitsandbytes does.  Leaves
under ``min_8bit_size`` elements keep float32 moments.

Memory: a leaf of ``n ≥ min_8bit_size`` elements holds ``2·⌈n/block_size⌉·
(block_size + 4)`` bytes (0.254× float32 Adam's ``8·n`` at ``block_size=256``),
a smaller one ``8·n``, plus 4 bytes of step count (:func:`adam_8bit_state_nbytes`).
During a step the decoded float32 moments exist for one leaf at a time, and a
leaf above ``chunk_size`` elements is updated in chunks of whole blocks, so
about ``12·chunk_size`` bytes of temporaries instead of ``12·n``.  Why these
codes, ``√v``, stochastic rounding and chunks, with measurements:
``docs/api/quantization.md``.
"""

# No ``from __future__ import annotations``: ``adam_8bit``'s signature carries
# the real ``optax.ScalarOrSchedule`` (optax's test suite reads it).
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree

from optax_lowrank import quantization

__all__ = [
  "DEFAULT_CHUNK_SIZE",
  "MU_FORMAT",
  "NU_FORMAT",
  "ScaleByAdam8bitState",
  "adam_8bit",
  "adam_8bit_state_nbytes",
  "scale_by_adam_8bit",
]

MU_FORMAT = "dynamic8"  # signed dynamic tree code for the first moment
NU_FORMAT = "dynamic8_unsigned"  # unsigned dynamic tree code for sqrt(second moment)
DEFAULT_CHUNK_SIZE = 2**20  # elements; leaves above it are updated chunk by chunk


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  ``mu`` and ``nu`` have the structure of the params; each leaf of ``n`` elements
  is a :class:`~optax_lowrank.quantization.QuantizedArray` when
  ``n >= min_8bit_size`` and a float32 array of the param's shape otherwise.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  mu: optax.Updates  # leaf: QuantizedArray("dynamic8") of m, or float32[*shape] m.
  # leaf: QuantizedArray("dynamic8_unsigned") of sqrt(v), or float32[*shape] v.
  nu: optax.Updates


def _is_quantized(x: Any) -> bool:
  return isinstance(x, quantization.QuantizedArray)


def _check_decay(name: str, value: Any) -> None:
  if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
    raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def _static_int(name: str, value: Any, minimum: int) -> int:
  """``value`` as a Python int ``>= minimum``; it fixes array shapes, so it is static."""
  is_int = isinstance(value, (int, np.integer)) or (
    isinstance(value, (jax.Array, np.ndarray))
    and not isinstance(value, jax.core.Tracer)
    and value.ndim == 0
    and jnp.issubdtype(value.dtype, jnp.integer)
  )
  if isinstance(value, bool) or not is_int or int(value) < minimum:
    raise ValueError(
      f"`{name}` must be a static int >= {minimum}, got {value!r} (with "
      f"optax.inject_hyperparams, list '{name}' in static_args)."
    )
  return int(value)


def _check_float_leaves(params: Any, caller: str) -> None:
  """Raises naming the first leaf that is not a real floating-point array."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"{caller}: leaf {jax.tree_util.keystr(path)} with shape "
        f"{tuple(jnp.shape(leaf))} has dtype {dtype}; only real floating-point "
        "leaves are supported."
      )


def _rounding_seeds(seed: int | jax.Array, count: jax.Array, tree: Any) -> tuple[Any, Any]:
  """Two trees (first/second moment) of stochastic-rounding seeds, one per leaf.

  The seed of leaf ``i`` of moment ``j`` at step ``count`` is
  ``mix_seed(seed, count, i, j)``: distinct for every (step, leaf, moment).
  """
  leaves, treedef = jax.tree.flatten(tree)
  return tuple(
    jax.tree.unflatten(
      treedef, [quantization.mix_seed(seed, count, i, moment) for i in range(len(leaves))]
    )
    for moment in (0, 1)
  )


def scale_by_adam_8bit(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  block_size: int = 256,
  min_8bit_size: int = 4096,
  *,
  stochastic_rounding: bool = True,
  seed: int | jax.Array = 0,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> optax.GradientTransformation:
  """Rescales updates by Adam with 8-bit block-wise quantized moments.

  Same update rule and bias correction as :func:`optax.scale_by_adam` (with
  ``eps_root = 0``), computed in float32; the moments carried between steps are
  quantized as described in the module docstring (first moment: signed dynamic
  tree code; second moment: ``sqrt(v)`` in the unsigned dynamic tree code; one
  float32 absmax scale per block). Updates are returned in each gradient's dtype.

  ``block_size`` and ``min_8bit_size`` fix array shapes and must be static
  Python ints: with :func:`optax.inject_hyperparams` pass
  ``static_args=("block_size", "min_8bit_size")``.

  Args:
    b1: decay rate of the first moment, in [0, 1).
    b2: decay rate of the second moment, in [0, 1).
    eps: term added to the denominator, ``>= 0``.
    block_size: elements per quantization block (positive int).
    min_8bit_size: leaves with fewer elements keep float32 moments
      (non-negative int; 0 quantizes every leaf).
    stochastic_rounding: re-quantize the moments with unbiased stochastic
      rounding (default) instead of round-to-nearest (bitsandbytes' choice);
      see the module docstring for why.
    seed: seed of the rounding noise, an int in [0, 2**32) or an integer array
      (e.g. from :func:`optax.inject_hyperparams`). Step ``t``, leaf ``i`` and
      moment ``j`` round with ``quantization.mix_seed(seed, t, i, j)``, so no
      key is stored and runs are reproducible.
    chunk_size: leaves of more than ``chunk_size`` elements are updated in
      chunks of whole blocks of at most ``max(chunk_size, block_size)``
      elements, so that only one chunk's float32 moments exist at a time (see
      the module docstring); a static int ``>= 0``, 0 updates every leaf whole.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`ScaleByAdam8bitState`. State bytes:
    ``4 + sum over leaves of (2 * ceil(n / block_size) * (block_size + 4)`` if
    ``n >= min_8bit_size`` else ``8 * n)``; see :func:`adam_8bit_state_nbytes`.

  Raises:
    ValueError: at construction for out-of-range arguments (named); at init for a
      non-floating or complex leaf (named by its path and shape).

  (Long because the per-leaf step is a closure over the static hyper-parameters
  above, as in optax's own transformations.)
  """
  _check_decay("b1", b1)
  _check_decay("b2", b2)
  if isinstance(eps, (int, float)) and eps < 0:
    raise ValueError(f"`eps` must be >= 0, got {eps!r}.")
  block_size = _static_int("block_size", block_size, 1)
  min_8bit_size = _static_int("min_8bit_size", min_8bit_size, 0)
  chunk_size = _static_int("chunk_size", chunk_size, 0)
  if isinstance(seed, bool) or (isinstance(seed, int) and not 0 <= seed < 2**32):
    raise ValueError(f"`seed` must be an int in [0, 2**32), got {seed!r}.")

  def use_8bit(x: jax.Array) -> bool:
    return math.prod(jnp.shape(x)) >= min_8bit_size

  def encode_mu(m: jax.Array, seed: jax.Array | None = None) -> Any:
    return quantization.quantize(m, MU_FORMAT, block_size, seed=seed) if use_8bit(m) else m

  def encode_nu(v: jax.Array, seed: jax.Array | None = None) -> Any:
    if not use_8bit(v):
      return v
    return quantization.quantize(jnp.sqrt(v), NU_FORMAT, block_size, seed=seed)

  def decode_mu(m: Any) -> jax.Array:
    return quantization.dequantize(m) if _is_quantized(m) else m

  def decode_nu(v: Any) -> jax.Array:
    return jnp.square(quantization.dequantize(v)) if _is_quantized(v) else v

  def zeros(x: jax.Array, format: str) -> Any:
    if use_8bit(x):
      return quantization.quantized_zeros(jnp.shape(x), format, block_size)
    return jnp.zeros(jnp.shape(x), jnp.float32)

  def init_fn(params: optax.Params) -> ScaleByAdam8bitState:
    _check_float_leaves(params, "scale_by_adam_8bit")
    return ScaleByAdam8bitState(
      count=jnp.zeros([], jnp.int32),
      mu=jax.tree.map(lambda x: zeros(x, MU_FORMAT), params),
      nu=jax.tree.map(lambda x: zeros(x, NU_FORMAT), params),
    )

  def adam_step(g, m, v, count_inc, quantized):
    """Adam on float32 moments ``m``, ``v`` (decoded); the update in ``g``'s dtype."""
    grad = g.astype(jnp.float32)
    if quantized:
      # v == 0 implies m == 0 in exact arithmetic; enforce it after decoding so
      # a second moment rounded to zero cannot turn a small m into m / eps.
      m = jnp.where(v > 0, m, 0.0)
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * jnp.square(grad)
    m_hat = optax.tree.bias_correction(m, b1, count_inc)
    v_hat = optax.tree.bias_correction(v, b2, count_inc)
    return (m_hat / (jnp.sqrt(v_hat) + eps)).astype(g.dtype), m, v

  def leaf_update(g, m_stored, v_stored, count_inc, m_seed, v_seed):
    if _is_quantized(m_stored) and 0 < chunk_size < m_stored.size:
      return _chunked_update(g, m_stored, v_stored, count_inc, m_seed, v_seed,
                             adam_step=adam_step, block_size=block_size,
                             chunk_size=chunk_size, stochastic_rounding=stochastic_rounding)
    m, v = decode_mu(m_stored), decode_nu(v_stored)
    u, m, v = adam_step(g, m, v, count_inc, _is_quantized(v_stored))
    if stochastic_rounding:
      return u, encode_mu(m, m_seed), encode_nu(v, v_seed)
    return u, encode_mu(m), encode_nu(v)

  def update_fn(
    updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
    del params
    count_inc = optax.safe_increment(state.count)
    flat, treedef = jax.tree.flatten(updates)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    if stochastic_rounding:
      seeds = _rounding_seeds(seed, count_inc, updates)
      mu_seeds, nu_seeds = (treedef.flatten_up_to(t) for t in seeds)
    else:
      mu_seeds = nu_seeds = [None] * len(flat)
    out, new_mus, new_nus = [], [], []
    done = []  # arrays that exist only once the previous leaf is finished
    for g, m, v, m_seed, v_seed in zip(flat, mus, nus, mu_seeds, nu_seeds, strict=True):
      # Decode this leaf only after the previous one is re-encoded, so that
      # XLA holds the float moments of one leaf at a time, not of all leaves.
      for t in done:
        m = quantization.tie(m, t) if _is_quantized(m) else m
        v = quantization.tie(v, t) if _is_quantized(v) else v
      u, m, v = leaf_update(g, m, v, count_inc, m_seed, v_seed)
      out.append(u)
      new_mus.append(m)
      new_nus.append(v)
      done = [x.codes if _is_quantized(x) else x for x in (m, v)]
    new_updates = jax.tree.unflatten(treedef, out)
    new_mu = jax.tree.unflatten(treedef, new_mus)
    new_nu = jax.tree.unflatten(treedef, new_nus)
    return new_updates, ScaleByAdam8bitState(count=count_inc, mu=new_mu, nu=new_nu)

  return optax.GradientTransformation(init_fn, update_fn)


def _chunked_update(g, m_stored, v_stored, count_inc, m_seed, v_seed, *, adam_step,
                    block_size: int, chunk_size: int, stochastic_rounding: bool):
  """:func:`scale_by_adam_8bit`'s update of a large quantized leaf, chunk by chunk.

  ``adam_step(g, m, v, count_inc, quantized)`` is Adam on decoded moments.  A
  loop over the ``full`` chunks of ``size`` elements reads chunk ``k`` of
  the gradient and of the codes and scales, and writes the update and the
  new codes and scales over what it read: the loop carries the flat
  gradient and the state, so XLA updates them in place and holds the
  float32 moments of one chunk.  The remaining ``tail`` elements (fewer
  than a chunk; the last block may be partial) are updated whole after.
  """
  bs, n = block_size, m_stored.size
  per_chunk = max(1, chunk_size // bs)  # blocks
  size = per_chunk * bs
  full, tail = divmod(n, size)

  def chunk_of(q, codes, scales, length):
    return quantization.QuantizedArray(codes, scales, (length,), np.dtype(jnp.float32),
                                       q.format, bs)

  def step(k, g_k, mc, ms, vc, vs, length):
    m = quantization.dequantize(chunk_of(m_stored, mc, ms, length))
    v = jnp.square(quantization.dequantize(chunk_of(v_stored, vc, vs, length)))
    u, m, v = adam_step(g_k, m, v, count_inc, True)
    if stochastic_rounding:
      k = jnp.asarray(k, jnp.uint32)
      seeds = (quantization.mix_seed(m_seed, k), quantization.mix_seed(v_seed, k))
    else:
      seeds = (None, None)
    m = quantization.quantize(m, MU_FORMAT, bs, seed=seeds[0])
    v = quantization.quantize(jnp.sqrt(v), NU_FORMAT, bs, seed=seeds[1])
    return u, m.codes, m.scales, v.codes, v.scales

  def update_chunk(k, carry, length, sizes):
    """Chunk ``k`` (``length`` elements from ``k·size``): read it, update it, write it back.

    ``sizes``: how much of each buffer of ``carry`` (gradient, codes and scales
    of both moments) the chunk covers.
    """
    at, at_block = k * size, k * per_chunk
    starts = (at, at, at_block, at, at_block)
    parts = [jax.lax.dynamic_slice(buf, (i,), (n,))
             for buf, i, n in zip(carry, starts, sizes, strict=True)]
    out = step(k, *parts, length)
    return tuple(jax.lax.dynamic_update_slice(buf, new, (i,))
                 for buf, new, i in zip(carry, out, starts, strict=True))

  carry = (jnp.ravel(g), m_stored.codes, m_stored.scales, v_stored.codes, v_stored.scales)
  whole = (size, size, per_chunk, size, per_chunk)
  carry = jax.lax.fori_loop(0, full, lambda k, c: update_chunk(k, c, size, whole), carry)
  if tail:  # the rest, to the end of every buffer (the last block may be partial)
    at, at_block = full * size, full * per_chunk
    rest = tuple(buf.shape[0] - i for buf, i in
                 zip(carry, (at, at, at_block, at, at_block), strict=True))
    carry = update_chunk(full, carry, tail, rest)
  flat, mc, ms, vc, vs = carry
  return (flat.reshape(jnp.shape(g)), dataclasses.replace(m_stored, codes=mc, scales=ms),
          dataclasses.replace(v_stored, codes=vc, scales=vs))


def adam_8bit(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  block_size: int | None = None,
  min_8bit_size: int | None = None,
  mask: Any | None = None,
  *,
  stochastic_rounding: bool = True,
  seed: int | jax.Array = 0,
  chunk_size: int | None = None,
) -> optax.GradientTransformation:
  """8-bit Adam (AdamW when ``weight_decay > 0``).

  ``chain(scale_by_adam_8bit(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``: the update is
  ``-lr * (u_t + weight_decay * params)`` with ``u_t`` from
  :func:`scale_by_adam_8bit`, i.e. decoupled weight decay as in
  :func:`optax.adamw` (then ``update`` needs ``params``). With a Python
  ``weight_decay == 0`` the weight-decay stage does no work (its state, empty,
  is kept, so the state tree is the same as with an array ``weight_decay``);
  an array or schedule ``weight_decay`` (e.g. from
  :func:`optax.inject_hyperparams`) is applied, so ``params`` are needed.

  ``block_size``, ``min_8bit_size`` and ``chunk_size`` default to ``None``
  (256, 4096 and :data:`DEFAULT_CHUNK_SIZE`):
  they fix array shapes, and ``None`` stays static under
  :func:`optax.inject_hyperparams`, which turns numeric defaults into arrays.

  Args:
    learning_rate: a float or an :data:`optax.Schedule`.
    b1, b2, eps, block_size, min_8bit_size, stochastic_rounding, seed, chunk_size: see
      :func:`scale_by_adam_8bit`.
    weight_decay: decoupled weight-decay coefficient, ``>= 0``.
    mask: optional pytree/callable selecting leaves to decay, as in
      :func:`optax.add_decayed_weights`.

  Returns:
    A :class:`optax.GradientTransformation`. Its state memory is that of
    :func:`scale_by_adam_8bit` (the other stages are stateless).
  """
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
  decays = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)
  decay = optax.add_decayed_weights(weight_decay, mask)
  if not decays:  # same (empty) state, no work, no params needed
    decay = optax.GradientTransformation(decay.init, lambda u, s, params=None: (u, s))
  return optax.chain(
    scale_by_adam_8bit(
      b1,
      b2,
      eps,
      256 if block_size is None else block_size,
      4096 if min_8bit_size is None else min_8bit_size,
      stochastic_rounding=stochastic_rounding,
      seed=seed,
      chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
    ),
    decay,
    optax.scale_by_learning_rate(learning_rate),
  )


def adam_8bit_state_nbytes(params: Any, block_size: int = 256, min_8bit_size: int = 4096) -> int:
  """Analytic bytes of the :func:`scale_by_adam_8bit` state for ``params``.

  ``4 + sum_leaves (2 * ceil(n / block_size) * (block_size + 4) if n >= min_8bit_size
  else 8 * n)``, with ``n`` the leaf size. ``params`` may hold arrays or
  :class:`jax.ShapeDtypeStruct`. Equals ``quantization.nbytes(state)``.
  """
  sizes = (math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
  return 4 + sum(
    2 * -(-n // block_size) * (block_size + 4) if n >= min_8bit_size else 8 * n for n in sizes
  )
