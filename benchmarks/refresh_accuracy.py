"""Refresh cost and accuracy of ``olr.randomized_svd`` against the exact SVD.

Usage::

    python -m benchmarks.refresh_accuracy                    # 1024×2816, rank 128
    python -m benchmarks.refresh_accuracy --shape 256x704 --rank 32 --repeats 3

For every ``(oversample, power_iters)`` of a grid, the basis that
``olr.randomized_svd`` builds at a refresh (the library's own code path,
``RandomizedSVD.make``, float32) is compared with the exact top-``rank``
singular subspace of the same side (float64 NumPy SVD) through the principal
angles ``θ_i``: the mean and the minimum of ``cos² θ_i``, and the share of the
gradient's energy the basis keeps relative to the exact subspace,
``‖Pᵀ G‖² / Σ_{i≤r} σ_i²``.  Test gradients (float32):

* ``lowrank+noise``: a rank-``rank`` signal (singular values log-spaced 10 → 1)
  plus Gaussian noise whose top singular value is 1/1.5, a gap of 1.5 at the rank;
* ``power-law``: singular values ``i^(-1)``, no gap anywhere.

Accuracy is averaged over ``--keys`` PRNG keys (minimum of the minimum).  Time:
the jitted basis construction alone, against ``optax.contrib.galore``'s refresh
(``jnp.linalg.svd`` of the float32 gradient, then the slice its side keeps) and
``olr.svd``'s (same SVD, olr's side); medians and maxima over ``--repeats``
interleaved rounds.

``--warm`` adds an experiment on a gradient whose dominant subspace has
rotated by a known amount since the previous refresh: the range finder started
from the previous basis (``[U_prev, G Ω_p]``), ``olr.subspace_iteration``'s
refresh (``tracked_range``: ``iters`` steps of ``U ← qr(G Gᵀ U)`` from the
previous basis, aligned to it), and a cold start.  ``--grid default`` times
only the default ``(oversample, power_iters)`` beside the exact refreshes.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from benchmarks import common

GRID_P = (0, 4, 8, 16, 32, 64)
GRID_Q = (0, 1, 2, 3)


def subspace_metrics(exact: np.ndarray, basis: np.ndarray, g: np.ndarray, s: np.ndarray, r: int,
                     side: str) -> tuple[float, float, float]:
  """(mean cos², min cos², captured energy ratio) of ``basis`` against ``exact``."""
  e = np.asarray(exact, np.float64)
  b = np.asarray(basis, np.float64)
  cos = np.linalg.svd(e.T @ b, compute_uv=False)
  g64 = np.asarray(g, np.float64)
  kept = np.linalg.norm(b.T @ g64 if side == "left" else g64 @ b) ** 2
  return float(np.mean(cos**2)), float(np.min(cos**2)), float(kept / np.sum(s[:r] ** 2))


def warm_range(g, r: int, key, oversample: int, power_iters: int, start):
  """``randomized_range`` started from ``[start, G Ω]`` (``start``: m×r, orthonormal)."""
  import jax
  import jax.numpy as jnp

  m, n = g.shape
  extra = max(min(r + oversample, m, n) - start.shape[1], 0)
  cols = [start]
  if extra:
    cols.append(g @ jax.random.normal(key, (n, extra), g.dtype))
  q, _ = jnp.linalg.qr(jnp.concatenate(cols, axis=1))
  for _ in range(power_iters):
    q, _ = jnp.linalg.qr(g @ (g.T @ q))
  r_z = jnp.linalg.qr(g.T @ q, mode="r")
  _, _, vh = jnp.linalg.svd(r_z, full_matrices=False)
  return q @ vh[:r].T


def rotated_pair(rng, m: int, n: int, r: int, overlap: float):
  """Two low-rank+noise gradients whose signal column spaces have mean cos² = ``overlap``."""
  u1, _ = np.linalg.qr(rng.standard_normal((m, r)))
  w = rng.standard_normal((m, r))
  w -= u1 @ (u1.T @ w)
  w, _ = np.linalg.qr(w)
  c = np.sqrt(overlap)
  u2 = c * u1 + np.sqrt(1.0 - overlap) * w
  s = np.geomspace(10.0, 1.0, r)
  sigma = 1.0 / (1.5 * (np.sqrt(m) + np.sqrt(n)))
  out = []
  for u in (u1, u2):
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    out.append(((u * s) @ v.T + sigma * rng.standard_normal((m, n))).astype(np.float32))
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="1024x2816")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--keys", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--no-pin", action="store_true")
  parser.add_argument("--warm", action="store_true",
                      help="run the warm-start experiment (with olr.subspace_iteration's step)")
  parser.add_argument("--grid", choices=["full", "default"], default="full",
                      help="'default': only the default (oversample, power_iters)")
  parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                      help="time reported (default: cpu for 1 thread, else wall)")
  args = parser.parse_args(argv)
  common.configure_threads(args.threads, pin=not args.no_pin)
  clock = args.clock or common.default_clock(args.threads)

  import jax
  import jax.numpy as jnp

  from optax_lowrank import projections as proj

  m, n = (int(x) for x in args.shape.lower().split("x"))
  r = min(args.rank, m, n)
  side = proj.svd(r).resolved_side((m, n))  # olr's "auto" side for this shape
  contrib_side = "left" if m >= n else "right"
  rng = np.random.default_rng(0)
  mats = {
      "lowrank+noise": common.low_rank_plus_noise(rng, m, n, r),
      "power-law": common.power_law(rng, m, n, 1.0),
  }
  exact = {}
  for name, g in mats.items():
    u, s, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    exact[name] = ((u[:, :r] if side == "left" else vt[:r].T), s)
    print(f"{name}: σ_1/σ_r = {s[0] / s[r - 1]:.1f}, σ_r/σ_(r+1) = {s[r - 1] / s[r]:.3f}")

  def make_fn(p: int, q: int):
    spec = proj.randomized_svd(r, side=side, oversample=p, power_iters=q)
    return jax.jit(lambda g, key: spec.make((m, n), key, g, jnp.float32))

  grid = list(itertools.product(GRID_P, GRID_Q))
  if args.grid == "default":
    grid = [(proj.randomized_svd(r).oversample, proj.randomized_svd(r).power_iters)]
  fns = {(p, q): make_fn(p, q) for p, q in grid}
  keys = [jax.random.PRNGKey(k) for k in range(args.keys)]
  acc: dict[tuple[int, int], dict[str, tuple[float, float, float]]] = {}
  for pq, f in fns.items():
    acc[pq] = {}
    for name, g in mats.items():
      gj = jnp.asarray(g)
      ms = []
      for key in keys:
        factors = f(gj, key)
        basis = np.asarray([x for x in factors if x is not None][0])
        ms.append(subspace_metrics(exact[name][0], basis, g, exact[name][1], r, side))
      acc[pq][name] = (float(np.mean([x[0] for x in ms])), float(np.min([x[1] for x in ms])),
                       float(np.mean([x[2] for x in ms])))

  g_time = jnp.asarray(mats["lowrank+noise"])
  key0 = keys[0]

  def contrib_refresh(g):  # optax.contrib.galore's compute_{left,right}_projector
    u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    return u[:, :r] if contrib_side == "left" else vh[:r].T

  svd_spec = proj.svd(r)
  baselines = {
      "optax.contrib.galore refresh (jnp.linalg.svd)": jax.jit(contrib_refresh),
      "olr.svd refresh (jnp.linalg.svd)": jax.jit(
          lambda g: svd_spec.make((m, n), None, g, jnp.float32)),
  }
  timed = {("base", k): (lambda f=f: jax.block_until_ready(f(g_time)))
           for k, f in baselines.items()}
  timed.update({("rsvd", pq): (lambda f=f: jax.block_until_ready(f(g_time, key0)))
                for pq, f in fns.items()})
  times = {k: v[clock] for k, v in common.timed_once(timed, args.repeats).items()}
  contrib_med = float(np.median(times[("base", next(iter(baselines)))]))

  print()
  print(f"## refresh: randomized_svd vs exact SVD at {m}×{n}, rank {r} (olr side: {side}; "
        f"optax.contrib.galore side: {contrib_side}), float32, {args.repeats} timed rounds "
        f"({clock} time), accuracy over {args.keys} keys")
  print()
  rows = []
  for k in baselines:
    t = times[("base", k)]
    rows.append([k, "—", "—", common.fmt_ms(float(np.median(t)), 1), common.fmt_ms(max(t), 1),
                 f"{contrib_med / float(np.median(t)):.1f}", "1 (exact)", "1 (exact)", "1 (exact)",
                 "1 (exact)", "1 (exact)", "1 (exact)"])
  spec_default = proj.randomized_svd(r)
  for p, q in grid:
    t = times[("rsvd", (p, q))]
    a, b = acc[(p, q)]["lowrank+noise"], acc[(p, q)]["power-law"]
    mark = " (default)" if (p, q) == (spec_default.oversample, spec_default.power_iters) else ""
    rows.append([f"randomized_svd{mark}", p, q, common.fmt_ms(float(np.median(t)), 1),
                 common.fmt_ms(max(t), 1), f"{contrib_med / float(np.median(t)):.1f}",
                 f"{a[0]:.4f}", f"{a[1]:.4f}", f"{a[2]:.5f}", f"{b[0]:.4f}", f"{b[1]:.4f}",
                 f"{b[2]:.5f}"])
  print(common.markdown_table(
      ["refresh", "oversample", "power_iters", "ms (median)", "ms (max)",
       "speed-up vs contrib", "lr+noise mean cos²", "lr+noise min cos²", "lr+noise energy",
       "power-law mean cos²", "power-law min cos²", "power-law energy"],
      rows,
  ))

  ok = [(float(np.median(times[("rsvd", pq)])), pq) for pq in grid
        if acc[pq]["lowrank+noise"][0] >= 0.99
        and contrib_med / float(np.median(times[("rsvd", pq)])) >= 5.0]
  print()
  if ok:
    best = min(ok)[1]
    print(f"cheapest setting with lr+noise mean cos² ≥ 0.99 and ≥ 5× faster than contrib: "
          f"oversample={best[0]}, power_iters={best[1]} "
          f"({contrib_med / min(ok)[0]:.1f}×); all qualifying: "
          + ", ".join(f"(p={pq[0]}, q={pq[1]}) {contrib_med / t:.1f}×" for t, pq in sorted(ok)))
  else:
    print("no setting reaches lr+noise mean cos² ≥ 0.99 at ≥ 5× the speed of contrib's refresh")
  print(f"current defaults: oversample={spec_default.oversample}, "
        f"power_iters={spec_default.power_iters}")

  if args.warm:
    _warm_experiment(m, n, r, side, args.repeats, clock)

  print()
  common.print_machine()


def _warm_experiment(m: int, n: int, r: int, side: str, repeats: int, clock: str) -> None:
  """Warm start from the previous basis vs a cold start, on rotated subspaces."""
  import jax
  import jax.numpy as jnp

  from optax_lowrank import projections as proj

  spec = proj.randomized_svd(r)
  p_def, q_def = spec.oversample, spec.power_iters
  rng = np.random.default_rng(1)
  key = jax.random.PRNGKey(0)
  # Work on the gradient oriented so that the basis spans its columns (Gᵀ for "right").
  rows_dim, cols_dim = (m, n) if side == "left" else (n, m)
  cold = {q: jax.jit(lambda g, q=q: proj.randomized_range(g, r, key, p_def, q))
          for q in (0, 1, q_def)}
  warm = {q: jax.jit(lambda g, u, q=q: warm_range(g, r, key, p_def, q, u)) for q in (0, 1)}
  # olr.subspace_iteration's refresh: iters steps of U <- qr(G Gᵀ U) from the previous basis.
  track = {i: jax.jit(lambda g, u, i=i: proj.tracked_range(g, u, i, True)) for i in (1, 2)}
  rows = []
  for overlap in (0.5, 0.9, 0.99):
    g1, g2 = rotated_pair(rng, rows_dim, cols_dim, r, overlap)
    u1 = cold[q_def](jnp.asarray(g1))
    g2j = jnp.asarray(g2)
    u, s, _ = np.linalg.svd(g2.astype(np.float64), full_matrices=False)
    ex = u[:, :r]
    res = {}
    for q, f in cold.items():
      res[f"cold q={q}"] = (f, (g2j,))
    for q, f in warm.items():
      res[f"warm q={q}"] = (f, (g2j, u1))
    for i, f in track.items():
      res[f"subspace_iteration iters={i}"] = (f, (g2j, u1))
    calls = {k: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for k, (f, a) in res.items()}
    times = {k: v[clock] for k, v in common.timed_once(calls, repeats).items()}
    for k, (f, a) in res.items():
      b = np.asarray(f(*a))
      mc, mn, en = subspace_metrics(ex, b, g2, s, r, "left")
      rows.append([f"{overlap:.2f}", k, common.fmt_ms(float(np.median(times[k])), 1),
                   f"{mc:.4f}", f"{mn:.4f}", f"{en:.5f}"])
  print()
  print(f"## warm start from the previous basis ({m}×{n}, rank {r}, oversample {p_def}, "
        f"{clock} time); previous gradient's basis from the defaults")
  print()
  print(common.markdown_table(
      ["subspace overlap (mean cos²)", "start", "ms (median)", "mean cos²", "min cos²",
       "energy"], rows))


if __name__ == "__main__":
  main()
