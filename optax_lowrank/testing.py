"""Check the duality on your own model: both paths, step by step.

``run_dual`` trains the same parameters twice — with ``olr.low_rank`` (the
gradient path) and with the adapter ``Θ0 + SᵀΛ`` (``olr.adapters``) — with
the same inner optimizer, projection, seed, ``where`` and refresh points, and
reports how far the effective weights ever drift apart.  ``assert_dual``
wraps it for pytest.  By Theorem 1 of Torroba-Hennigen, Lang, Guo and Kim 2025
("On the Duality between Gradient Transformations and Adapters",
arXiv:2502.13811) the drift is round-off for any
inner optimizer whose step depends only on its gradients and state (SGD,
momentum, Adam, Adafactor, Lion, RMSProp, ``olr.woodbury_precondition``...),
with any refresh policy; run in float64 (``jax.config.update("jax_enable_x64",
True)``) to see it at ~1e-12.

Weight decay breaks the duality unless both paths apply it the same way
(ibid., App. B).  ``decay`` is a decoupled decay rate per step
(``η·λ_wd``), and ``decay_view`` says where each path applies it:

* ``"gradient"``: on the full weights. Gradient path:
  ``optax.add_decayed_weights`` after ``low_rank``; adapter path:
  ``adapters.decay_base`` (decays ``Θ0`` by the effective weight).
* ``"adapter"``: on ``Λ`` only. Gradient path: decay inside ``low_rank`` with
  ``track_coefficients=True``; adapter path: decay of ``Λ`` itself (AdamW on
  ``Λ``).

Pass one view for both paths, or a pair ``(gradient_path_view,
adapter_path_view)`` to see the two conventions differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lowrank import adapters
from optax_lowrank import projections as proj
from optax_lowrank.low_rank import low_rank

__all__ = ["DualResult", "run_dual", "assert_dual", "default_tolerance"]

_VIEWS = ("gradient", "adapter")


class DualResult(NamedTuple):
  """What ``run_dual`` measured.

  Attributes:
    max_deviation: ``max_t max_leaf ‖Θ_t^grad − Θ_t^adapter‖_∞``.
    deviations: that maximum per step, a list of floats.
    gradient_params: the gradient path's final weights.
    adapter_params: the adapter path's final effective weights.
  """

  max_deviation: float
  deviations: list
  gradient_params: Any
  adapter_params: Any


def _batch(batches, t):
  if batches is None:
    return ()
  if callable(batches):
    return (batches(t),)
  return (batches[t % len(batches)],)


def run_dual(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    inner: optax.GradientTransformation,
    projection: proj.Projection,
    *,
    steps: int,
    batches: Sequence[Any] | Callable[[int], Any] | None = None,
    refresh_every: int = 200,
    on_refresh: str = "keep",
    scale: float = 1.0,
    where: Any = None,
    seed: int = 0,
    reshape: Any = None,
    decay: float = 0.0,
    decay_view: str | tuple[str, str] = "gradient",
) -> DualResult:
  """Train ``params`` on both paths for ``steps`` steps and compare.

  Args:
    loss_fn: ``loss_fn(params)`` or ``loss_fn(params, batch)``.
    params: initial weights.
    inner: the small-space optimizer, learning rate included (e.g.
      ``optax.adam(1e-2)``).
    projection, refresh_every, on_refresh, scale, where, seed, reshape: as for
      ``olr.low_rank`` (the adapter path is built to match).
    steps: number of steps.
    batches: ``None`` (``loss_fn(params)``), a sequence (cycled) or a function
      of the step index.
    decay: decoupled weight-decay rate per step (``η·λ_wd``); 0 for none.
    decay_view: ``"gradient"``, ``"adapter"`` or a pair of them, see the module
      docstring.

  Returns:
    A :class:`DualResult`.

  (Long because it runs both paths side by side, step for step, in one place,
  so that what is compared is visible at once.)
  """
  views = (decay_view, decay_view) if isinstance(decay_view, str) else tuple(decay_view)
  if len(views) != 2 or any(v not in _VIEWS for v in views):
    raise ValueError(f"`decay_view` must be one of {_VIEWS} or a pair of them, got {decay_view!r}")
  if steps < 1:
    raise ValueError(f"`steps` must be >= 1, got {steps}")
  grad_view, adapter_view = views
  decay_tx = optax.add_decayed_weights(-decay)

  # --- gradient path --------------------------------------------------------
  # Λ is tracked on the gradient path whenever the adapter path needs it: for
  # adapter-view decay, and for inner optimizers that read their params.
  track = True
  g_inner = optax.chain(inner, decay_tx) if grad_view == "adapter" and decay else inner
  g_tx = low_rank(g_inner, projection, refresh_every=refresh_every, on_refresh=on_refresh,
                  scale=scale, where=where, seed=seed, reshape=reshape,
                  track_coefficients=track)
  if grad_view == "gradient" and decay:
    g_tx = optax.chain(g_tx, decay_tx)

  grad_fn = jax.jit(jax.grad(loss_fn))

  @jax.jit
  def g_step(w, s, *batch):
    u, s = g_tx.update(grad_fn(w, *batch), s, w)
    return optax.apply_updates(w, u), s

  # --- adapter path ---------------------------------------------------------
  first = _batch(batches, 0)
  adapter = adapters.init(params, projection, seed=seed, where=where,
                          grads=grad_fn(params, *first), reshape=reshape)
  a_inner = optax.chain(inner, decay_tx) if adapter_view == "adapter" and decay else inner
  a_tx = adapters.optimizer(a_inner, adapter, scale=scale)
  lam = adapters.zeros(adapter)

  @jax.jit
  def a_step(adapter, lam, s, *batch):
    glam = jax.grad(lambda lam_: loss_fn(adapters.materialize(adapter, lam_), *batch))(lam)
    if adapter_view == "gradient" and decay:
      adapter = adapters.decay_base(adapter, lam, decay)
    u, s = a_tx.update(glam, s, adapters.inner_params(adapter, lam, track))
    return adapter, optax.apply_updates(lam, u), s

  @jax.jit
  def a_merge(adapter, lam, s, *batch):
    full = grad_fn(adapters.materialize(adapter, lam), *batch)
    new, lam = adapters.merge(adapter, lam, full)
    return new, lam, adapters.refresh_state(on_refresh, a_tx, s, adapter, new)

  w, g_state = params, g_tx.init(params)
  a_state = a_tx.init(lam)
  deviations = []
  for t in range(steps):
    batch = _batch(batches, t)
    if t > 0 and t % refresh_every == 0:
      adapter, lam, a_state = a_merge(adapter, lam, a_state, *batch)
    w, g_state = g_step(w, g_state, *batch)
    adapter, lam, a_state = a_step(adapter, lam, a_state, *batch)
    eff = adapters.materialize(adapter, lam)
    dev = max(float(jnp.max(jnp.abs(x - y))) if x.size else 0.0
              for x, y in zip(jax.tree.leaves(w), jax.tree.leaves(eff)))
    deviations.append(dev)
  return DualResult(max(deviations), deviations, w, adapters.materialize(adapter, lam))


def default_tolerance(params: Any, steps: int, scale: float = 1.0) -> float:
  """The drift ``assert_dual`` allows by default: ``64 · ε · steps · max(1, scale)``.

  ``ε`` is the machine epsilon of the least precise floating leaf of ``params``
  (``2.2e-16`` float64, ``1.2e-7`` float32, ``7.8e-3`` bfloat16), ``scale``
  the largest weight magnitude.  Round-off on the two paths is of order
  ``ε·|Θ|`` per operation and accumulates at most linearly over the steps;
  64 covers the handful of operations per step between them (float32,
  the README's 20-step example: 8.8e-8 measured, 1.8e-4 allowed).  A real
  break of the duality — weight decay applied in different views, a
  different basis — moves the weights by a multiple of the learning rate
  per step, far above it (both are tested).
  """
  floats = [jnp.result_type(x) for x in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  eps = max((float(jnp.finfo(d).eps) for d in floats), default=float(jnp.finfo(jnp.float32).eps))
  return 64 * eps * steps * max(1.0, float(scale))


def assert_dual(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    inner: optax.GradientTransformation,
    projection: proj.Projection,
    *,
    atol: float | None = None,
    rtol: float = 0.0,
    **kwargs: Any,
) -> DualResult:
  """``run_dual`` and fail (``AssertionError``) if the paths drift apart.

  The tolerance is ``atol + rtol·max|Θ|`` on the largest element-wise
  deviation over all steps.  ``atol=None`` (the default) derives it from the
  params' dtype and the number of steps (:func:`default_tolerance`), so one
  call suits float64, float32 (JAX's default) and bfloat16 alike; pass a
  number to be stricter or looser.
  """
  result = run_dual(loss_fn, params, inner, projection, **kwargs)
  scale = max((float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(
      result.gradient_params) if np.size(x)), default=0.0)
  if atol is None:
    atol = default_tolerance(params, kwargs["steps"], scale)
  tol = atol + rtol * scale
  if not result.max_deviation <= tol:
    worst = int(np.argmax(result.deviations))
    raise AssertionError(
        f"gradient path and adapter path differ by {result.max_deviation:.3e} "
        f"(tolerance {tol:.3e}), worst at step {worst}"
    )
  return result
