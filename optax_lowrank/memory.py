"""Exact memory accounting: optimizer state by kind and leaf, and compiled step peaks.

Two questions a user asks before training:

1. *How big is the optimizer state?*  :func:`state_bytes` answers exactly (no
   allocation: it traces ``tx.init`` with ``jax.eval_shape``) and splits the
   bytes into the inner optimizer's statistics, stored projectors, PRNG keys,
   gradient histories and counters, per parameter leaf and in total.
   :func:`compare` puts several optimizers side by side with ``optax.adam`` and
   ``optax.adafactor`` on the same parameters.

2. *How much memory does a whole train step need?*  :func:`step_memory`
   compiles the step (``jax.jit(...).lower(...).compile()``) and reads XLA's
   buffer assignment (``memory_analysis()``): arguments, outputs, temporaries
   and the aliased (donated) bytes.  ``peak = arguments + outputs + temporaries
   − aliased`` is what the step holds at once on the device; on the adapter
   path it excludes the ``m×n`` weight gradients the gradient path must form.

3. *Will the train step fit on my card?*  :func:`plan_train_step` compiles
   the whole step from shapes (``jax.ShapeDtypeStruct``, ``nnx.eval_shape``),
   never allocating, and returns XLA's figures beside the analytic parts
   (weights, optimizer state, weight gradients, saved activations); where the
   backend computes bf16 products in f32 (XLA on the CPU) it also gives the
   figure to carry to a GPU or TPU: the same buffer assignment without the
   CPU's upcasts (:func:`cpu_only_buffers`), plus LAPACK's SVD workspace
   (:class:`StepPlan`).  ``count=`` plans one step kind (an ordinary step or
   a refresh); :func:`plan_function` plans any other step (a merge).

All figures are bytes; :func:`format_table` prints them in MiB.  Reading
XLA's compiled output (:class:`CompiledPlan`, :func:`plan_compiled`,
:func:`plan_function`, :func:`cpu_only_buffers`, :func:`peak_buffers`,
:func:`lapack_workspace_bytes`) lives in :mod:`optax_lowrank.compiled_plans`;
those names are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank.compiled_plans import (
    _LOW_FLOATS,
    _PLAN_ONLY,
    CompiledPlan,
    CpuOnlyBuffers,
    PeakBuffer,
    StepMemory,
    _memory_of,
    _target_platform,
    backend_upcasts_low_precision,
    cpu_only_buffers,
    lapack_workspace_bytes,
    peak_buffers,
    plan_compiled,
    plan_function,
)
from optax_lowrank.leaves import path_names

__all__ = [
    "StateBytes",
    "state_bytes",
    "compare",
    "StepMemory",
    "step_memory",
    "format_table",
    "CompiledPlan",
    "StepPlan",
    "plan_compiled",
    "plan_function",
    "plan_train_step",
    "lower_train_step",
    "PeakBuffer",
    "peak_buffers",
    "saved_residual_bytes",
    "CpuOnlyBuffers",
    "cpu_only_buffers",
    "lapack_workspace_bytes",
    "backend_upcasts_low_precision",
]

KINDS = ("inner", "projector", "key", "history", "counter")


@dataclasses.dataclass(frozen=True)
class StateBytes:
  """Optimizer-state bytes of one optimizer on one parameter tree.

  Attributes:
    total: all bytes of the state.
    by_kind: ``{"inner", "projector", "key", "history", "counter"}`` → bytes.
    by_leaf: parameter path → ``{kind: bytes}`` for statistics that belong to
      one parameter leaf (keys and counters belong to none).
  """

  total: int
  by_kind: dict
  by_leaf: dict


def _state_fields() -> dict[type, dict[str, str]]:
  """The library's own state types: field -> kind of everything under it."""
  from optax_lowrank.low_rank import LowRankState
  from optax_lowrank.woodbury import WoodburyState

  return {LowRankState: {"key": "key", "bases": "projector"},
          WoodburyState: {"history": "history", "gram": "history"}}


def _nbytes(x) -> int:
  if hasattr(x, "nbytes") and not hasattr(x, "aval"):
    return int(x.nbytes)
  return int(x.size) * x.dtype.itemsize


