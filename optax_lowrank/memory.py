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
   figure to carry to a GPU (:class:`StepPlan`).

All figures are bytes; :func:`format_table` prints them in MiB.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lowrank.leaves import field_names, path_names

__all__ = [
    "StateBytes",
    "state_bytes",
    "compare",
    "StepMemory",
    "step_memory",
    "format_table",
    "StepPlan",
    "plan_train_step",
    "backend_upcasts_low_precision",
]

KINDS = ("inner", "projector", "key", "history", "counter")
_PROJECTOR_FIELDS = frozenset({"bases", "stored_bases", "projector"})
_HISTORY_FIELDS = frozenset({"history", "gram"})
_KEY_FIELDS = frozenset({"key", "rng"})


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


def _nbytes(x) -> int:
  if hasattr(x, "nbytes") and not hasattr(x, "aval"):
    return int(x.nbytes)
  return int(x.size) * x.dtype.itemsize


def _kind(names: set[str], leaf) -> str:
  if names & _PROJECTOR_FIELDS:
    return "projector"
  if names & _HISTORY_FIELDS:
    return "history"
  if names & _KEY_FIELDS:
    return "key"
  if leaf.ndim == 0:
    return "counter"
  return "inner"


def state_bytes(tx: optax.GradientTransformation, params: Any) -> StateBytes:
  """Exact bytes of ``tx.init(params)``, by kind and by parameter leaf.

  Leaves of the state are attributed to a parameter when they sit in a
  sub-tree shaped like the parameter tree (Adam's ``mu``/``nu``, a
  ``LowRankState``'s ``bases``, a Woodbury ``history``...); their kind comes
  from the field they sit under.  Nothing is allocated (``jax.eval_shape``).
  """
  state = jax.eval_shape(tx.init, params)
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
    names = field_names(path)
    if params_like(sub):
      for pname, subtree in zip(param_paths, params_def.flatten_up_to(sub)):
        for leaf in jax.tree.leaves(subtree):
          kind = _kind(names, leaf)
          if kind == "counter":
            kind = "inner"
          b = _nbytes(leaf)
          by_kind[kind] += b
          by_leaf[pname][kind] += b
      return sub
    for leaf in jax.tree.leaves(sub):
      by_kind[_kind(names, leaf)] += _nbytes(leaf)
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


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's memory figures for one compiled function (bytes).

  ``peak`` is ``arguments + outputs + temporaries − aliased``: the bytes live
  at once during the step, counting donated (aliased) inputs once.
  """

  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  peak: int


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
  return _memory_of(jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile())


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
# Plans: one train step compiled from shapes alone
# ----------------------------------------------------------------------------

_NO_HOISTING = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
_LOW_FLOATS = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The memory plan of one train step: XLA's buffer assignment and where it goes.

  Attributes:
    memory: XLA's figures for the step as this backend compiles it.
    transfer: the same step compiled without loop-invariant code motion, when
      this backend computes bf16/f16 matrix products in float32 and the
      trainable or frozen tree holds such leaves (else ``None``).  XLA on the
      CPU converts the operands of every bf16 product to f32 and hoists the
      conversion of a scanned model's stacked weights out of the layer loop:
      f32 copies of whole weight stacks that a GPU (native bf16 products)
      never holds.  Without the hoisting only the layer being computed has such
      copies, so ``transfer.peak`` is the figure to carry to a GPU (an
      over-estimate by at most about one layer's weights in f32).
    upcasts_low_precision: whether this backend computes bf16 products in f32.
    weights: bytes of the trainable and frozen trees (analytic).
    optimizer_state: bytes of ``tx.init(trainable)`` (analytic, exact).
    gradients: bytes of the gradient of the trainable tree (its own bytes).
    activations: bytes of the residuals saved by the forward pass for the
      backward pass, arguments excluded (``None`` when JAX cannot list them).
    backend: ``jax.default_backend()`` at planning time.
  """

  memory: StepMemory
  transfer: StepMemory | None
  upcasts_low_precision: bool
  weights: int
  optimizer_state: int
  gradients: int
  activations: int | None
  backend: str

  @property
  def peak(self) -> int:
    """XLA's peak bytes as compiled here."""
    return self.memory.peak

  @property
  def transfer_peak(self) -> int:
    """The peak to carry to an accelerator with native bf16 products."""
    return (self.transfer or self.memory).peak

  def breakdown(self) -> dict[str, int | None]:
    """The analytic parts by name (bytes)."""
    return {"weights": self.weights, "optimizer_state": self.optimizer_state,
            "gradients": self.gradients, "activations": self.activations}


