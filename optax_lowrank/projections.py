"""Projection specs: frozen, hashable descriptions of how to make a basis.

A spec says *which* linear map a leaf gets; :mod:`optax_lowrank.bases` applies
it, and :mod:`optax_lowrank.subspaces` holds the numerical kernels that make
its factors (sketches, range finders, subspace tracking, FLOP counts).
Specs are immutable dataclasses, so they can be closed over by jitted
functions and compared for equality (an adapter remembers the spec it was
built with).

======================  ========================================  ==================  ===========
spec                    basis                                     scaling             stored?
======================  ========================================  ==================  ===========
``svd(r)``              top-``r`` singular vectors of the         orthonormal         yes
                        gradient at each refresh (GaLore)
``randomized_svd(r)``   the same subspace, randomized range       orthonormal         yes
                        finder with power iterations
``subspace_iteration``  the previous basis moved towards the      orthonormal         yes
``(r)``                 gradient's top-``r`` subspace by warm-
                        started subspace iteration (no SVD)
``gaussian(r)``         i.i.d. ``N(0, 1/r)`` entries (Flora)      ``E[SᵀS] = I``      no (key)
``rademacher(r)``       i.i.d. ``±1/√r`` entries                  ``E[SᵀS] = I``      no (key)
``semi_orthogonal(r)``  QR of a Gaussian matrix                   orthonormal rows    yes
``two_sided(rl, rr)``   one factor per side, ``kind`` gaussian    as its kind         svd: yes
                        or svd
``tucker(ranks)``       HOSVD of the gradient, one factor/mode    orthonormal         yes
``dense(k)``            a general ``k × mn`` map on ``vec(W)``    as its kind         gaussian: no
======================  ========================================  ==================  ===========

*Stored* bases are kept in the optimizer state (``r·n`` floats per leaf for a
one-sided basis); the others are rebuilt on every step from a PRNG key derived
from ``(seed, refresh index, leaf index)``, so the state holds no projector at
all — the point of Flora.  Semi-orthogonal bases are stored because their QR
(``O(n r²)``) is not free on an accelerator's hot path; it runs only at a
refresh.

``side`` for one-sided specs: ``"left"`` projects the rows (``C = P G``,
``P ∈ R^{r×m}``), ``"right"`` the columns (``C = G Q``, ``Q ∈ R^{n×r}``), and
``"auto"`` follows the reference GaLore code: right when ``m ≥ n``, else left,
i.e. the projector spans the smaller dimension and the coefficients are
``max(m, n) × r``.

Ranks larger than a leaf allows are clamped, not rejected, because one spec is
usually shared by leaves of many shapes: a matrix rank to ``min(m, n)`` (on
both sides of a two-sided map), a Tucker mode rank to
``min(n_i, size / n_i)`` (the rank of the mode unfolding), a dense rank to
``m·n``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from optax_lowrank.bases import Basis
from optax_lowrank.subspaces import RANDOM_KINDS as _RANDOM_KINDS
from optax_lowrank.subspaces import (  # noqa: F401  (re-exported: olr.projections.X)
    qr_flops,
    random_factor,
    randomized_range,
    randomized_range_flops,
    subspace_overlap,
    svd_flops,
    top_singular,
    tracked_range,
    tracked_range_flops,
)

Array = jax.Array
Side = Literal["auto", "left", "right"]

__all__ = [
    "Projection",
    "svd",
    "randomized_svd",
    "subspace_iteration",
    "gaussian",
    "rademacher",
    "semi_orthogonal",
    "two_sided",
    "tucker",
    "dense",
]

_SIDES = ("auto", "left", "right")


def _check_rank(name: str, rank) -> int:
  if isinstance(rank, bool) or not isinstance(rank, int):
    raise TypeError(f"`{name}` must be an int > 0, got {rank!r}")
  if rank <= 0:
    raise ValueError(f"`{name}` must be an int > 0, got {rank}")
  return rank


def _check_side(side) -> str:
  if side not in _SIDES:
    raise ValueError(f"`side` must be one of {_SIDES}, got {side!r}")
  return side


# ----------------------------------------------------------------------------
# Specs.


@dataclasses.dataclass(frozen=True)
class Projection:
  """Base class of projection specs.

  A spec answers four questions about a leaf, all from static shapes:
  ``view`` (how the leaf is seen: ``"matrix"``, ``"tensor"`` or ``"vector"``),
  ``axis_ranks(view_shape)`` (the clamped rank of each view axis, ``None`` where the
  axis is not reduced), ``stored`` (whether the basis lives in the state) and
  ``needs_grad`` (whether it is made from the gradient).
  ``make(view_shape, key, grad, dtype)`` builds the factors of one matrix (or
  tensor, or vector) in ``dtype`` (float32 or wider); ``grad`` is its gradient
  in the view, already cast to ``dtype`` (``None`` when not needed).  A spec
  that ``tracks`` makes later factors from the previous ones (``track``);
  ``refresh_flops`` estimates a refresh's work.  :meth:`basis` and
  :meth:`refreshed` build a whole leaf's :class:`Basis`, stacks included.
  """

  view = "matrix"

  @property
  def stored(self) -> bool:  # pragma: no cover - overridden
    raise NotImplementedError

  @property
  def needs_grad(self) -> bool:
    return False

  def axis_ranks(self, view_shape: tuple[int, ...]) -> tuple[int | None, ...]:  # pragma: no cover
    raise NotImplementedError

  def make(self, view_shape, key, grad, dtype) -> tuple[Array | None, ...]:  # pragma: no cover
    raise NotImplementedError

  @property
  def tracks(self) -> bool:
    """Whether a refresh starts from the previous basis (see :func:`subspace_iteration`)."""
    return False

  def track(self, view_shape, key, grad, previous, dtype) -> tuple[Array | None, ...]:
    """The next factors of one matrix from its previous ones (``make`` unless the spec tracks)."""
    del previous
    return self.make(view_shape, key, grad, dtype)

  def refresh_flops(self, view_shape: tuple[int, ...]) -> int:
    """Estimated floating-point operations of one matrix's refresh (0: no decomposition)."""
    return 0

  def basis(self, shape, view_shape, perm, key, grad, dtype, batch_shape=(), previous=None,
            due=None) -> Basis:
    """Build the :class:`Basis` of one leaf (float32 or wider ``dtype``).

    ``grad`` (when the spec needs it) is the leaf's gradient in the view, in
    the leaf's dtype; :meth:`make` receives it cast to ``dtype``.

    For a stacked leaf (``batch_shape`` not empty) every matrix gets its own
    factors, from ``grad`` of shape ``batch_shape + view_shape`` and from
    per-matrix keys ``fold_in(key, b)``, ``b`` the row-major index of the
    matrix in the stack.  They are made by one ``lax.map`` of :meth:`make` over
    the stack: one decomposition in the program, run matrix after matrix, so
    a refresh holds one matrix's SVD or QR workspace at a time, not the
    stack's (at LLaMA-7B shapes a batched SVD's f32 workspace is tens of GB);
    the LAPACK work is the same either way.  Random sketches without a
    decomposition are drawn as one batch.

    ``previous`` (the leaf's current :class:`Basis`, or ``None``) is what a
    tracking spec starts from; ``due`` (bool, ``batch_shape``) limits the
    refresh to some matrices: the others keep their ``previous`` factors, and
    each due matrix's work runs under its own ``lax.cond`` (inside the
    ``lax.map`` of a stack), so only due matrices are decomposed.
    """
    return self.refreshed(shape, view_shape, perm, key, grad, dtype, batch_shape, previous,
                          due)[0]

  def refreshed(self, shape, view_shape, perm, key, grad, dtype, batch_shape=(), previous=None,
                due=None) -> tuple[Basis, Array | None]:
    """:meth:`basis` and, when ``previous`` is given, each matrix's subspace overlap.

    The overlap of a matrix is ``Σ_i ‖U_iᵒˡᵈᵀ U_iⁿᵉʷ‖²_F / Σ_i r_i`` over its
    factored axes (float32, ``batch_shape``): the mean squared cosine of the
    principal angles between the old and the new subspaces, 1 when the
    subspace did not move (and for matrices that are not due), 0 when it is
    orthogonal to the old one.  ``None`` without ``previous``.
    """
    view_shape, batch_shape = tuple(view_shape), tuple(batch_shape)

    # ``make`` sees the gradient in ``dtype``; the cast happens per matrix, so
    # a bf16 stack is never copied to float32 whole.
    def one(k, g, prev, d):
      g = None if g is None else g.astype(dtype)
      if prev is None:
        return self.make(view_shape, k, g, dtype), None

      def fresh():
        new = self.track(view_shape, k, g, prev, dtype)
        return new, subspace_overlap(prev, new)

      if d is None:
        return fresh()
      keep = lambda: (prev, jnp.ones([], jnp.float32))
      return jax.lax.cond(d, fresh, keep)

    prev = None if previous is None else previous.factors
    if not batch_shape:
      factors, overlap = one(key, grad, prev, due)
      return Basis(factors, tuple(shape), view_shape, perm), overlap
    count = math.prod(batch_shape)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(count, dtype=jnp.uint32))
    flat = lambda x: None if x is None else x.reshape((count,) + x.shape[len(batch_shape):])
    if grad is None and prev is None:
      factors, overlap = jax.vmap(lambda k: one(k, None, None, None))(keys)
    else:
      prev_flat = None if prev is None else tuple(flat(f) for f in prev)
      due_flat = None if due is None else jnp.broadcast_to(due, batch_shape).reshape(count)
      factors, overlap = jax.lax.map(lambda a: one(*a), (keys, flat(grad), prev_flat, due_flat))
    factors = tuple(
        None if f is None else f.reshape(batch_shape + f.shape[1:]) for f in factors
    )
    if overlap is not None:
      overlap = overlap.reshape(batch_shape)
    return Basis(factors, tuple(shape), view_shape, perm, batch_shape), overlap


