"""Layer-wise updates for scanned models: the optimizer runs inside the backward pass.

A scanned model is ``loss = head(outer, block(layer_{L-1}, … block(layer_0,
embed(outer, batch))))`` with every leaf of ``layers`` stacked on a leading
layer axis.  The ordinary step takes ``jax.grad`` of the whole model (the
full-size gradient of every layer is alive at once) and then ``tx.update``.
:func:`make_step` instead

1. runs ``embed`` and a forward ``lax.scan`` over the layers that saves each
   block's *input* ``h_l`` (nothing else), then ``head`` and its VJP, giving
   ``∂L/∂h_L`` and the head's part of ``∂L/∂outer``;
2. runs a reverse ``lax.scan``: at layer ``l`` it takes ``jax.vjp`` of the
   block from its saved input (the block's forward is recomputed once, as
   with ``jax.checkpoint`` around each block), giving ``G_l = ∂L/∂layer_l``
   and ``∂L/∂h_l``; then ``tx.update`` on layer ``l``'s slice of the params
   and of the optimizer state, and writes the new slice back in place
   (``lax.dynamic_update_index_in_dim`` on the scan's carry);
3. takes the VJP of ``embed``, adds the head's part and updates ``outer``.

So one layer's weight gradient ``G_l`` is alive at a time; the stack's
full-size gradient never exists.  ``tx`` sees ``outer`` as one tree and every
layer as a tree of its own (state made by ``jax.vmap(tx.init)`` over the
layer axis): the trajectory equals the ordinary step with the layers given to
``tx`` as ``L`` separate trees, each with its own state.  That holds for any
*layer-separable* ``tx`` — one whose update of a layer depends only on that
layer's gradient, params and state (Adam, SGD, momentum, ``olr.low_rank``,
8-bit Adam...).  Transformations that couple layers, such as
``optax.clip_by_global_norm``, are detected at ``init`` (data-flow analysis of
``tx.update``'s jaxpr on two layers) and refused; ``clip=`` offers three
documented ways of clipping instead.

Random bases.  Every layer's ``olr.low_rank`` state gets the base key
``fold_in(PRNGKey(seed), l)`` (``l`` = the layer's index on the stacked axis;
``outer`` keeps ``PRNGKey(seed)``), so layer ``l``'s leaf ``j`` at refresh
``t`` is drawn from ``fold_in(fold_in(fold_in(PRNGKey(seed), l), t), j)``:
layers draw different bases, and a layer-wise Flora run is a deterministic
function of ``seed``.  :func:`layer_state` makes that state for one layer (it
is what a reference step with separate trees must use).

Memory: params + optimizer state + one layer's gradient + the saved block
inputs ``L × batch × seq × dim`` (+ one block's internal activations while
its VJP runs) + ``outer``'s gradient.  Reference: Lv et al. 2023 (LOMO,
arXiv:2306.09782) fused the update into the backward pass; Zhao et al. 2024
(GaLore, arXiv:2403.03507, §5) use per-layer weight updates to pre-train
LLaMA-7B on one 24 GB card.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lowrank import distributed as distributed_lib
from optax_lowrank.separability import check_separable

__all__ = [
    "CLIP_MODES",
    "LayerwiseState",
    "LayerwiseStep",
    "NNXParts",
    "check_separable",
    "layer_state",
    "make_step",
    "split_nnx",
]

CLIP_MODES = ("layer", "previous", "two_pass")


class LayerwiseState(NamedTuple):
  """State of a layer-wise step.

  Attributes:
    outer: ``tx``'s state for the ``outer`` params (one tree).
    layers: ``tx``'s states of the layers, stacked: every leaf has the
      leading layer axis ``L`` (layer ``l``'s state is its slice ``l``, made by
      :func:`layer_state`).
    grad_norm: ``()``, float32 (float64 for float64 params): the global gradient norm
      ``sqrt(‖G_outer‖² + Σ_l ‖G_l‖²)`` of the last step, before any clipping
      (0 before the first step).  ``clip="previous"`` clips with it.
  """

  outer: optax.OptState
  layers: optax.OptState
  grad_norm: jax.Array


class LayerwiseStep(NamedTuple):
  """``init(outer, layers, batch=None) -> state`` and
  ``update(outer, layers, state, batch) -> (outer, layers, state, loss)``."""

  init: Callable[..., LayerwiseState]
  update: Callable[..., tuple[Any, Any, LayerwiseState, Any]]


def layer_state(tx: optax.GradientTransformation, layer: Any, index: int | jax.Array) -> Any:
  """``tx``'s initial state for layer ``index`` of a layer-wise step.

  ``tx.init(layer)`` with the base key of every ``olr.low_rank`` state in it
  replaced by ``fold_in(key, index)`` (see the module docstring); everything
  else as ``tx.init`` makes it.  A reference step that gives the layers to
  ``tx`` as separate trees gets the layer-wise trajectory with these states.
  """
  return distributed_lib.assign_worker(tx.init(layer), index, "independent")


# ----------------------------------------------------------------------------
# The step: tree helpers.


def _split_float(tree: Any) -> tuple[list, list, Any]:
  """Leaves of ``tree`` split into (differentiable, others) and the treedef."""
  leaves, treedef = jax.tree.flatten(tree)
  floats = [x if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else None for x in leaves]
  others = [None if f is not None else x for f, x in zip(floats, leaves)]
  return floats, others, treedef


def _merge_float(floats: list, others: list, treedef: Any) -> Any:
  return jax.tree.unflatten(treedef, [o if f is None else f for f, o in zip(floats, others)])


def _norm_dtype(tree: Any) -> Any:
  """The dtype gradient norms are summed in: at least float32."""
  return jnp.promote_types(optax.tree.dtype(tree, "promote"), jnp.float32)


def _sumsq(tree: Any, dtype: Any) -> jax.Array:
  return optax.tree.norm(optax.tree.cast(tree, dtype), squared=True)


def _scaled(tree: Any, factor: jax.Array | None) -> Any:
  if factor is None:
    return tree
  return jax.tree.map(lambda g: (g * factor.astype(g.dtype)), tree)


def _clip_factor(norm: jax.Array, clip_norm: float) -> jax.Array:
  return jnp.where(norm > clip_norm, clip_norm / jnp.where(norm > 0, norm, 1.0), 1.0)


def _index(tree: Any, i: jax.Array | int) -> Any:
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _write(tree: Any, new: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), i, 0),
                      tree, new)


def _apply(tx: optax.GradientTransformation, grads: Any, state: Any, params: Any) -> tuple:
  """``tx``'s update applied: ``(new params, new state)``."""
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


