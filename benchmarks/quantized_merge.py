"""Merge rules for a quantized frozen base, measured on a least-squares drift problem.

The adapter path trains ``Λ`` of ``W0 + SᵀΛ`` and folds ``SᵀΛ`` into ``W0`` at
every merge. With ``W0`` stored in INT8 or NF4, a merge rounds the sum back to
the format's grid, and how it rounds decides whether small updates survive.
This script trains one problem with every candidate rule and prints the table
of the how-to ``docs/how-to/quantized-base.md``.

Problem (the one of issue #15): ``W0`` is ``m × n = 128 × 96`` with entries
``N(0, 0.05²)``; the target is ``W* = W0 + 0.01·N(0, 1)``; ``X`` is ``512 × 128``
standard normal; loss ``mean((X W − X W*)²)``. A Gaussian rank-16 adapter
(``olr.gaussian(16)``, a fresh basis at each merge), Adam on ``Λ`` with cosine
decay of the learning rate from 3e-3 to 3e-5 (moments kept across merges),
merge every 20 steps, 2000 steps, block size 64. The *floor* of a format is the
loss of ``W*`` itself stored in it (nearest rounding, absmax scales): a base
that ends at the floor lost nothing to the merges.

Candidates: ``olr.quantized_merge.MergeRule(rounding, scales, feedback_bits)``,
the plain re-quantization of every merge (``rule=None``: fresh scales, nearest
rounding, what ``olr.adapters.merge`` did before rules existed), merge
intervals that grow by 5% per merge (same first interval, about 40 merges),
and error feedback that carries the residual whole instead of removing its
part in the subspace ``Λ`` lived in (what ``merge_update`` does when given the
basis, as ``olr.adapters.merge`` always does).

Run: ``python -m benchmarks.quantized_merge`` (about a minute on one core);
``--seeds 0,1,2`` for more problems, ``--block-size``, ``--steps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from benchmarks import common

M, N, SAMPLES, RANK = 128, 96, 512, 16


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str
  rule: object  # MergeRule | None | "float"
  growth: float = 1.0
  span_correction: bool = True  # False: merge the residual without removing its part in S


def candidates(qm) -> list[Candidate]:
  rule = qm.MergeRule
  return [
      Candidate("float base (no quantization)", "float"),
      Candidate("re-quantize (fresh scales, nearest), rule=None", None),
      Candidate("stochastic, fresh scales", rule("stochastic", "fresh", 0)),
      Candidate("stochastic, kept scales", rule("stochastic", "keep", 0)),
      Candidate("nearest, kept scales", rule("nearest", "keep", 0)),
      Candidate("nearest, kept scales, intervals +5%/merge", rule("nearest", "keep", 0), 1.05),
      Candidate("feedback 4 bits, nearest, residual counted whole", rule("nearest", "fresh", 4),
                span_correction=False),
      Candidate("feedback 2 bits, nearest", rule("nearest", "fresh", 2)),
      Candidate("feedback 2 bits, stochastic", rule("stochastic", "fresh", 2)),
      Candidate("feedback 4 bits, nearest, kept scales", rule("nearest", "keep", 4)),
      Candidate("feedback 4 bits, nearest (default)", rule("nearest", "fresh", 4)),
      Candidate("feedback 4 bits, stochastic", rule("stochastic", "fresh", 4)),
      Candidate("feedback 8 bits, nearest", rule("nearest", "fresh", 8)),
  ]


def merge_points(steps: int, every: int, growth: float) -> list[int]:
  """Steps after which a merge happens: intervals ``every·growth^k`` (rounded)."""
  points, at, interval = [], 0, float(every)
  while True:
    at += max(1, round(interval))
    if at >= steps:
      return points
    points.append(at)
    interval *= growth


def drift_problem(seed: int):
  """(W0, W*, X) as float32 numpy arrays."""
  import numpy as np

  rng = np.random.default_rng(seed)
  w0 = (0.05 * rng.standard_normal((M, N))).astype(np.float32)
  target = (w0 + 0.01 * rng.standard_normal((M, N))).astype(np.float32)
  x = rng.standard_normal((SAMPLES, M)).astype(np.float32)
  return w0, target, x


def run(candidate: Candidate, fmt: str, seed: int, steps: int, every: int, block_size: int):
  """Trains one candidate; returns (final loss, floor, base bytes per element)."""
  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr
  from optax_lowrank import quantization as q
  from optax_lowrank import quantized_merge as qm

  w0, target, x = drift_problem(seed)
  x, target_j = jnp.asarray(x), jnp.asarray(target)

  def loss_of(w):
    return jnp.mean((x @ (w - target_j)) ** 2)

  floor = float(loss_of(q.dequantize(q.quantize(target, fmt, block_size))))
  adapter = olr.adapters.init({"w": jnp.asarray(w0)}, olr.gaussian(RANK), seed=seed)
  if candidate.rule != "float":
    adapter = olr.adapters.quantize_base(adapter, fmt, block_size, rule=candidate.rule)
  schedule = optax.cosine_decay_schedule(3e-3, steps, alpha=0.01)
  tx = optax.adam(schedule)
  lam = olr.adapters.zeros(adapter)
  state = tx.init(lam)

  @jax.jit
  def train(adapter, lam, state, n):
    def body(_, carry):
      lam, state = carry
      grads = jax.grad(lambda c: loss_of(olr.adapters.materialize(adapter, c)["w"]))(lam)
      updates, state = tx.update(grads, state, lam)
      return optax.apply_updates(lam, updates), state

    return jax.lax.fori_loop(0, n, body, (lam, state))

  merge = jax.jit(olr.adapters.merge)
  if not candidate.span_correction:

    @jax.jit
    def merge(adapter, lam):
      # the residual is carried whole: merge_tree without the bases
      new, lam0 = olr.adapters.merge(adapter, lam)
      merged = olr.adapters.materialize(adapter, lam)
      base = qm.merge_tree(adapter.base, merged)
      return olr.adapters.Adapter(base, new.stored_bases, new.key, new.refresh_index,
                                  new.plans), lam0
  done = 0
  for point in merge_points(steps, every, candidate.growth) + [steps]:
    lam, state = train(adapter, lam, state, point - done)
    done = point
    if point < steps:
      adapter, lam = merge(adapter, lam)
  final = float(loss_of(olr.adapters.materialize(adapter, lam)["w"]))
  per_element = q.nbytes(adapter.base["w"]) / (M * N)
  return final, floor, per_element


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", default="0", help="comma-separated problem seeds (default 0)")
  parser.add_argument("--formats", default="int8,nf4")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--every", type=int, default=20, help="first merge interval")
  parser.add_argument("--block-size", type=int, default=64)
  parser.add_argument("--only", default="", help="keep candidates whose name contains this")
  args = parser.parse_args(argv)
  common.configure_threads(1)
  from optax_lowrank import quantized_merge as qm

  seeds = [int(s) for s in args.seeds.split(",")]
  start = time.perf_counter()
  print("\n".join(common.machine_info()))
  print(f"drift problem {M}x{N}, rank {RANK}, {args.steps} steps, merge every {args.every}, "
        f"block {args.block_size}, seeds {seeds}; cells: final loss / floor (median over seeds)")
  rows = []
  for cand in candidates(qm):
    if args.only and args.only not in cand.name:
      continue
    row = [cand.name]
    for fmt in args.formats.split(","):
      results = [run(cand, fmt, s, args.steps, args.every, args.block_size) for s in seeds]
      ratio = statistics.median(final / floor for final, floor, _ in results)
      final = statistics.median(r[0] for r in results)
      row += [f"{final:.2g}", f"{ratio:.2f}", f"{results[0][2]:.3g}"]
    rows.append(row)
    print(" | ".join(row), flush=True)
  header = ["merge rule"]
  for fmt in args.formats.split(","):
    header += [f"{fmt} final loss", f"{fmt} / floor", f"{fmt} bytes/elem"]
  print()
  print(common.markdown_table(header, rows))
  print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