def _tree_bytes(tree: Any) -> int:
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def backend_upcasts_low_precision() -> bool:
  """Whether this backend computes a bf16 matrix product in float32.

  Compiles a 16×16 bf16 product and looks at the optimized HLO: on XLA's CPU
  backend the product's operands are converted to f32 first.  Cached per
  backend.
  """
  return _upcasts(jax.default_backend())


@functools.cache
def _upcasts(backend: str) -> bool:
  del backend  # the cache key
  a = jax.ShapeDtypeStruct((16, 16), jnp.bfloat16)
  text = jax.jit(jnp.matmul).lower(a, a).compile().as_text()
  dots = [line for line in text.splitlines() if " dot(" in line]
  return any(line.split("=", 1)[1].lstrip().startswith("f32") for line in dots)


def _saved_residual_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
  """Bytes JAX saves between the forward and the backward pass of ``fn``."""
  try:
    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent
  except ImportError:  # pragma: no cover - depends on the JAX version
    return None
  total = 0
  for aval, origin in saved_residuals(fn, *args):
    if origin.startswith("from the argument"):
      continue  # weights, frozen factors, the batch: held anyway
    total += int(aval.size) * aval.dtype.itemsize
  return total


def plan_train_step(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    tx: optax.GradientTransformation,
    trainable: Any,
    batch: Any,
    frozen: Any = None,
    *,
    donate: bool = True,
    transfer: bool | None = None,
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
    transfer: also compile without loop-invariant code motion (see
      :class:`StepPlan`); ``None``: when this backend upcasts bf16 products
      and a leaf is bf16/f16.

  Returns:
    A :class:`StepPlan`: XLA's exact bytes and the analytic breakdown.

  Raises:
    ValueError: if ``loss_fn`` does not return a scalar.
  """
  trainable, frozen, batch = _abstract(trainable), _abstract(frozen), _abstract(batch)
  opt_state = jax.eval_shape(tx.init, trainable)
  out = jax.eval_shape(loss_fn, trainable, frozen, batch)
  if getattr(out, "shape", None) != ():
    raise ValueError(f"loss_fn must return a scalar, got {out}")

  def step(trainable, opt_state, frozen, batch):
    grads = jax.grad(loss_fn)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  donate_argnums = (0, 1) if donate else ()
  lowered = jax.jit(step, donate_argnums=donate_argnums).lower(trainable, opt_state, frozen, batch)
  memory = _memory_of(lowered.compile())
  upcasts = backend_upcasts_low_precision()
  if transfer is None:
    low = any(x.dtype in _LOW_FLOATS for x in jax.tree.leaves((trainable, frozen)))
    transfer = upcasts and low
  moved = _memory_of(lowered.compile(compiler_options=_NO_HOISTING)) if transfer else None
  return StepPlan(
      memory=memory,
      transfer=moved,
      upcasts_low_precision=upcasts,
      weights=_tree_bytes(trainable) + _tree_bytes(frozen),
      optimizer_state=_tree_bytes(opt_state),
      gradients=_tree_bytes(trainable),
      activations=_saved_residual_bytes(loss_fn, trainable, frozen, batch),
      backend=jax.default_backend(),
  )


def _memory_of(compiled) -> StepMemory:
  m = compiled.memory_analysis()
  arguments = int(m.argument_size_in_bytes)
  outputs = int(m.output_size_in_bytes)
  temporaries = int(m.temp_size_in_bytes)
  aliased = int(m.alias_size_in_bytes)
  return StepMemory(arguments, outputs, temporaries, aliased,
                    arguments + outputs + temporaries - aliased)