# ----------------------------------------------------------------------------
# The step: micro-batches.


def _split_microbatches(batch: Any, k: int) -> Any:
  """Every leaf of ``batch`` reshaped ``(B, ...) -> (k, B/k, ...)``; ``batch`` itself for k = 1."""
  if k == 1:
    return batch

  def split(path, x):
    if jnp.ndim(x) == 0 or x.shape[0] % k:
      raise ValueError(
          f"`microbatches={k}` needs every batch leaf's leading axis divisible by {k}: "
          f"batch{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(x))}"
      )
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])

  return jax.tree_util.tree_map_with_path(split, batch)


def _per_micro(f: Callable[..., Any], k: int, *xs: Any) -> Any:
  """``f`` on every micro-batch slice of ``xs`` (results stacked); ``f(*xs)`` for k = 1."""
  if k == 1:
    return f(*xs)
  return jax.lax.map(lambda a: f(*a), xs)


def _micro_sum(f: Callable[[Any], tuple[Any, Any]], xs: Any, k: int, start: Any) -> tuple:
  """``(start + Σ_m g_m, y)`` for ``(g_m, y_m) = f(xs_m)`` over the ``k`` micro-batches.

  ``y`` stacks the ``y_m`` on a leading micro-batch axis; for k = 1, ``xs`` is
  one batch (no micro-batch axis) and ``y = f(xs)[1]``.  The sum is a scan
  carry (one tree like ``g``), never ``k`` stacked gradients.
  """
  if k == 1:
    g, y = f(xs)
    return jax.tree.map(jnp.add, start, g), y

  def step(acc, xs_m):
    g, y = f(xs_m)
    return jax.tree.map(jnp.add, acc, g), y

  return jax.lax.scan(step, start, xs)


# ----------------------------------------------------------------------------
# The step: checks.