@dataclasses.dataclass(frozen=True)
class _OneSided(Projection):
  rank: int
  side: Side = "auto"

  def __post_init__(self):
    _check_rank("rank", self.rank)
    _check_side(self.side)

  def resolved_side(self, view_shape: tuple[int, int]) -> str:
    m, n = view_shape
    if self.side == "auto":
      return "right" if m >= n else "left"
    return self.side

  def axis_ranks(self, view_shape):
    r = min(self.rank, *view_shape)
    if self.resolved_side(view_shape) == "left":
      return (r, None)
    return (None, r)

  def _factor(self, view_shape, key, grad, dtype, r, n, side) -> Array:
    raise NotImplementedError

  def make(self, view_shape, key, grad, dtype):
    side = self.resolved_side(view_shape)
    rl, rr = self.axis_ranks(view_shape)
    if side == "left":
      return (self._factor(view_shape, key, grad, dtype, rl, view_shape[0], side), None)
    return (None, self._factor(view_shape, key, grad, dtype, rr, view_shape[1], side))


@dataclasses.dataclass(frozen=True)
class SVD(_OneSided):
  """Top-``rank`` singular vectors of the gradient at each refresh (GaLore)."""

  stored = True
  needs_grad = True

  def _factor(self, view_shape, key, grad, dtype, r, n, side):
    del key, n
    u, v = top_singular(grad.astype(dtype), r, r)
    return u if side == "left" else v

  def refresh_flops(self, view_shape):
    return svd_flops(*view_shape)


