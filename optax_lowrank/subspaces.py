"""Subspaces for bases: random sketches, top singular subspaces and their cost.

The numerical kernels behind the projection specs of
:mod:`optax_lowrank.projections`, each on one ``n × r`` factor or one
``m × n`` matrix, in float32 or wider:

* :func:`random_factor`: Gaussian, Rademacher or semi-orthogonal sketches;
* :func:`top_singular`: the exact top singular vectors (``jnp.linalg.svd``);
* :func:`randomized_range`: the same subspace from a randomized range finder
  (Halko, Martinsson and Tropp 2011, arXiv:0909.4061);
* :func:`tracked_range`: a previous basis moved towards the new top subspace
  by warm-started subspace iteration;
* :func:`subspace_overlap`: how far a refresh moved a basis;
* FLOP counts of each (:func:`svd_flops`, ...), to express refresh work in
  "SVD equivalents".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

RANDOM_KINDS = ("gaussian", "rademacher", "semi_orthogonal")


def random_factor(kind: str, key: Array, n: int, r: int, dtype) -> Array:
  """An ``n × r`` random factor with ``E[U Uᵀ] = I_n`` (or orthonormal columns)."""
  if kind == "gaussian":
    return jax.random.normal(key, (n, r), dtype) / jnp.sqrt(jnp.asarray(r, dtype))
  if kind == "rademacher":
    signs = jax.random.rademacher(key, (n, r), dtype)
    return signs / jnp.sqrt(jnp.asarray(r, dtype))
  if kind == "semi_orthogonal":
    q, rr = jnp.linalg.qr(jax.random.normal(key, (n, r), dtype))
    # Fix the signs so the factor is a deterministic function of the key.
    return q * jnp.where(jnp.diagonal(rr) < 0, -1.0, 1.0).astype(dtype)
  raise ValueError(f"unknown random kind {kind!r}; expected one of {RANDOM_KINDS}")


def top_singular(g: Array, r_left: int, r_right: int) -> tuple[Array, Array]:
  """Top left (m×r_left) and right (n×r_right) singular vectors of ``g``."""
  u, _, vh = jnp.linalg.svd(g, full_matrices=False)
  return u[:, :r_left], vh[:r_right].T


def randomized_range(
    g: Array, r: int, key: Array, oversample: int, power_iters: int
) -> Array:
  """Orthonormal ``m × r`` basis of the dominant column space of ``g`` (m×n).

  Randomized subspace iteration (Halko, Martinsson & Tropp 2011, §4.5), with
  ``k = min(r + oversample, m, n)`` columns:

  1. ``Q = orth(G Ω)`` for a Gaussian ``Ω ∈ R^{n×k}`` drawn from ``key``;
  2. ``power_iters`` times ``Q = orth(G (Gᵀ Q))``: one QR per application of
     ``G Gᵀ`` instead of one per factor;
  3. the QR ``Gᵀ Q = Q_z R_z`` (``n × k``) and the SVD of the small ``R_z``
     (``k × k``): the right singular vectors ``V`` of ``R_z`` are the left
     singular vectors of ``Qᵀ G = R_zᵀ Q_zᵀ``, so the basis is ``Q V[:, :r]``,
     the top ``r`` singular directions of ``G`` restricted to ``span(Q)``.

  Cost: ``2·(power_iters + 1)`` products of ``G`` or ``Gᵀ`` with a ``k``-column
  matrix (``m·n·k`` multiply-adds each), ``power_iters + 1`` QRs of ``m × k``, one
  QR of ``n × k`` and an SVD of ``k × k``.  Against the textbook form (a QR after
  every product and an SVD of the ``k × n`` matrix ``Qᵀ G``) this saves
  ``power_iters`` QRs of ``n × k`` and replaces the ``k × n`` SVD by an ``n × k``
  QR; ``benchmarks/refresh_accuracy.py`` measured the same subspaces, to four
  digits of the mean squared cosine, in float32 on gradients whose spectra span
  four decades.

  When ``k`` reaches ``min(m, n)`` the sketch would span the whole space and
  cost more than an exact decomposition, so the exact SVD is used instead
  (``key`` is then unused); small leaves thus get exact bases.
  """
  m, n = g.shape
  k = min(r + oversample, m, n)
  if k >= min(m, n):
    u, _, _ = jnp.linalg.svd(g, full_matrices=False)
    return u[:, :r]
  omega = jax.random.normal(key, (n, k), g.dtype)
  q, _ = jnp.linalg.qr(g @ omega)
  for _ in range(power_iters):
    q, _ = jnp.linalg.qr(g @ (g.T @ q))
  r_z = jnp.linalg.qr(g.T @ q, mode="r")
  _, _, vh = jnp.linalg.svd(r_z, full_matrices=False)
  return q @ vh[:r].T


def randomized_range_flops(m: int, n: int, r: int, oversample: int, power_iters: int) -> int:
  """FLOPs of :func:`randomized_range` on an ``m × n`` matrix (the exact SVD when it falls back)."""
  k = min(r + oversample, m, n)
  if k >= min(m, n):
    return svd_flops(m, n)
  gemms = (2 * power_iters + 2) * 2 * m * n * k
  return (gemms + (power_iters + 1) * qr_flops(m, k) + 2 * n * k * k + svd_flops(k, k)
          + 2 * m * k * r)


def tracked_range(g: Array, u: Array, iters: int, align: bool) -> Array:
  """``u`` (``m × r``, orthonormal) moved towards the top-``r`` column space of ``g`` (``m × n``).

  ``iters`` steps of subspace (orthogonal) iteration warm-started from ``u``,
  ``U ← qr(G (Gᵀ U))`` with the signs of the QR chosen so that ``R`` has a
  non-negative diagonal (Golub & Van Loan 2013, §7.3.1, §8.2.4): each step
  shrinks the tangent of every principal angle to the top-``r`` subspace by
  ``(σ_{r+1}/σ_r)²``, so a basis that was already close — the previous
  refresh's, when the gradient's subspace drifts slowly — needs one or two steps
  where a decomposition from scratch needs the whole spectrum.

  Coordinates.  Without ``align`` the iteration is the unshifted QR algorithm
  on ``UᵀGGᵀU``: repeated refreshes turn the columns towards the singular
  vectors of ``G`` in order (column ``j`` towards ``u_j``, at a rate set by
  ``σ_{j+1}/σ_j``), and the sign choice keeps column ``j`` next to its previous
  value, so a converged basis is a fixed point and the inner optimizer's
  coordinates are the gradient's principal axes, as after GaLore's SVD.  With
  ``align`` the result is instead rotated within its span by the orthogonal
  Procrustes solution ``R = A Bᵀ`` of ``Uⁿᵉʷᵀ Uᵒˡᵈ = A Σ Bᵀ``, the rotation
  closest to ``Uᵒˡᵈ``: every basis of a stable span is then a fixed point, so
  the coordinates stay those of the first basis, whatever the gradient's axes.
  A zero gradient leaves ``u`` as it is.

  Cost per step: two products with ``G`` (``4·m·n·r`` FLOPs) and a QR of
  ``m × r``; the alignment adds ``4·m·r²`` and an ``r × r`` SVD.
  """
  q = u
  for _ in range(iters):
    q, r = jnp.linalg.qr(g @ (g.T @ q))
    q = q * jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(q.dtype)
  if align:
    a, _, bt = jnp.linalg.svd(q.T @ u)
    q = q @ (a @ bt)
  return jnp.where(jnp.any(g != 0), q, u)


def tracked_range_flops(m: int, n: int, r: int, iters: int, align: bool) -> int:
  """FLOPs of :func:`tracked_range` on an ``m × n`` matrix."""
  flops = iters * (4 * m * n * r + qr_flops(m, r))
  if align:
    flops += 4 * m * r * r + svd_flops(r, r)
  return flops



def subspace_overlap(old: tuple[Array | None, ...], new: tuple[Array | None, ...]) -> Array:
  """``Σ_i ‖U_iᵒˡᵈᵀ U_iⁿᵉʷ‖²_F / Σ_i r_i`` of one matrix's factors (float32 scalar).

  The mean squared cosine of the principal angles between the two subspaces
  (orthonormal factors): 1 when they coincide, 0 when orthogonal.
  """
  num, den = jnp.zeros([], jnp.float32), 0
  for fo, fn in zip(old, new):
    if fo is None:
      continue
    num = num + jnp.sum(jnp.square(fo.T @ fn)).astype(jnp.float32)
    den += fo.shape[-1]
  return num / max(den, 1)


def svd_flops(m: int, n: int) -> int:
  """FLOPs of a thin SVD with both factors, ``6·M·N² + 20·N³`` (``M ≥ N``).

  The R-SVD count of Golub & Van Loan, *Matrix Computations* (4th ed., 2013),
  Fig. 8.6.1; used to express refresh work in "SVD equivalents".
  """
  big, small = max(m, n), min(m, n)
  return 6 * big * small**2 + 20 * small**3


def qr_flops(n: int, k: int) -> int:
  """Householder QR of an ``n × k`` matrix with ``Q`` formed: ``4·n·k² − 4k³/3``."""
  return 4 * n * k * k - (4 * k**3) // 3