def _check_arguments(clip: str | None, clip_norm: float | None, microbatches: int) -> None:
  if clip is not None and clip not in CLIP_MODES:
    raise ValueError(f"`clip` must be None or one of {CLIP_MODES}, got {clip!r}")
  if clip is not None and (clip_norm is None or not clip_norm > 0):
    raise ValueError(f"`clip={clip!r}` needs `clip_norm` > 0, got {clip_norm!r}")
  if clip is None and clip_norm is not None:
    raise ValueError("`clip_norm` was given without `clip`: pass clip=\"layer\", \"previous\" "
                     "or \"two_pass\"")
  if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"`microbatches` must be an int >= 1, got {microbatches!r}")


def _leading_axis(layers: Any) -> int:
  """The number of layers: the leading axis every leaf of ``layers`` shares."""
  flat = jax.tree_util.tree_flatten_with_path(layers)[0]
  if not flat:
    raise ValueError("`layers` has no leaves: nothing to scan over")
  first_path, first = flat[0]
  if jnp.ndim(first) == 0:
    raise ValueError(f"`layers` leaf {jax.tree_util.keystr(first_path)} is a scalar; every leaf "
                     "needs the leading layer axis")
  n = first.shape[0]
  for path, leaf in flat:
    if jnp.ndim(leaf) == 0 or leaf.shape[0] != n:
      raise ValueError(
          f"`layers` leaves disagree on the leading layer axis: "
          f"{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))}, but "
          f"{jax.tree_util.keystr(first_path)} has shape {tuple(first.shape)} ({n} layers)"
      )
  return n


class _Model(NamedTuple):
  """:func:`make_step`'s three functions in one calling convention."""

  embed: Callable[..., Any]  # (outer, batch) -> (h, context)
  block: Callable[..., Any]  # (layer, h, context) -> h
  vjp_block: Callable[..., Any]  # the block as the reverse pass differentiates it
  head: Callable[..., Any]  # (outer, h, batch) -> (loss, aux)
  has_aux: bool  # update returns (loss, aux), not loss
  k: int  # micro-batches


def _model(embed_fn, block_fn, head_fn, *, with_context: bool, has_aux: bool,
           remat_policy: Callable[..., Any] | None, microbatches: int) -> _Model:
  def embed(outer, batch):
    out = embed_fn(outer, batch)
    return out if with_context else (out, ())

  def block(layer, h, context):
    return block_fn(layer, h, context) if with_context else block_fn(layer, h)

  def head(outer, h, batch):
    out = head_fn(outer, h, batch)
    return out if has_aux else (out, ())

  vjp_block = block if remat_policy is None else jax.checkpoint(block, policy=remat_policy)
  return _Model(embed, block, vjp_block, head, has_aux, microbatches)


def _check_block_shapes(model: _Model, outer: Any, layers: Any, batch: Any) -> None:
  """Python-time check that a block maps h to an h of the same shape and dtype."""
  micro = jax.eval_shape(lambda b: _split_microbatches(b, model.k), batch)
  if model.k > 1:
    micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)
  h, context = jax.eval_shape(model.embed, outer, micro)
  out = jax.eval_shape(model.block, jax.eval_shape(_index, layers, 0), h, context)
  h_flat, h_def = jax.tree_util.tree_flatten_with_path(h)
  out_flat, out_def = jax.tree_util.tree_flatten_with_path(out)
  if h_def != out_def:
    raise ValueError(f"`block_fn` must return a tree like its input h: got {out_def}, "
                     f"expected {h_def}")
  for (path, a), (_, b) in zip(h_flat, out_flat):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(
          f"`block_fn` changes h{jax.tree_util.keystr(path)}: input "
          f"{tuple(a.shape)} {a.dtype}, output {tuple(b.shape)} {b.dtype}; a scanned "
          "block must return h with the shape and dtype of its input"
      )


# ----------------------------------------------------------------------------
# The step: forward, head, reverse pass, embed.


def _forward(model: _Model, outer: Any, layers: Any, batch: Any) -> tuple:
  """``embed``, then a scan over the layers saving each block's input.

  Returns ``(h_L, hs, context)``: ``hs`` stacks ``h_0 … h_{L-1}`` on a
  leading layer axis (then, for k > 1, the micro-batch axis).
  """
  h0, context = _per_micro(lambda b: model.embed(outer, b), model.k, batch)

  def step(h, layer):
    return _per_micro(lambda h_m, c_m: model.block(layer, h_m, c_m), model.k, h, context), h

  h_last, hs = jax.lax.scan(step, h0, layers)
  return h_last, hs, context


