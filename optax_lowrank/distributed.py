"""DiLoCo-style training on a JAX device mesh, with worker-specific projections.

DiLoCo (Douillard et al. 2023, arXiv:2311.08105) trains ``K`` workers
independently and synchronizes them rarely.  Round ``g``, on every worker ``k``:

    W_k ← θ                                         (start from the global weights)
    L times:  W_k ← W_k + inner(∇ℓ(W_k; batch_k))   (local steps, own data shard)
    Δ = mean_k (θ − W_k)                            (pseudo-gradient: one all-reduce)
    θ ← θ + outer(Δ)                                (outer optimizer, e.g. Nesterov SGD)

The inner optimizer runs through :func:`optax_lowrank.low_rank`, so worker
``k`` moves only inside the range of its own projection ``P_k`` (new bases at
the start of every round) and keeps only coefficient-sized statistics.  How
the workers' projections relate decides how much of a weight one round can
move (Torroba-Hennigen, Lang, Guo and Kim 2025, arXiv:2502.13811, §4.2):

| ``scheme`` | worker ``k``'s basis | the round's change lies in |
|---|---|---|
| ``"identical"`` | from the shared key: ``P_k = P`` | one rank-``r`` subspace |
| ``"independent"`` | from ``fold_in(key, k)`` | ``K·r`` dimensions, almost surely |
| ``"disjoint"`` | block ``k`` of one random orthonormal matrix: ``P_i P_jᵀ = 0`` | \
exactly ``K·r`` dimensions |

No basis is ever sent: each worker rebuilds its own from the seed, the round
and ``jax.lax.axis_index``; a round communicates one weight-sized ``pmean``.

```python
mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("workers",))
diloco = olr.distributed.make_diloco(
    loss_fn, optax.adam(1e-3), mesh, local_steps=50,
    projection=olr.semi_orthogonal(64), scheme="disjoint")
state = diloco.init(params)
for batches in rounds:          # leaves of shape (local_steps, batch, ...)
  state, metrics = diloco.round(state, batches)
```

Memory per worker: one copy of the weights, the gradient, the low-rank inner
state and one weight-sized pseudo-gradient at the sync.  Also here:
:func:`state_shardings` (the state of a sharded ``olr.low_rank``, for FSDP)
and :func:`launch_local` / :func:`initialize_local` (several JAX processes on
one machine).  Several hosts, FSDP and what a refresh communicates:
``docs/how-to/distributed.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from optax_lowrank import leaves as leaves_lib
from optax_lowrank import projections as proj
from optax_lowrank.launch import LaunchError, ProcessResult, initialize_local, launch_local
from optax_lowrank.low_rank import LowRankState, low_rank

__all__ = [
    "SCHEMES",
    "DiLoCo",
    "DiLoCoState",
    "DisjointSketch",
    "LaunchError",
    "ProcessResult",
    "RoundMetrics",
    "assign_worker",
    "default_outer",
    "diloco_round",
    "disjoint",
    "disjoint_factor",
    "initialize_local",
    "launch_local",
    "make_diloco",
    "state_shardings",
    "worker_key",
    "worker_projection",
]

Array = jax.Array
Params = Any
Batch = Any
Scheme = Literal["identical", "independent", "disjoint"]

SCHEMES = ("identical", "independent", "disjoint")


def _check_scheme(scheme: str) -> str:
  if scheme not in SCHEMES:
    raise ValueError(f"`scheme` must be one of {SCHEMES}, got {scheme!r}")
  return scheme


# ----------------------------------------------------------------------------
# Worker keys and bases.


def worker_key(key: Array, worker_index: int | Array, scheme: Scheme) -> Array:
  """The base PRNG key of one worker's random bases.

  Args:
    key: the shared base key (``LowRankState.key``, from ``seed``).
    worker_index: the worker's index, an int or a traced int32 scalar such as
      ``jax.lax.axis_index("workers")``.
    scheme: ``"identical"`` and ``"disjoint"`` return ``key`` itself (every
      worker must draw the same matrix; :func:`disjoint_factor` then picks the
      worker's block), ``"independent"`` returns ``fold_in(key, worker_index)``.

  Returns:
    A key of the same kind as ``key``.
  """
  if _check_scheme(scheme) == "independent":
    return jax.random.fold_in(key, worker_index)
  return key


def assign_worker(state: optax.OptState, worker_index: int | Array, scheme: Scheme) -> Any:
  """Give every ``LowRankState`` inside ``state`` the keys of one worker.

  Replaces the ``key`` of each :class:`~optax_lowrank.LowRankState` found
  anywhere in ``state`` (inside ``optax.chain``, ``inject_hyperparams``...) by
  ``worker_key(key, worker_index, scheme)``; everything else is unchanged.
  Since a leaf's basis at refresh ``t`` is made from ``fold_in(fold_in(key, t),
  leaf)``, this is all a worker needs to draw its own random bases.
  """

  def one(s):
    if isinstance(s, LowRankState):
      return s._replace(key=worker_key(s.key, worker_index, scheme))
    return s

  return jax.tree.map(one, state, is_leaf=lambda s: isinstance(s, LowRankState))


def disjoint_factor(
    key: Array,
    n: int,
    rank: int,
    num_workers: int,
    worker_index: int | Array,
    dtype: Any = jnp.float32,
) -> Array:
  """Worker ``k``'s block of one shared random orthonormal ``n × (K·r)`` matrix.

  Every worker draws the same Gaussian ``n × K r`` matrix from ``key``,
  orthonormalizes it (QR with fixed signs: the first ``K r`` columns of a
  Haar-random orthogonal matrix) and keeps columns ``[k r, (k+1) r)``.  So with
  ``P_k = U_kᵀ`` (``r × n``): ``P_k P_kᵀ = I_r`` and ``P_i P_jᵀ = 0`` for
  ``i ≠ j``; together the ``K`` blocks span ``K r`` dimensions with no overlap.
  For ``K = 1`` this is exactly ``olr.semi_orthogonal``'s factor for the key.

  Args:
    key: the shared key (the same on every worker).
    n: the projected dimension.
    rank: ``r``, columns per worker; ``rank · num_workers ≤ n``.
    num_workers: ``K``.
    worker_index: ``k``, an int or a traced scalar (``jax.lax.axis_index``).
    dtype: float dtype of the factor (float32 or wider).

  Returns:
    ``U_k`` of shape ``(n, rank)`` with orthonormal columns.

  Cost: a QR of ``n × K r`` (``O(n K² r²)``) on every worker, at a refresh only;
  the ``K − 1`` other blocks are computed and dropped, the price of sending
  nothing.
  """
  if rank * num_workers > n:
    raise ValueError(
        f"disjoint blocks need rank × num_workers ≤ n, got {rank} × {num_workers} > {n}"
    )
  full = proj.random_factor("semi_orthogonal", key, n, rank * num_workers, dtype)
  if num_workers == 1:
    return full
  start = jnp.asarray(worker_index, jnp.int32) * rank
  return jax.lax.dynamic_slice_in_dim(full, start, rank, axis=1)


@dataclasses.dataclass(frozen=True)
class DisjointSketch(proj._OneSided):  # the package's one-sided spec base
  """One-sided spec: this worker's block of a shared random orthonormal matrix.

  A :class:`~optax_lowrank.Projection` that plugs into ``olr.low_rank``
  unchanged: the key ``low_rank`` hands to the spec (from ``(seed, refresh,
  leaf)``) is the shared key, and the block index is ``worker`` if given, else
  ``jax.lax.axis_index(axis_name)`` read while tracing under ``shard_map`` /
  ``pmap`` over that axis.  Stored in the state like ``semi_orthogonal`` (its QR
  runs only at a refresh).  Build it with :func:`disjoint`.
  """

  num_workers: int = 1
  axis_name: str = "workers"
  worker: int | None = None

  stored = True

  def __post_init__(self):
    super().__post_init__()
    k = self.num_workers
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ValueError(f"`num_workers` must be an int >= 1, got {k!r}")
    w = self.worker
    if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < k):
      raise ValueError(f"`worker` must be None or an int in [0, {k}), got {w!r}")

  def axis_ranks(self, view_shape):
    ranks = super().axis_ranks(view_shape)
    left = self.resolved_side(view_shape) == "left"
    r = ranks[0] if left else ranks[1]
    n = view_shape[0] if left else view_shape[1]
    if r * self.num_workers > n:
      side = "left" if left else "right"
      raise ValueError(
          f"scheme 'disjoint' needs rank × workers ≤ the projected dimension, but "
          f"{r} × {self.num_workers} = {r * self.num_workers} > {n} (the {side} side of the "
          f"{view_shape[0]}×{view_shape[1]} view); lower the rank or leave this leaf out "
          "with `where`"
      )
    return ranks

  def _factor(self, view_shape, key, grad, dtype, r, n, side):
    del view_shape, grad, side
    index = self.worker if self.worker is not None else jax.lax.axis_index(self.axis_name)
    return disjoint_factor(key, n, r, self.num_workers, index, dtype)


def disjoint(
    rank: int,
    num_workers: int,
    side: proj.Side = "auto",
    *,
    axis_name: str = "workers",
    worker: int | None = None,
) -> DisjointSketch:
  """Mutually orthogonal worker projections ("distributed random", arXiv:2502.13811 §4.2).

  Worker ``k`` gets block ``k`` of the columns of one random orthonormal
  ``n × (num_workers·rank)`` matrix drawn from the shared key
  (:func:`disjoint_factor`), so ``P_i P_jᵀ = 0`` and each ``P_k`` has
  orthonormal rows.  Needs ``rank · num_workers ≤`` the projected dimension of
  every selected leaf (checked at ``init``, naming the leaf).

  Args:
    rank: ``r`` per worker.
    num_workers: ``K``.
    side: as for the other one-sided specs.
    axis_name: the mesh axis whose ``jax.lax.axis_index`` is the worker index.
    worker: a fixed worker index instead (to run one worker outside a mapped
      axis, e.g. to simulate the workers one after the other).
  """
  return DisjointSketch(rank, side, num_workers, axis_name, worker)


def worker_projection(
    projection: proj.Projection,
    scheme: Scheme,
    num_workers: int,
    *,
    axis_name: str = "workers",
    worker: int | None = None,
) -> proj.Projection:
  """The spec a worker runs under ``scheme``.

  ``"identical"`` and ``"independent"`` keep ``projection`` as it is (they
  differ only in the worker's key, see :func:`assign_worker`); ``"disjoint"``
  turns ``olr.semi_orthogonal(rank, side)`` into :func:`disjoint` blocks with
  the same rank and side.

  Raises:
    ValueError: for ``"disjoint"`` with another kind of projection, or an
      unknown scheme.
  """
  if _check_scheme(scheme) != "disjoint":
    return projection
  if isinstance(projection, DisjointSketch):
    return dataclasses.replace(
        projection, num_workers=num_workers, axis_name=axis_name, worker=worker
    )
  if not (isinstance(projection, proj.RandomSketch) and projection.kind == "semi_orthogonal"):
    raise ValueError(
        "scheme 'disjoint' takes blocks of one random orthonormal matrix, so it needs "
        f"`projection=olr.semi_orthogonal(rank)`, got {projection!r}"
    )
  return DisjointSketch(projection.rank, projection.side, num_workers, axis_name, worker)


# ----------------------------------------------------------------------------
# The round.


class DiLoCoState(NamedTuple):
  """State of DiLoCo training.

  Attributes:
    rounds: int32 ``()``, outer steps taken.
    params: the global weights ``θ`` (replicated over the worker axis).
    outer_state: the outer optimizer's state over ``θ`` (replicated).
    inner_states: the workers' inner optimizer states.  In the global view
      (what :func:`make_diloco` returns) every leaf has a leading axis of size
      ``K``, sharded over the worker axis; inside :func:`diloco_round` each
      worker sees its own state, without that axis.  Each is small: the
      coefficient-sized statistics of ``olr.low_rank`` and its stored bases.
  """

  rounds: Array
  params: Params
  outer_state: optax.OptState
  inner_states: optax.OptState


class RoundMetrics(NamedTuple):
  """What one round reports.

  Attributes:
    loss: float ``()``, the mean training loss over the round's local steps and
      all workers (each step's loss before its update).
    worker_loss: float ``(K,)`` in the global view (``(1,)`` per worker inside
      the map), each worker's mean training loss over the round.
    pseudo_grad_norm: float ``()``, the global norm of the averaged
      pseudo-gradient ``Δ``.
  """

  loss: Array
  worker_loss: Array
  pseudo_grad_norm: Array


def diloco_round(
    state: DiLoCoState,
    batches: Batch,
    *,
    loss_fn: Callable[[Params, Batch], Array],
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    axis_name: str = "workers",
) -> tuple[DiLoCoState, RoundMetrics]:
  """One DiLoCo round for one worker; run it mapped over ``axis_name``.

  Written for ``jax.shard_map`` (or ``jax.pmap``) over the worker axis: the
  local steps use no collective, the sync is one ``jax.lax.pmean`` of the
  pseudo-gradient (weight-sized), and the outer step then runs identically on
  every worker, so ``params`` and ``outer_state`` stay replicated.

  Args:
    state: the worker view of :class:`DiLoCoState` (``inner_states`` is this
      worker's state, without a worker axis).
    batches: this worker's data for the round, a pytree whose leaves have a
      leading axis of length ``L`` (one slice per local step).
    loss_fn: ``(params, batch) -> scalar`` loss.
    inner: the worker's optimizer (typically ``olr.low_rank(...)`` with
      ``refresh_every = L``, so its bases are re-made at the start of the
      round; its state count runs on across rounds).
    outer: the outer optimizer; it receives ``Δ = mean_k(θ − W_k)`` as the
      gradient.  ``optax.sgd(1.0)`` gives ``θ ← mean_k W_k``.
    axis_name: the mapped worker axis.

  Returns:
    ``(new_state, metrics)`` with ``metrics.worker_loss`` of shape ``(1,)``.

  Memory per worker: one copy of the weights being trained (``W_k``), the
  gradient, the inner state, and one weight-sized pseudo-gradient at the sync.
  """
  theta = state.params

  def local_step(carry, batch):
    weights, inner_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(weights, batch)
    updates, inner_state = inner.update(grads, inner_state, weights)
    return (optax.apply_updates(weights, updates), inner_state), loss

  (weights, inner_state), losses = jax.lax.scan(
      local_step, (_varying(theta, axis_name), state.inner_states), batches
  )
  pseudo_grad = jax.tree.map(lambda t, w: (t - w).astype(t.dtype), theta, weights)
  pseudo_grad = jax.lax.pmean(pseudo_grad, axis_name)
  updates, outer_state = outer.update(pseudo_grad, state.outer_state, theta)
  new_state = DiLoCoState(
      rounds=state.rounds + 1,
      params=optax.apply_updates(theta, updates),
      outer_state=outer_state,
      inner_states=inner_state,
  )
  worker_loss = jnp.mean(losses)
  metrics = RoundMetrics(
      loss=jax.lax.pmean(worker_loss, axis_name),
      worker_loss=worker_loss[None],
      pseudo_grad_norm=optax.tree.norm(pseudo_grad),
  )
  return new_state, metrics


def _varying(tree: Any, axis_name: str) -> Any:
  """Mark replicated values as per-worker.

  ``shard_map`` with ``check_vma=True`` types a ``lax.scan`` carry by the axes
  it varies over, and the worker's weights start replicated (``θ``) but vary
  after one local step.  Under ``check_vma=False`` or ``pmap`` this is a no-op.
  """

  def one(x):
    try:
      return jax.lax.pcast(x, axis_name, to="varying")
    except ValueError:  # pcast takes only values not yet varying: this one already is
      return x

  return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------
# On a mesh.


class DiLoCo(NamedTuple):
  """DiLoCo training on a mesh, from :func:`make_diloco`.

  Attributes:
    init: ``params -> DiLoCoState`` (jitted; ``params`` stay as placed,
      replicated over the worker axis and possibly sharded over others; each
      worker's inner state is made on its own devices with its own keys).
    round: ``(state, batches) -> (state, RoundMetrics)`` (jitted ``shard_map``
      of :func:`diloco_round`); ``batches`` leaves have shape
      ``(local_steps, batch, ...)`` with ``batch`` divisible by ``num_workers``.
      Like a jitted function, ``init`` and ``round`` have a ``.lower(...)``
      taking the same arguments (``round.lower(state, batches).compile()
      .as_text()`` is the HLO of one round, collectives included).
    worker_tx: the optimizer every worker runs (``olr.low_rank`` of the inner
      optimizer, or the inner optimizer itself without a projection).
    num_workers: ``K``, the size of the worker axis.
  """

  init: Callable[[Params], DiLoCoState]
  round: Callable[[DiLoCoState, Batch], tuple[DiLoCoState, RoundMetrics]]
  worker_tx: optax.GradientTransformation
  num_workers: int


def default_outer() -> optax.GradientTransformation:
  """DiLoCo's outer optimizer: SGD with Nesterov momentum, ``lr = 0.7``, ``β = 0.9``."""
  return optax.sgd(0.7, momentum=0.9, nesterov=True)


def make_diloco(
    loss_fn: Callable[[Params, Batch], Array],
    inner: optax.GradientTransformation,
    mesh: Mesh,
    *,
    local_steps: int,
    projection: proj.Projection | None = None,
    scheme: Scheme = "independent",
    outer: optax.GradientTransformation | None = None,
    axis_name: str = "workers",
    seed: int = 0,
    on_refresh: str = "keep",
    scale: float = 1.0,
    where: Any = None,
    reshape: Any = None,
) -> DiLoCo:
  """DiLoCo on the ``axis_name`` axis of ``mesh``, with low-rank workers.

  Each of the ``K = mesh.shape[axis_name]`` workers runs ``local_steps`` steps of
  ``olr.low_rank(inner, worker_projection(projection, scheme, K),
  refresh_every=local_steps, ...)`` on its own slice of the batch (or plain
  ``inner`` when ``projection`` is ``None``: full-rank DiLoCo), then the
  pseudo-gradients are averaged and ``outer`` updates the global weights
  (:func:`diloco_round`).  Bases are re-made at the start of every round.

  Args:
    loss_fn: ``(params, batch) -> scalar`` loss of one worker's batch.
    inner: the optimizer run in the small space (e.g. ``optax.adam(1e-3)``;
      its learning rate included), and at full size on leaves not projected.
    mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name``; other axes are
      left to the compiler (parameters sharded over them stay sharded).
    local_steps: ``L``, inner steps per round (DiLoCo uses 500).
    projection: a spec such as ``olr.semi_orthogonal(r)``, or ``None``.
    scheme: ``"identical"``, ``"independent"`` or ``"disjoint"`` (see the module
      docstring); ``"disjoint"`` needs ``olr.semi_orthogonal``.
    outer: the outer optimizer; default :func:`default_outer` (DiLoCo's
      Nesterov SGD, ``0.7``/``0.9``).  Any optax transformation.
    axis_name: the worker axis of ``mesh``.
    seed: seed of the random bases (shared; see :func:`worker_key`).
    on_refresh, scale, where, reshape: passed to ``olr.low_rank``.

  Returns:
    A :class:`DiLoCo`.

  Raises:
    ValueError: a mesh without ``axis_name``, an unknown scheme, a bad
      ``local_steps``, ``"disjoint"`` with another projection; at ``init``
      (before tracing) a leaf with ``rank × K`` above its projected dimension;
      at ``round`` (before tracing) batches whose leading axes are not
      ``(local_steps, multiple of K)``.

  (Long because the jitted, shard-mapped ``init`` and ``round`` close over the
  mesh and the worker transformation; one round's computation is
  :func:`diloco_round`.)
  """
  num_workers = _num_workers(mesh, axis_name, scheme, local_steps)
  outer = default_outer() if outer is None else outer
  if projection is None:
    worker_tx, spec = inner, None
  else:
    spec = worker_projection(projection, scheme, num_workers, axis_name=axis_name)
    worker_tx = low_rank(
        inner, spec, refresh_every=local_steps, on_refresh=on_refresh, scale=scale,
        where=where, seed=seed, reshape=reshape,
    )
  per_worker = P(axis_name)
  rows = NamedSharding(mesh, P(None, axis_name))

  # Only the worker axis is mapped by hand; other mesh axes stay under the compiler's
  # automatic partitioning (weights sharded over "fsdp" stay sharded inside a worker).
  # check_vma=False: optax transformations that build constants inside a lax.cond
  # (on_refresh="reset", optax.MultiSteps, optax.apply_if_finite) are not typed for
  # shard_map's replication checks; the outputs declared replicated (weights, outer
  # state) are replicated by construction, computed from the pmean.
  def shard_map(f, in_specs, out_specs):
    return jax.shard_map(
        f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis_name},
        check_vma=False,
    )

  def init_worker(params):
    state = worker_tx.init(params)
    state = assign_worker(state, jax.lax.axis_index(axis_name), scheme)
    return jax.tree.map(lambda x: x[None], state)

  @jax.jit
  def init_jit(params):
    inner_states = shard_map(init_worker, P(), per_worker)(params)
    return DiLoCoState(jnp.zeros([], jnp.int32), params, outer.init(params), inner_states)

  def round_worker(state, batches):
    state = state._replace(inner_states=jax.tree.map(lambda x: x[0], state.inner_states))
    state, metrics = diloco_round(
        state, batches, loss_fn=loss_fn, inner=worker_tx, outer=outer, axis_name=axis_name
    )
    return state._replace(inner_states=jax.tree.map(lambda x: x[None], state.inner_states)), metrics

  state_specs = DiLoCoState(P(), P(), P(), per_worker)
  metric_specs = RoundMetrics(P(), per_worker, P())
  round_jit = jax.jit(
      shard_map(round_worker, (state_specs, P(None, axis_name)), (state_specs, metric_specs))
  )

  def init_fn(params: Params) -> DiLoCoState:
    if spec is not None:  # bad ranks / leaves fail here, in Python, naming the leaf
      leaves_lib.plan(params, spec, where, reshape)
    return init_jit(params)

  def round_fn(state: DiLoCoState, batches: Batch) -> tuple[DiLoCoState, RoundMetrics]:
    _check_batches(batches, local_steps, num_workers, axis_name)
    return round_jit(state, jax.device_put(batches, rows))

  def lower_round(state: DiLoCoState, batches: Batch) -> Any:
    _check_batches(batches, local_steps, num_workers, axis_name)
    return round_jit.lower(state, jax.device_put(batches, rows))

  # As on a jitted function: ``diloco.round.lower(state, batches).compile().as_text()``
  # is the program one round runs (to read its collectives, its memory).
  init_fn.lower = init_jit.lower
  round_fn.lower = lower_round
  return DiLoCo(init_fn, round_fn, worker_tx, num_workers)


def _num_workers(mesh: Mesh, axis_name: str, scheme: str, local_steps: int) -> int:
  """The size of the worker axis, after checking :func:`make_diloco`'s arguments."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis_name not in mesh.axis_names:
    raise ValueError(
        f"the mesh has axes {tuple(mesh.axis_names)} but no worker axis {axis_name!r}; "
        "build it with that name or pass `axis_name=`"
    )
  _check_scheme(scheme)
  if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
    raise ValueError(f"`local_steps` must be an int >= 1, got {local_steps!r}")
  return int(mesh.shape[axis_name])


def _check_batches(batches: Batch, local_steps: int, num_workers: int, axis_name: str) -> None:
  flat = jax.tree_util.tree_flatten_with_path(batches)[0]
  if not flat:
    raise ValueError("`batches` has no arrays")
  for path, leaf in flat:
    shape = tuple(np.shape(leaf))
    where = f"batch leaf '{jax.tree_util.keystr(path) or '<root>'}' of shape {shape}"
    if len(shape) < 2 or shape[0] != local_steps:
      raise ValueError(
          f"{where}: expected leading axes (local_steps={local_steps}, batch, ...): one "
          "batch per local step of the round"
      )
    if shape[1] % num_workers:
      raise ValueError(
          f"{where}: the batch size {shape[1]} is not divisible by the {num_workers} "
          f"workers of mesh axis {axis_name!r}"
      )


# ----------------------------------------------------------------------------
# Sharded single-job training.


def state_shardings(
    tx: optax.GradientTransformation, params: Params, *extra_args: Any
) -> Any:
  """The shardings ``tx``'s state gets when parameters are sharded as ``params``.

  Compiles one ``tx.update`` with gradients and parameters sharded like
  ``params`` (arrays placed with a ``NamedSharding``, or
  ``jax.ShapeDtypeStruct`` with a ``sharding``) and returns the shardings the
  compiler chose for the new state.  For ``olr.low_rank`` the coefficient-
  shaped statistics follow the unprojected axis of their leaf (the row-sharded
  ``m × r`` coefficients of a row-sharded, right-projected leaf), stored
  bases and counters are replicated.  Use them to create the state sharded
  instead of replicated:

  ```python
  opt_state = jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)
  ```

  Args:
    tx: any optax transformation.
    params: the sharded parameters.
    *extra_args: further positional arguments of the compiled update, for
      transformations that need them (rarely).

  Returns:
    A pytree of shardings with the structure of ``tx.init(params)``.
  """
  shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
  )
  state = jax.eval_shape(tx.init, abstract)

  def update(grads, opt_state, weights, *extra):
    return tx.update(grads, opt_state, weights, *extra)[1]

  compiled = (
      jax.jit(update, in_shardings=(shardings, None, shardings) + (None,) * len(extra_args))
      .lower(abstract, state, abstract, *extra_args)
      .compile()
  )
  return compiled.output_shardings