def _leaf_kinds(state: Any, fields: Mapping[type, Mapping[str, str]]) -> dict[tuple, str]:
  """Key path of every leaf of ``state`` -> its kind.

  A leaf's kind is set by the nearest enclosing field listed in ``fields``
  (by the state's *type*, never by a field name alone: Adam's ``nu`` and a
  user's ``v`` are both "inner"); outside those, integer scalars are
  counters, PRNG key arrays keys, and everything else the inner optimizer's
  statistics.
  """
  out: dict[tuple, str] = {}

  def default(leaf) -> str:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return "key"
    if leaf.ndim == 0 and jnp.issubdtype(leaf.dtype, jnp.integer):
      return "counter"
    return "inner"

  def walk(node, path: tuple, kind: str | None) -> None:
    known = type(node) in fields and hasattr(node, "_fields")
    if known:
      for name in node._fields:
        walk(getattr(node, name), (*path, jax.tree_util.GetAttrKey(name)),
             fields[type(node)].get(name, kind))
      return
    is_known = lambda x: x is not node and type(x) in fields and hasattr(x, "_fields")
    for sub, child in jax.tree_util.tree_flatten_with_path(node, is_leaf=is_known)[0]:
      if is_known(child):
        walk(child, (*path, *sub), kind)
      else:
        out[(*path, *sub)] = kind or default(child)

  walk(state, (), None)
  return out


def state_bytes(tx: optax.GradientTransformation, params: Any,
                fields: Mapping[type, Mapping[str, str]] | None = None) -> StateBytes:
  """Exact bytes of ``tx.init(params)``, by kind and by parameter leaf.

  Leaves of the state are attributed to a parameter when they sit in a
  sub-tree shaped like the parameter tree (Adam's ``mu``/``nu``, a
  ``LowRankState``'s ``bases``, a Woodbury ``history``...).  Their kind comes
  from the state *type* they sit in: ``LowRankState.bases`` are projectors and
  its ``key`` a key, ``WoodburyState.history`` and ``gram`` histories;
  elsewhere an integer scalar is a counter, a PRNG key array a key, and the
  rest the inner optimizer's statistics.  Nothing is allocated
  (``jax.eval_shape``).

  Args:
    tx: the optimizer.
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    fields: more state types to read: ``{MyState: {"field": kind}}`` (a
      NamedTuple type; ``kind`` one of ``KINDS``), added to the library's own.
  """
  extra = dict(fields or {})
  for t, f in extra.items():
    bad = {k for k in f.values() if k not in KINDS}
    if bad or not hasattr(t, "_fields"):
      raise ValueError(f"state_bytes: `fields` maps NamedTuple types to {{field: kind}} with "
                       f"kinds in {KINDS}; got {t!r}: {f!r}")
  state = jax.eval_shape(tx.init, params)
  kinds = _leaf_kinds(state, {**_state_fields(), **extra})
  flat_params, params_def = jax.tree_util.tree_flatten_with_path(params)
  param_paths = ["/".join(path_names(p)) or "<root>" for p, _ in flat_params]

  def params_like(x) -> bool:
    """Has the params' structure as a prefix (a Basis or None may sit at a leaf)."""
    if params_def.num_leaves == 1 and params_def.num_nodes == 1:
      return False  # a bare array: cannot tell params-shaped sub-trees apart
    try:
      params_def.flatten_up_to(x)
    except (ValueError, TypeError):
      return False
    return True

  by_kind = dict.fromkeys(KINDS, 0)
  by_leaf = {p: dict.fromkeys(KINDS, 0) for p in param_paths}

  def visit(path, sub):
    if not params_like(sub):
      for sub_path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
        by_kind[kinds[(*path, *sub_path)]] += _nbytes(leaf)
      return sub
    for pname, subtree, (ppath, _) in zip(param_paths, params_def.flatten_up_to(sub),
                                         flat_params):
      for sub_path, leaf in jax.tree_util.tree_flatten_with_path(subtree)[0]:
        kind = kinds[(*path, *ppath, *sub_path)]
        kind = "inner" if kind == "counter" else kind
        by_kind[kind] += _nbytes(leaf)
        by_leaf[pname][kind] += _nbytes(leaf)
    return sub

  jax.tree_util.tree_map_with_path(visit, state, is_leaf=params_like)
  return StateBytes(sum(by_kind.values()), by_kind, by_leaf)