def _head_vjp(model: _Model, outer: Any, h_last: Any, batch: Any) -> tuple:
  """``(loss, aux, ∂L/∂outer from the head, ∂L/∂h_L)``.

  ``L`` is the mean of the micro-batch losses, so each micro-batch's VJP
  starts from ``1/k``; ``aux`` is stacked over micro-batches when k > 1.
  """
  def one(xs):
    h_m, b_m = xs
    loss, vjp, aux = jax.vjp(lambda o, h: model.head(o, h, b_m), outer, h_m, has_aux=True)
    g_outer, g_h = vjp(jnp.ones_like(loss) / model.k)
    return g_outer, (loss, aux, g_h)

  zeros = jax.tree.map(jnp.zeros_like, outer)
  g_outer, (losses, aux, g_h) = _micro_sum(one, (h_last, batch), model.k, zeros)
  return jnp.mean(losses), aux, g_outer, g_h


def _block_vjp(model: _Model, layer: Any, h: Any, g_h: Any, context: tuple) -> tuple:
  """``(G_l, (∂L/∂h_l, ∂L/∂context floats))`` of one block from its saved input ``h``.

  The block's forward is recomputed here (its VJP); ``G_l`` is summed over
  micro-batches, the other two stay per micro-batch.  ``context`` is
  :func:`_split_float`'s triple: only its inexact leaves are differentiated.
  """
  floats, others, treedef = context

  def one(xs):
    g_h_m, h_m, floats_m, others_m = xs

    def f(layer, h, floats):
      return model.vjp_block(layer, h, _merge_float(floats, others_m, treedef))

    _, vjp = jax.vjp(f, layer, h_m, floats_m)
    g_layer, g_h_in, g_floats = vjp(g_h_m)
    return g_layer, (g_h_in, g_floats)

  return _micro_sum(one, (g_h, h, floats, others), model.k, jax.tree.map(jnp.zeros_like, layer))


def _layer_updater(tx: optax.GradientTransformation, scale: Callable[..., Any],
                   n_layers: int) -> Callable[..., tuple]:
  """``update(i, G_l, ‖G_l‖², state_l, layer_l) -> (layer_l, state_l)``: ``tx`` on one layer."""
  def update(i, grads, sumsq, state, layer):
    grads = _scaled(grads, scale(sumsq))
    # The update runs inside a cond that is always taken: its results are
    # then buffers of one layer's size, written back after every read of
    # the stacks.  Fused into the in-place writes instead, the old slices
    # would be read after the stack is overwritten, and XLA copies whole
    # stacks (params and moments) at every layer to allow it.
    return jax.lax.cond(i < n_layers, lambda op: _apply(tx, *op), lambda op: op[2:0:-1],
                        (grads, state, layer))

  return update


def _reverse_pass(model: _Model, hs: Any, context: Any, g_h: Any, layers: Any, layer_states: Any,
                  norm_dtype: Any, update_layer: Callable[..., tuple] | None) -> tuple:
  """The reverse scan over layers ``L-1 … 0``, from ``∂L/∂h_L`` to ``∂L/∂h_0``.

  At layer ``l``: :func:`_block_vjp`, then (with ``update_layer``, see
  :func:`_layer_updater`) the new params and state of layer ``l`` written
  into the stacks in place.  Without it, only the gradients flow.

  Returns:
    ``(∂L/∂h_0, ∂L/∂context floats, layers, layer_states, Σ_l ‖G_l‖²)``.
  """
  n_layers = jax.tree.leaves(hs)[0].shape[0]
  context = _split_float(context)

  def body(carry, i):
    g_h, g_ctx, layers, layer_states, sumsq = carry
    layer = _index(layers, i)
    g_layer, (g_h, g_ctx_l) = _block_vjp(model, layer, _index(hs, i), g_h, context)
    g_ctx = [None if a is None else a + b for a, b in zip(g_ctx, g_ctx_l)]
    layer_sumsq = _sumsq(g_layer, norm_dtype)
    if update_layer is not None:
      new_layer, new_state = update_layer(i, g_layer, layer_sumsq, _index(layer_states, i), layer)
      layers, layer_states = _write(layers, new_layer, i), _write(layer_states, new_state, i)
    return (g_h, g_ctx, layers, layer_states, sumsq + layer_sumsq), None

  g_ctx = [None if f is None else jnp.zeros_like(f) for f in context[0]]
  carry = (g_h, g_ctx, layers, layer_states, jnp.zeros([], norm_dtype))
  carry, _ = jax.lax.scan(body, carry, jnp.arange(n_layers, dtype=jnp.int32), reverse=True)
  return carry


