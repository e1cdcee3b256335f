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

All figures are bytes; :func:`format_table` prints them in MiB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from optax_lowrank.leaves import field_names, path_names

__all__ = [
    "StateBytes",
    "state_bytes",
    "compare",
    "StepMemory",
    "step_memory",
    "format_table",
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
  compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  m = compiled.memory_analysis()
  arguments = int(m.argument_size_in_bytes)
  outputs = int(m.output_size_in_bytes)
  temporaries = int(m.temp_size_in_bytes)
  aliased = int(m.alias_size_in_bytes)
  return StepMemory(arguments, outputs, temporaries, aliased,
                    arguments + outputs + temporaries - aliased)


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