def compare(params: Any, optimizers: Mapping[str, optax.GradientTransformation] | None = None,
            *, baselines: bool = True) -> dict[str, StateBytes]:
  """``state_bytes`` for several optimizers, with ``optax.adam`` and ``optax.adafactor``.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    optimizers: name → transformation.
    baselines: add ``"optax.adam"`` and ``"optax.adafactor"`` rows.
  """
  rows = {}
  if baselines:
    rows["optax.adam"] = state_bytes(optax.adam(1e-3), params)
    rows["optax.adafactor"] = state_bytes(optax.adafactor(1e-3), params)
  for name, tx in (optimizers or {}).items():
    rows[name] = state_bytes(tx, params)
  return rows


def step_memory(fn: Callable[..., Any], *args: Any,
                donate_argnums: int | Sequence[int] = ()) -> StepMemory:
  """Compile ``fn`` for ``args`` and return its :class:`StepMemory`.

  Args:
    fn: a train step (or any function of arrays); not yet jitted, or jitted
      (it is re-jitted with ``donate_argnums``).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    donate_argnums: arguments whose buffers the step may reuse for its outputs
      (params and optimizer state in a typical train step).
  """
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  # nothing runs: on the CPU, skip LLVM's optimizations (same buffer assignment)
  options = dict(_PLAN_ONLY) if _target_platform() == "cpu" else {}
  return _memory_of(lowered.compile(compiler_options=options))


def format_table(rows: Mapping[str, StateBytes | StepMemory], unit: str = "MiB") -> str:
  """A plain-text table of :func:`compare` or :func:`step_memory` results."""
  div = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
  if not rows:
    return ""
  first = next(iter(rows.values()))
  if isinstance(first, StateBytes):
    cols = ["total", *KINDS]
    get = lambda r, c: r.total if c == "total" else r.by_kind[c]
  else:
    cols = ["peak", "arguments", "outputs", "temporaries", "aliased"]
    get = getattr
  width = max(12, *(len(k) for k in rows))
  lines = [f"{'':<{width}}" + "".join(f"{c:>14}" for c in cols) + f"   ({unit})"]
  for name, r in rows.items():
    lines.append(f"{name:<{width}}" + "".join(f"{get(r, c) / div:>14.3f}" for c in cols))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Plans: one step compiled from shapes alone
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepPlan(CompiledPlan):
  """The memory plan of one train step: XLA's buffer assignment and where it goes.

  Attributes (beyond :class:`CompiledPlan`'s):
    upcasts_low_precision: whether this backend computes bf16 products in f32.
    weights: bytes of the trainable and frozen trees (analytic).
    optimizer_state: bytes of ``tx.init(trainable)`` (analytic, exact).
    gradients: bytes of the gradient of the trainable tree (its own bytes).
    activations: bytes of the residuals saved by the forward pass for the
      backward pass, arguments excluded.
    count: the optimizer step count the step was planned at, or ``None``.
  """

  upcasts_low_precision: bool = False
  weights: int = 0
  optimizer_state: int = 0
  gradients: int = 0
  activations: int | None = None
  count: int | None = None

  def breakdown(self) -> dict[str, int | None]:
    """The analytic parts by name (bytes)."""
    return {"weights": self.weights, "optimizer_state": self.optimizer_state,
            "gradients": self.gradients, "activations": self.activations}