def _embed_vjp(model: _Model, outer: Any, batch: Any, g_h0: Any, g_ctx: list,
               g_outer: Any) -> Any:
  """``g_outer`` plus ``embed``'s VJP of ``(∂L/∂h_0, ∂L/∂context floats)``."""
  def one(xs):
    b_m, g_h_m, g_ctx_m = xs

    def f(o):
      h, ctx = model.embed(o, b_m)
      floats, others, _ = _split_float(ctx)
      return (h, floats), others

    _, vjp, _ = jax.vjp(f, outer, has_aux=True)
    (g,) = vjp((g_h_m, g_ctx_m))
    return g, None

  return _micro_sum(one, (batch, g_h0, g_ctx), model.k, g_outer)[0]


def _gradient_scale(clip: str | None, clip_norm: float | None,
                    global_norm: jax.Array) -> Callable[[jax.Array], jax.Array | None]:
  """``scale(‖G‖²) -> factor``: what a tree's gradient ``G`` is multiplied by.

  ``None`` (no clipping); ``"layer"``: from the tree's own norm; otherwise
  (``"previous"``, ``"two_pass"``) from ``global_norm``, the same for every tree.
  """
  if clip is None:
    return lambda sumsq: None
  if clip == "layer":
    return lambda sumsq: _clip_factor(jnp.sqrt(sumsq), clip_norm)
  factor = _clip_factor(global_norm, clip_norm)
  return lambda sumsq: factor


# ----------------------------------------------------------------------------
# The step: init and update.


def _init(model: _Model, tx: optax.GradientTransformation, outer: Any, layers: Any, batch: Any,
          *, separable: bool, fold_keys: bool) -> LayerwiseState:
  n_layers = _leading_axis(layers)
  if separable:
    check_separable(tx, jax.eval_shape(_index, layers, 0))
  if batch is not None:
    _check_block_shapes(model, outer, layers, batch)
  if fold_keys:
    layer_states = jax.vmap(functools.partial(layer_state, tx))(
        layers, jnp.arange(n_layers, dtype=jnp.int32))
  else:
    layer_states = jax.vmap(tx.init)(layers)
  return LayerwiseState(outer=tx.init(outer), layers=layer_states,
                        grad_norm=jnp.zeros([], _norm_dtype((outer, layers))))


def _update(model: _Model, tx: optax.GradientTransformation, clip: str | None,
            clip_norm: float | None, outer: Any, layers: Any, state: LayerwiseState,
            batch: Any) -> tuple:
  """One step (the module docstring's 1-3): ``(outer, layers, state, loss)``."""
  n_layers = _leading_axis(layers)
  _check_block_shapes(model, outer, layers, batch)
  batch = _split_microbatches(batch, model.k)
  norm_dtype = state.grad_norm.dtype
  h_last, hs, context = _forward(model, outer, layers, batch)
  loss, aux, g_outer, g_h = _head_vjp(model, outer, h_last, batch)

  def reverse(update_layer):
    return _reverse_pass(model, hs, context, g_h, layers, state.layers, norm_dtype, update_layer)

  global_norm = state.grad_norm  # "previous"
  if clip == "two_pass":  # a first reverse pass that only sums ‖G_l‖² (and gives G_outer)
    g_h0, g_ctx, _, _, layer_sumsq = reverse(None)
    g_outer = _embed_vjp(model, outer, batch, g_h0, g_ctx, g_outer)
    global_norm = jnp.sqrt(_sumsq(g_outer, norm_dtype) + layer_sumsq)
  scale = _gradient_scale(clip, clip_norm, global_norm)
  g_h0, g_ctx, layers, layer_states, layer_sumsq = reverse(_layer_updater(tx, scale, n_layers))
  if clip != "two_pass":
    g_outer = _embed_vjp(model, outer, batch, g_h0, g_ctx, g_outer)

  outer_sumsq = _sumsq(g_outer, norm_dtype)
  outer, outer_state = _apply(tx, _scaled(g_outer, scale(outer_sumsq)), state.outer, outer)
  state = LayerwiseState(outer=outer_state, layers=layer_states,
                         grad_norm=jnp.sqrt(outer_sumsq + layer_sumsq))
  return outer, layers, state, ((loss, aux) if model.has_aux else loss)