@dataclasses.dataclass(frozen=True)
class RandomizedSVD(_OneSided):
  """The top-``rank`` singular subspace from a randomized range finder."""

  oversample: int = 16
  power_iters: int = 2

  stored = True
  needs_grad = True

  def __post_init__(self):
    super().__post_init__()
    for name in ("oversample", "power_iters"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")

  def _factor(self, view_shape, key, grad, dtype, r, n, side):
    del n
    g = grad.astype(dtype)
    if side == "right":
      g = g.T
    return randomized_range(g, r, key, self.oversample, self.power_iters)

  def refresh_flops(self, view_shape):
    m, n = view_shape
    if self.resolved_side(view_shape) == "right":
      m, n = n, m
    return randomized_range_flops(m, n, min(self.rank, m, n), self.oversample, self.power_iters)


@dataclasses.dataclass(frozen=True)
class SubspaceIteration(_OneSided):
  """The previous basis moved towards the gradient's top-``rank`` subspace (no SVD).

  See :func:`subspace_iteration`.
  """

  iters: int = 1
  init: str = "randomized"
  oversample: int = 16
  power_iters: int = 2
  align: bool = False

  stored = True
  needs_grad = True

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
      raise ValueError(f"`iters` must be an int >= 1, got {self.iters!r}")
    if self.init not in ("randomized", "svd"):
      raise ValueError(f"`init` must be 'randomized' or 'svd', got {self.init!r}")
    for name in ("oversample", "power_iters"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")

  @property
  def tracks(self) -> bool:
    return True

  def _oriented(self, view_shape, grad, dtype, side):
    g = grad.astype(dtype)
    return g.T if side == "right" else g

  def _first(self, g, key, r):
    if self.init == "svd":
      u, _, _ = jnp.linalg.svd(g, full_matrices=False)
      return u[:, :r]
    return randomized_range(g, r, key, self.oversample, self.power_iters)

  def _factor(self, view_shape, key, grad, dtype, r, n, side):
    del n
    return self._first(self._oriented(view_shape, grad, dtype, side), key, r)

  def track(self, view_shape, key, grad, previous, dtype):
    side = self.resolved_side(view_shape)
    u = previous[0 if side == "left" else 1].astype(dtype)
    g = self._oriented(view_shape, grad, dtype, side)
    # The state's placeholder basis is all zeros: the first refresh starts from scratch.
    f = jax.lax.cond(jnp.any(u != 0),
                     lambda: tracked_range(g, u, self.iters, self.align),
                     lambda: self._first(g, key, u.shape[-1]))
    return (f, None) if side == "left" else (None, f)

  def refresh_flops(self, view_shape):
    m, n = view_shape
    if self.resolved_side(view_shape) == "right":
      m, n = n, m
    return tracked_range_flops(m, n, min(self.rank, m, n), self.iters, self.align)


@dataclasses.dataclass(frozen=True)
class RandomSketch(_OneSided):
  """A random one-sided sketch rebuilt from a key (gaussian, rademacher, semi-orthogonal)."""

  kind: str = "gaussian"

  def __post_init__(self):
    super().__post_init__()
    if self.kind not in _RANDOM_KINDS:
      raise ValueError(f"`kind` must be one of {_RANDOM_KINDS}, got {self.kind!r}")

  @property
  def stored(self) -> bool:
    return self.kind == "semi_orthogonal"

  def _factor(self, view_shape, key, grad, dtype, r, n, side):
    del grad, side
    return random_factor(self.kind, key, n, r, dtype)

  def refresh_flops(self, view_shape):
    if self.kind != "semi_orthogonal":
      return 0
    n = [d for d, r in zip(view_shape, self.axis_ranks(view_shape)) if r is not None][0]
    return qr_flops(n, min(self.rank, *view_shape))


@dataclasses.dataclass(frozen=True)
class TwoSided(Projection):
  """``S = Rᵀ ⊗ L``: ``C = L G R`` with ``L ∈ R^{r_l×m}``, ``R ∈ R^{n×r_r}``.

  Torroba-Hennigen, Lang, Guo and Kim 2025, arXiv:2502.13811, Prop. 2.
  """

  left_rank: int
  right_rank: int
  kind: str = "gaussian"

  def __post_init__(self):
    _check_rank("left_rank", self.left_rank)
    _check_rank("right_rank", self.right_rank)
    if self.kind not in ("gaussian", "svd"):
      raise ValueError(f"`kind` must be 'gaussian' or 'svd', got {self.kind!r}")

  @property
  def stored(self) -> bool:
    return self.kind == "svd"

  @property
  def needs_grad(self) -> bool:
    return self.kind == "svd"

  def axis_ranks(self, view_shape):
    k = min(view_shape)
    return (min(self.left_rank, k), min(self.right_rank, k))

  def refresh_flops(self, view_shape):
    return svd_flops(*view_shape) if self.kind == "svd" else 0

  def make(self, view_shape, key, grad, dtype):
    rl, rr = self.axis_ranks(view_shape)
    if self.kind == "svd":
      return top_singular(grad.astype(dtype), rl, rr)
    kl, kr = jax.random.split(key)
    m, n = view_shape
    return (
        random_factor("gaussian", kl, m, rl, dtype),
        random_factor("gaussian", kr, n, rr, dtype),
    )


@dataclasses.dataclass(frozen=True)
class Tucker(Projection):
  """One orthonormal factor per mode from the gradient's HOSVD (see :func:`tucker`).

  ``ranks`` is one int per mode of the leaf (or a single int for every mode).
  """

  ranks: tuple[int, ...] | int = 8
  view = "tensor"
  stored = True
  needs_grad = True

  def __post_init__(self):
    r = self.ranks
    if isinstance(r, int) and not isinstance(r, bool):
      _check_rank("ranks", r)
    else:
      if not isinstance(r, tuple) or not r:
        raise ValueError(f"`ranks` must be an int or a non-empty tuple of ints, got {r!r}")
      for x in r:
        _check_rank("ranks", x)

  def axis_ranks(self, view_shape):
    r = self.ranks
    if isinstance(r, int):
      r = (r,) * len(view_shape)
    if len(r) != len(view_shape):
      raise ValueError(
          f"`ranks` has {len(r)} entries but the leaf has {len(view_shape)} modes"
      )
    size = math.prod(view_shape)
    return tuple(min(ri, n, size // n) for ri, n in zip(r, view_shape))

  def refresh_flops(self, view_shape):
    size = math.prod(view_shape)
    return sum(svd_flops(n, size // n) for n in view_shape)

  def make(self, view_shape, key, grad, dtype):
    del key
    g = grad.astype(dtype)
    factors = []
    for i, r in enumerate(self.axis_ranks(view_shape)):
      unfold = jnp.moveaxis(g, i, 0).reshape(view_shape[i], -1)
      u, _, _ = jnp.linalg.svd(unfold, full_matrices=False)
      factors.append(u[:, :r])
    return tuple(factors)


@dataclasses.dataclass(frozen=True)
class Dense(Projection):
  """A general ``k × mn`` map on ``vec(W)`` (row-major); for small leaves only."""

  rank: int
  kind: str = "gaussian"
  view = "vector"

  def __post_init__(self):
    _check_rank("rank", self.rank)
    if self.kind not in _RANDOM_KINDS:
      raise ValueError(f"`kind` must be one of {_RANDOM_KINDS}, got {self.kind!r}")

  @property
  def stored(self) -> bool:
    return self.kind == "semi_orthogonal"

  def axis_ranks(self, view_shape):
    return (min(self.rank, view_shape[0]),)

  def make(self, view_shape, key, grad, dtype):
    del grad
    (k,) = self.axis_ranks(view_shape)
    return (random_factor(self.kind, key, view_shape[0], k, dtype),)


# ----------------------------------------------------------------------------
# Public constructors (the names of the contract).


def svd(rank: int, side: Side = "auto") -> Projection:
  """GaLore's projection: the top-``rank`` singular vectors of the gradient.

  Computed (``jnp.linalg.svd`` in float32 or wider) only at a refresh, from the
  gradient of that step; stored in the state (``n·r`` floats per leaf, ``n`` the
  projected dimension).  Orthonormal: ``P Pᵀ = I_r``.  Zhao et al. 2024, GaLore,
  arXiv:2403.03507, Alg. 1.
  """
  return SVD(rank, side)


def randomized_svd(
    rank: int, side: Side = "auto", oversample: int = 16, power_iters: int = 2
) -> Projection:
  """The same subspace as :func:`svd` from a randomized range finder.

  ``power_iters`` subspace iterations on ``G Gᵀ`` with ``oversample`` extra
  columns (Halko, Martinsson & Tropp 2011; see :func:`randomized_range`).  Cost
  ``2·(power_iters + 1)`` GEMMs of ``m·n·(rank + oversample)`` multiply-adds plus
  QRs of thin matrices, instead of a full SVD's ``O(m·n·min(m, n))``.
  Orthonormal, stored, float32 (float64 for float64 leaves).

  The defaults (``oversample=16``, ``power_iters=2``) come from
  ``benchmarks/refresh_accuracy.py`` (``docs/benchmarks.md``): on a
  ``1024 × 2816`` gradient made of a rank-128 signal plus noise (a gap
  ``σ_128/σ_129 ≈ 1.7``) and ``rank=128`` they recover the exact SVD's subspace
  with a mean squared cosine of the principal angles above 0.99 and keep more
  than 99.9 % of the gradient energy the exact subspace keeps, about ten times
  faster than ``jnp.linalg.svd`` on a CPU.  Flat spectra without a gap (a
  power law) converge more slowly in angle, not in captured energy; raise
  ``power_iters`` when the basis itself, not the projected gradient, matters.
  """
  return RandomizedSVD(rank, side, oversample, power_iters)


def subspace_iteration(
    rank: int,
    side: Side = "auto",
    iters: int = 1,
    *,
    init: str = "randomized",
    oversample: int = 16,
    power_iters: int = 2,
    align: bool = False,
) -> Projection:
  """GaLore's subspace, tracked from refresh to refresh without an SVD.

  The first basis of every matrix is made from scratch (``init="randomized"``:
  :func:`randomized_range` with ``oversample`` and ``power_iters``; ``"svd"``:
  the exact top-``rank`` singular vectors).  Every later refresh starts from
  the matrix's current basis ``U`` and takes ``iters`` steps of subspace
  iteration on the new gradient, ``U ← qr(G Gᵀ U)`` on the projected side
  (:func:`tracked_range`).  The QR's signs are fixed so that column ``j``
  stays next to its previous value, and repeated refreshes turn the columns
  towards the gradient's singular vectors in order: the inner optimizer works
  in the gradient's principal axes, as after GaLore's SVD, and a converged
  basis no longer changes.  ``align=True`` rotates each result instead to be
  as close to the old ``U`` as possible, which keeps the first basis's
  coordinates for good; in the 600-step comparison job that ended 0.8 % above
  GaLore's validation loss where the default ended 2.0 % below it
  (``docs/how-to/refresh.md``).  This is the online-PCA /
  subspace-tracking view of the refresh that SubTrack++ (Rajabi et al. 2025,
  arXiv:2502.01586) takes with a Grassmannian step; here it is the classical
  warm-started orthogonal iteration.

  Cost of a refresh of an ``m × n`` matrix projected on its ``m``-side, rank
  ``r``: ``iters·(4·m·n·r + 4·m·r²) + 4·m·r² + O(r³)`` FLOPs, against
  ``6·n·m² + 20·m³`` for the SVD (Golub & Van Loan's count): at
  ``512 × 1376``, ``r = 128`` one step is 9.9 % of an SVD, at ``1024 × 2816``
  4.2 % (``refresh_flops``; ``docs/how-to/refresh.md`` has the measured times).
  Accuracy: on a fixed gradient the principal angles to the exact top-``r``
  subspace shrink by ``(σ_{r+1}/σ_r)²`` per step, so repeated refreshes
  converge to it; a drifting subspace is followed one step per refresh, so it
  lags the exact one when the drift of a period is large against the spectral
  gap (then raise ``iters``).  Orthonormal, stored, float32 (float64 for
  float64 leaves).
  """
  return SubspaceIteration(rank, side, iters, init, oversample, power_iters, align)


def gaussian(rank: int, side: Side = "auto") -> Projection:
  """A Gaussian sketch with ``N(0, 1/rank)`` entries, so ``E[SᵀS] = I``.

  Rebuilt from ``(seed, refresh index, leaf index)`` on every step and never
  stored: the optimizer state holds only a PRNG key (Flora: Hao, Cao and Mou
  2024, arXiv:2402.03293).
  """
  return RandomSketch(rank, side, "gaussian")


def rademacher(rank: int, side: Side = "auto") -> Projection:
  """A random ``±1/√rank`` sketch, ``E[SᵀS] = I``; rebuilt from a key, not stored."""
  return RandomSketch(rank, side, "rademacher")


def semi_orthogonal(rank: int, side: Side = "auto") -> Projection:
  """A random basis with orthonormal rows (QR of a Gaussian matrix).

  Made from the key at each refresh and stored (its ``O(n r²)`` QR then runs only
  on refresh steps).
  """
  return RandomSketch(rank, side, "semi_orthogonal")


def two_sided(left_rank: int, right_rank: int, kind: str = "gaussian") -> Projection:
  """A Kronecker map ``S = Rᵀ ⊗ L``: coefficients ``L G R`` of shape ``(left_rank, right_rank)``.

  ``kind="gaussian"``: both sides Gaussian sketches rebuilt from the key (not
  stored); ``kind="svd"``: top singular vectors on both sides, stored.  The
  adapter form is ``W0 + Lᵀ Λ Rᵀ``, the form of MoRA (Jiang et al. 2024,
  arXiv:2405.12130) and LoRA-XS (Bałazy et al. 2024, arXiv:2405.17604)
  (Torroba-Hennigen, Lang, Guo and Kim 2025, arXiv:2502.13811, Prop. 2).
  """
  return TwoSided(left_rank, right_rank, kind)


def tucker(ranks: Sequence[int] | int) -> Projection:
  """Tucker projection of N-d leaves: ``C = G ×_1 U_1ᵀ … ×_N U_Nᵀ``.

  Each ``U_i`` holds the top ``ranks[i]`` left singular vectors of the mode-``i``
  unfolding of the gradient at a refresh (HOSVD: De Lathauwer, De Moor and
  Vandewalle 2000); stored, ``Σ_i n_i r_i`` floats per leaf.  ``ranks``: one
  int per mode, or one int for every mode; each is clamped to the rank of its
  unfolding, ``min(n_i, size / n_i)``.  The gradient projection of Natural
  GaLore (Das 2024, arXiv:2410.16029, §2.1.1) after Tucker (1966).
  """
  if isinstance(ranks, int) and not isinstance(ranks, bool):
    return Tucker(ranks)
  return Tucker(tuple(ranks))


def dense(rank: int, kind: str = "gaussian") -> Projection:
  """A general linear map ``S ∈ R^{k×mn}`` on ``vec(W)``.

  The general case of the duality (Torroba-Hennigen, Lang, Guo and Kim 2025,
  arXiv:2502.13811, Theorem 1).

  ``k = rank`` outputs; the factor has ``mn·k`` entries, so use it for small
  leaves.  ``kind`` as for one-sided random sketches.
  """
  return Dense(rank, kind)


def leaf_key(base_key: Array, refresh_index: Array, leaf_index: int) -> Array:
  """The PRNG key of one leaf's basis at one refresh (shared by both paths)."""
  return jax.random.fold_in(jax.random.fold_in(base_key, refresh_index), leaf_index)


def basis_dtype(dtype) -> jnp.dtype:
  """Bases are computed and kept in float32, or float64 for float64 leaves."""
  return jnp.promote_types(dtype, jnp.float32)


def num_factor_elements(spec: Projection, view_shape: tuple[int, ...]) -> int:
  """Number of factor entries of a basis for a view (stored or not)."""
  return sum(n * r for n, r in zip(view_shape, spec.axis_ranks(view_shape)) if r is not None)


def coefficient_shape(spec: Projection, view_shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(n if r is None else r for n, r in zip(view_shape, spec.axis_ranks(view_shape)))