def _tree_bytes(tree: Any) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def saved_residual_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Bytes JAX saves between the forward and the backward pass of ``fn``.

  The residuals are the leaves of the pullback ``jax.vjp(fn, *args)[1]`` (a
  pytree), traced from shapes (``jax.make_jaxpr``); those that are arguments
  (weights, frozen factors, the batch: held anyway) and constants are left
  out, and each is counted once.
  """
  closed = jax.make_jaxpr(lambda *a: jax.tree.leaves(jax.vjp(fn, *a)[1]))(*args)
  inputs = set(map(id, closed.jaxpr.invars))
  seen, total = set(), 0
  for v in closed.jaxpr.outvars:
    if hasattr(v, "val") or id(v) in inputs or id(v) in seen:
      continue  # a literal, an argument, or counted already
    seen.add(id(v))
    total += int(v.aval.size) * v.aval.dtype.itemsize
  return total


def _fixed_counters(opt_state: Any, count: int) -> tuple[Any, Any]:
  """Split the state into its integer scalars (set to ``count``) and the rest."""
  flat, treedef = jax.tree.flatten(opt_state)
  is_counter = [x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer) for x in flat]
  rest = [None if c else x for x, c in zip(flat, is_counter)]

  def rebuild(rest):
    return jax.tree.unflatten(treedef, [jnp.asarray(count, x.dtype) if c else r
                                        for x, c, r in zip(flat, is_counter, rest)])

  return rest, rebuild


def plan_train_step(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    trainable: Any,
    batch: Any,
    frozen: Any = None,
    *,
    donate: bool = True,
    accelerator: bool | None = None,
    count: int | None = None,
) -> StepPlan:
  """Plan one train step's memory from shapes: compile it, never run it.

  The step is the usual one::

      grads = jax.grad(loss_fn)(trainable, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)

  compiled with ``trainable`` and the optimizer state donated (``donate``);
  nothing is allocated, so a 7B-parameter step plans on a laptop.  Give the
  arguments as ``jax.ShapeDtypeStruct`` trees (``nnx.eval_shape`` of the
  model, then ``nnx.split``), or as arrays (only their shapes are read).

  Args:
    loss_fn: ``(trainable, frozen, batch) -> scalar``.
    tx: the optimizer; its state is ``jax.eval_shape(tx.init, trainable)``.
    trainable: the tree the step differentiates and updates.
    batch: the step's data (e.g. ``ShapeDtypeStruct((batch, seq + 1), int32)``).
    frozen: what the loss reads but the step does not train (a frozen, maybe
      quantized base and the adapter's factors), or ``None``.
    donate: donate ``trainable`` and the optimizer state to the step.
    accelerator: also give the figure of a device with native bf16 products
      (:class:`CompiledPlan`); ``None``: when this backend upcasts them and a
      leaf is bf16/f16.
    count: plan the step taken at this optimizer step count: every integer
      scalar of the optimizer state (step counters) is the constant ``count``,
      so XLA keeps only the branches that step takes (``olr.low_rank``'s
      refresh ``lax.cond`` is taken when ``count % refresh_every == 0``).
      ``None``: the counters are arguments and the plan holds every branch.

  Returns:
    A :class:`StepPlan`: XLA's exact bytes and the analytic breakdown.

  Raises:
    ValueError: if ``loss_fn`` does not return a scalar.
  """
  trainable, frozen, batch = _abstract(trainable), _abstract(frozen), _abstract(batch)
  lowered = lower_train_step(loss_fn, tx, trainable, batch, frozen, donate=donate, count=count)
  if accelerator is None:
    low = any(x.dtype in _LOW_FLOATS for x in jax.tree.leaves((trainable, frozen)))
    accelerator = backend_upcasts_low_precision() and low
  plan = plan_compiled(lowered, accelerator)
  return StepPlan(
      **{f.name: getattr(plan, f.name) for f in dataclasses.fields(CompiledPlan)},
      upcasts_low_precision=backend_upcasts_low_precision(),
      weights=_tree_bytes(trainable) + _tree_bytes(frozen),
      optimizer_state=_tree_bytes(jax.eval_shape(tx.init, trainable)),
      gradients=_tree_bytes(trainable),
      activations=saved_residual_bytes(loss_fn, trainable, frozen, batch),
      count=count,
  )


def lower_train_step(loss_fn: Callable[[Any, Any, Any], jax.Array],
                     tx: optax.GradientTransformation, trainable: Any, batch: Any,
                     frozen: Any = None, *, donate: bool = True,
                     count: int | None = None) -> jax.stages.Lowered:
  """The lowered train step that :func:`plan_train_step` compiles (same arguments).

  Every argument is kept (``keep_unused``); for :func:`plan_compiled` or
  :func:`peak_buffers`.

  Raises:
    ValueError: if ``loss_fn`` does not return a scalar.
  """
  trainable, frozen, batch = _abstract(trainable), _abstract(frozen), _abstract(batch)
  opt_state = jax.eval_shape(tx.init, trainable)
  out = jax.eval_shape(loss_fn, trainable, frozen, batch)
  if getattr(out, "shape", None) != ():
    raise ValueError(f"loss_fn must return a scalar, got {out}")
  rebuild = lambda s: s
  if count is not None:
    opt_state, rebuild = _fixed_counters(opt_state, int(count))

  def step(trainable, opt_state, frozen, batch):
    grads = jax.grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, rebuild(opt_state), trainable)
    return optax.apply_updates(trainable, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1) if donate else (), keep_unused=True).lower(
      trainable, opt_state, frozen, batch)