def make_step(
    embed_fn: Callable[..., Any],
    block_fn: Callable[..., Any],
    head_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    clip: str | None = None,
    clip_norm: float | None = None,
    microbatches: int = 1,
    with_context: bool = False,
    has_aux: bool = False,
    remat_policy: Callable[..., Any] | None = None,
    check_separable: bool = True,
    fold_keys: bool = True,
) -> LayerwiseStep:
  """A train step that updates each layer of a scanned model inside the backward pass.

  Args:
    embed_fn: ``embed_fn(outer, batch) -> h`` (with ``with_context=True``:
      ``-> (h, context)``).
    block_fn: ``block_fn(layer, h) -> h`` on one slice of the stacked
      ``layers`` (with ``with_context=True``: ``block_fn(layer, h, context)``);
      the output must have the shape and dtype of ``h`` (checked with
      ``jax.eval_shape``).
    head_fn: ``head_fn(outer, h, batch) -> loss`` (a scalar; with
      ``has_aux=True``: ``-> (loss, aux)``).
    tx: any optax transformation, applied to ``outer`` as one tree and to
      every layer's slice as its own tree; it must be layer-separable (see
      the module docstring), which ``init`` checks.
    clip: how to clip the gradient to the global norm ``clip_norm`` without
      coupling layers inside ``tx``: ``None`` (no clipping); ``"layer"``: each
      tree (``outer``, each layer) clipped by its own norm, ``G ← G·min(1,
      c/‖G‖)``; ``"previous"``: every tree scaled by ``min(1, c/N_{t-1})``
      with the previous step's global norm (no clipping at the first step);
      ``"two_pass"``: exactly ``optax.clip_by_global_norm(c)`` over the whole
      model, at the cost of a second reverse pass (the first only sums
      ``‖G_l‖²``; the forward pass and the head are shared).
    clip_norm: ``c > 0``, required with ``clip``.
    microbatches: ``k``: every ``batch`` leaf's leading axis is split into
      ``k`` equal micro-batches and the step is the one-batch step on their
      concatenation (loss and gradient are means over the micro-batches, so
      ``head_fn``'s loss should be a mean over examples).  The micro-batches
      run one at a time through each block; layer ``l``'s gradient is summed
      over them before ``tx`` sees it, so the accumulator is that one layer's
      gradient and refresh steps see the full gradient of their layer.  Costs
      the saved block inputs of all ``k`` micro-batches.
    with_context: ``embed_fn`` also returns a ``context`` pytree (masks,
      positions, rotary tables...) passed unchanged to every block.  Its
      inexact leaves are differentiated (their cotangents summed over the
      blocks and passed back through ``embed_fn``), the others are constants.
    has_aux: ``head_fn`` returns ``(loss, aux)``; ``update`` then returns
      ``(loss, aux)`` in place of ``loss`` (with ``microbatches > 1``, ``aux``
      is stacked over micro-batches).
    remat_policy: a ``jax.checkpoint`` policy for the block inside the
      reverse pass.  ``None``: the VJP keeps the block's residuals while it
      runs (one block's activations); a policy (e.g.
      ``jax.checkpoint_policies.nothing_saveable``) keeps fewer of them and
      recomputes the rest once more.  The forward pass always saves only each
      block's input.
    check_separable: check at ``init`` that ``tx`` does not couple layers.
    fold_keys: give layer ``l``'s ``olr.low_rank`` states the base key
      ``fold_in(key, l)`` (:func:`layer_state`), so that layers draw different
      random bases; ``False``: every layer keeps ``tx.init``'s key (each layer
      then draws the same Gaussian bases, as ``L`` separate trees initialised
      with ``tx.init`` would).

  Returns:
    A :class:`LayerwiseStep` ``(init, update)``:
    ``state = init(outer, layers, batch=None)`` (with ``batch``, the shapes
    of ``embed_fn``/``block_fn`` are checked there too);
    ``outer, layers, state, loss = update(outer, layers, state, batch)``, the
    loss before the update.  ``update`` is a pure function: jit it, and donate
    the params and state for in-place updates,
    ``jax.jit(step.update, donate_argnums=(0, 1, 2))``.

  Raises:
    ValueError: at construction, for an unknown ``clip``, a missing or bad
      ``clip_norm`` or ``microbatches``; at ``init``, for ``layers`` whose
      leaves disagree on the leading axis and for a ``tx`` that couples layers;
      at ``init`` (with ``batch``) or at the first trace of ``update``, for a
      ``block_fn`` whose output differs from its input in shape or dtype —
      each naming the leaf path and shape.
  """
  _check_arguments(clip, clip_norm, microbatches)
  model = _model(embed_fn, block_fn, head_fn, with_context=with_context, has_aux=has_aux,
                 remat_policy=remat_policy, microbatches=microbatches)

  def init(outer, layers, batch=None):
    return _init(model, tx, outer, layers, batch, separable=check_separable, fold_keys=fold_keys)

  def update(outer, layers, state, batch):
    return _update(model, tx, clip, clip_norm, outer, layers, state, batch)

  return LayerwiseStep(init=init, update=update)


