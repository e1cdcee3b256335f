"""Whether an optax transformation couples the layers of a stack: :func:`check_separable`.

A layer-wise step (:mod:`optax_lowrank.layerwise`) updates layer ``l`` while
the gradients of the layers below it do not exist yet, so ``tx`` must be
*layer-separable*: its update of one layer may depend only on that layer's
gradient, params and state.  :func:`check_separable` decides it without
running anything: it traces the JVP of ``tx.update`` on two copies of one
layer's shapes and follows, equation by equation, which input tangents each
output tangent depends on (a forward data-flow analysis of the jaxpr, with a
fixed point through ``scan`` and ``while`` carries).
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.extend import core as jex_core

__all__ = ["check_separable"]


def _open(jaxpr: Any) -> Any:
  return jaxpr if hasattr(jaxpr, "eqns") else jaxpr.jaxpr


def _union(sets: Any) -> frozenset:
  out: frozenset = frozenset()
  for s in sets:
    out = out | s
  return out


def _dependencies(jaxpr: Any, in_deps: list[frozenset]) -> list[frozenset]:
  """For every output of ``jaxpr``, the labels of the inputs it depends on."""
  env: dict[Any, frozenset] = dict(zip(jaxpr.invars, in_deps))

  def read(atom: Any) -> frozenset:
    if isinstance(atom, jex_core.Literal):
      return frozenset()
    return env.get(atom, frozenset())

  for eqn in jaxpr.eqns:
    outs = _equation_dependencies(eqn, [read(a) for a in eqn.invars])
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _equation_dependencies(eqn: Any, ins: list[frozenset]) -> list[frozenset]:
  name, params = eqn.primitive.name, eqn.params
  n_out = len(eqn.outvars)
  if name == "cond":
    outs = [frozenset()] * n_out
    for branch in params["branches"]:
      outs = [a | b for a, b in zip(outs, _dependencies(_open(branch), ins[1:]))]
    return [o | ins[0] for o in outs]
  if name == "scan":
    body, n_consts, n_carry = _open(params["jaxpr"]), params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    while True:  # a fixed point: the carry's labels only grow
      outs = _dependencies(body, consts + carry + xs)
      new = [a | b for a, b in zip(carry, outs[:n_carry])]
      if new == carry:
        return carry + outs[n_carry:]
      carry = new
  if name == "while":
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts = ins[:n_cond], ins[n_cond:n_cond + n_body]
    carry = ins[n_cond + n_body:]
    while True:
      pred = _union(_dependencies(_open(params["cond_jaxpr"]), cond_consts + carry))
      outs = _dependencies(_open(params["body_jaxpr"]), body_consts + carry)
      new = [a | b | pred for a, b in zip(carry, outs)]
      if new == carry:
        return carry
      carry = new
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):  # pjit, remat, custom_jvp/vjp, shard_map
    sub = params.get(key)
    if sub is not None and hasattr(_open(sub), "invars"):
      sub = _open(sub)
      if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
        return _dependencies(sub, ins)
  return [_union(ins)] * n_out  # conservative: every output depends on every input


def check_separable(tx: optax.GradientTransformation, layer: Any) -> None:
  """Raise if ``tx`` couples layers (its update of one moves with another's gradient).

  Traces (no computation: abstract shapes) the JVP of ``tx.update`` on a tree
  of two copies of ``layer``'s shapes, with tangents on the gradients and the
  params, and follows the data flow of the tangents through the jaxpr
  (through ``cond``, ``scan``, ``while`` and nested calls; other higher-order
  primitives count as depending on all their inputs): an update of the first
  copy whose tangent depends on a tangent of the second is a coupling, as in
  ``optax.clip_by_global_norm`` (``g·c/‖g‖`` moves with every leaf).  Only
  differentiable paths count, so ordering tricks through integers (8-bit
  Adam ties each leaf's decoding to the previous leaf's codes) and rounding
  are not couplings; a coupling only through a non-differentiable decision
  (``optax.apply_if_finite``'s all-finite test) or through the optimizer
  state across steps is not seen: in a layer-wise step those decisions are
  taken per layer.  Where the JVP cannot be traced, the primal data flow is
  followed instead (stricter).

  Raises:
    ValueError: naming the update leaf of the first copy that depends on a
      gradient or param leaf of the second, with their shapes.
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), layer)
  pair = [shapes, shapes]
  state = jax.eval_shape(tx.init, pair)
  n = len(jax.tree.leaves(pair))
  unlabeled = [frozenset()] * n
  state_labels = [frozenset()] * len(jax.tree.leaves(state))
  g_labels = [frozenset({("g", i)}) for i in range(n)]
  p_labels = [frozenset({("p", i)}) for i in range(n)]

  def update(g, s, p):
    return tx.update(g, s, p)[0]

  def tangents(g, s, p, tg, tp):
    return jax.jvp(lambda g, p: update(g, s, p), (g, p), (tg, tp))[1]

  try:
    closed, out_shapes = jax.make_jaxpr(tangents, return_shape=True)(pair, state, pair, pair,
                                                                      pair)
    labels = unlabeled + state_labels + unlabeled + g_labels + p_labels
  except Exception:  # noqa: BLE001 - no JVP rule somewhere: the primal data flow instead
    closed, out_shapes = jax.make_jaxpr(update, return_shape=True)(pair, state, pair)
    labels = g_labels + state_labels + p_labels
  outs = _dependencies(closed.jaxpr, labels)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(pair)[0]]
  leaves = jax.tree.leaves(pair)
  for (path, leaf), deps in zip(jax.tree_util.tree_flatten_with_path(out_shapes)[0], outs):
    mine = getattr(path[0], "idx", 0)
    for kind, i in sorted(deps):
      if (i >= n // 2) != (mine == 1):
        what = "gradient" if kind == "g" else "param"
        raise ValueError(
            f"`tx` is not layer-separable: the update of layer leaf "
            f"{jax.tree_util.keystr(path[1:])} {tuple(leaf.shape)} depends on the {what} of "
            f"another layer's leaf {paths[i][3:]} {tuple(leaves[i].shape)} (e.g. "
            "optax.clip_by_global_norm needs the norm of the whole gradient, which a "
            "layer-wise step does not have when it updates a layer). Take the coupling "
            "out of `tx` and pass make_step(..., clip=\"layer\" | \"previous\" | "
            "\"two_pass\", clip_norm=...), or pass check_separable=False if you know "
            "better."
        )