# ----------------------------------------------------------------------------
# Flax NNX: a scanned model as (embed_fn, block_fn, head_fn, outer, layers).


@dataclasses.dataclass(frozen=True)
class NNXParts:
  """A scanned NNX model split for :func:`make_step` (see :func:`split_nnx`).

  Attributes:
    embed_fn, block_fn, head_fn: the three functions of :func:`make_step`, on
      pure ``nnx.State`` trees of the params.
    outer: the params outside the stack (an ``nnx.State``).
    layers: the stacked params of the scanned blocks (an ``nnx.State``, every
      leaf with the leading layer axis).
    merge: ``merge(outer, layers) -> model``, a new model with these params.
  """

  embed_fn: Callable[..., Any]
  block_fn: Callable[..., Any]
  head_fn: Callable[..., Any]
  outer: Any
  layers: Any
  merge: Callable[[Any, Any], Any]


def split_nnx(
    model: Any,
    embed: Callable[..., Any],
    head: Callable[..., Any],
    *,
    stack: str = "layers",
    block: Callable[..., Any] | None = None,
) -> NNXParts:
  """Split a scanned NNX model into what :func:`make_step` takes.

  Args:
    model: an ``nnx.Module`` whose attribute ``stack`` is one module with
      every param stacked on a leading layer axis (as ``nnx.scan`` runs it,
      e.g. ``examples.llama.Llama`` with ``scan_layers=True``).  It must hold
      no state other than ``nnx.Param`` (no batch statistics, no RNG state).
    embed: ``embed(model, batch) -> h`` (may return ``(h, context)`` for
      ``make_step(..., with_context=True)``); it must not use the stack.
    head: ``head(model, h, batch) -> loss``; it must not use the stack.
    stack: the attribute holding the stacked blocks.
    block: ``block(block_module, h, *context) -> h``; by default
      ``block_module(h, *context)``.

  Returns:
    :class:`NNXParts`; ``parts.merge(outer, layers)`` puts trained params
    back into a copy of the model.

  Raises:
    ValueError: when ``model`` has no attribute ``stack`` or holds state that
      is not an ``nnx.Param``.
  """
  from flax import nnx  # flax is optional for the rest of the module

  if not hasattr(model, stack):
    raise ValueError(f"the model has no attribute {stack!r} holding the stacked blocks")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("split_nnx handles models whose state is all nnx.Param; found other "
                     f"variables: {jax.tree.map(jnp.shape, rest)}")
  params = nnx.to_pure_dict(params)
  layers = params.pop(stack)
  outer = params
  block_def = nnx.graphdef(getattr(model, stack))
  layer_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), layers)
  call = block if block is not None else (lambda module, h, *context: module(h, *context))

  def full_model(outer, layers):
    return nnx.merge(graphdef, {**outer, stack: layers})

  def absent_stack(outer):
    # The stack is never read by embed/head; zeros of it are dead code under jit.
    shapes = jax.tree.map(lambda s: jnp.zeros((1,) + s.shape, s.dtype), layer_shapes)
    return full_model(outer, shapes)

  def embed_fn(outer, batch):
    return embed(absent_stack(outer), batch)

  def head_fn(outer, h, batch):
    return head(absent_stack(outer), h, batch)

  def block_fn(layer, h, *context):
    return call(nnx.merge(block_def, layer), h, *context)

  return NNXParts(embed_fn=embed_fn, block_fn=block_fn, head_fn=head_fn, outer=outer,
                  layers=layers, merge=full_model)
