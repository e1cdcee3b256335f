"""A stacked leaf against the same matrices as separate leaves: step and refresh time.

Usage::

    python -m benchmarks.stacked                       # (8, 1024, 2816), rank 128: minutes
    python -m benchmarks.stacked --layers 2 --m 128 --n 352 --rank 16   # seconds

One jitted ``olr.galore`` update per candidate (state donated, as in a training
loop), called in cycles of ``--refresh-every`` calls whose first call is a
refresh (a new SVD basis); candidates are interleaved cycle by cycle and the
first cycle is warm-up.  ``stacked`` is one ``(L, m, n)`` leaf with the rule
``((0,), (1,), (2,))`` (each layer its own basis, one batched SVD and one
batched GEMM per projection); ``separate`` is ``L`` leaves of shape ``(m, n)``.
The randomized-SVD pair repeats the comparison with ``olr.randomized_svd``.
Prints one table and the ratios stacked / separate of the CPU-time medians.

``--ab N`` instead times ``N`` interleaved pairs of ordinary steps only (no
refresh after the first call), with the gradients passed as they are and
donated (a fresh copy made before each call, untimed), and counts the minor
page faults of each call.  A train step that computes the gradient and
updates in one program reuses the gradient's buffer for the update as the
donated variant does; an update called on its own gets a fresh output buffer,
which for a stack is one large allocation that the allocator maps, and the
kernel faults in, anew on every call (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common


def _candidates(layers: int, m: int, n: int, rank: int, refresh_every: int
                ) -> dict[str, tuple[Callable[[], Any], int]]:
  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr

  rng = np.random.default_rng(0)
  grads = jnp.asarray(rng.standard_normal((layers, m, n)).astype(np.float32))
  stacked = {"w": grads}
  separate = {f"w{i}": grads[i] for i in range(layers)}
  out = {}
  for spec_name, spec in (("svd", olr.svd(rank)), ("randomized_svd", olr.randomized_svd(rank))):
    for layout, params, reshape in (("stacked", stacked, ((0,), (1,), (2,))),
                                    ("separate", separate, None)):
      tx = olr.low_rank(optax.scale_by_adam(), spec, refresh_every=refresh_every,
                        scale=0.25, reshape=reshape)
      update = jax.jit(tx.update, donate_argnums=(1,))
      box = {"state": tx.init(params)}

      def step(update=update, box=box, params=params):
        u, box["state"] = update(params, box["state"])
        jax.block_until_ready(u)

      nbytes = common.tree_bytes(box["state"])
      out[f"{spec_name} {layout}"] = (step, nbytes)
  return out


def ab(layers: int, m: int, n: int, rank: int, pairs: int) -> None:
  """Interleaved A/B of ordinary steps, stacked vs separate, with and without donated grads."""
  import resource
  import statistics
  import time

  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr

  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((layers, m, n)).astype(np.float32))
  cands = {}
  for donate in (False, True):
    for layout, params, reshape in (("stacked", {"w": g}, ((0,), (1,), (2,))),
                                    ("separate", {f"w{i}": g[i] for i in range(layers)}, None)):
      tx = olr.low_rank(optax.scale_by_adam(), olr.svd(rank), refresh_every=2**30, scale=0.25,
                        reshape=reshape)
      update = jax.jit(tx.update, donate_argnums=(0, 1) if donate else (1,))
      fresh = ((lambda p=params: jax.tree.map(lambda x: x + 0, p)) if donate
               else (lambda p=params: p))
      _, state = update(fresh(), tx.init(params))   # compile, first basis
      cands[(layout, donate)] = [update, fresh, state, [], []]
  for _ in range(pairs):
    for c in cands.values():
      x = jax.block_until_ready(c[1]())
      f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
      u, c[2] = c[0](x, c[2])
      jax.block_until_ready(u)
      c[3].append(time.process_time() - t0)
      c[4].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      del u, x
  rows = [[layout, "donated" if donate else "as given", common.fmt_ms(statistics.median(c[3]), 1),
           common.fmt_ms(max(c[3]), 1), f"{statistics.median(c[4]):.0f}"]
          for (layout, donate), c in cands.items()]
  print()
  print(f"## ordinary step, stacked ({layers}, {m}, {n}) vs {layers} separate leaves, rank {rank}, "
        f"{pairs} interleaved pairs, cpu time")
  print()
  print(common.markdown_table(["layout", "gradients", "ms median", "ms max",
                               "minor faults / call"], rows))
  print()
  for donate in (False, True):
    ratio = (statistics.median(cands[("stacked", donate)][3])
             / statistics.median(cands[("separate", donate)][3]))
    print(f"- stacked / separate, gradients {'donated' if donate else 'as given'}: {ratio:.3f}")
  print()
  common.print_machine()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--m", type=int, default=1024)
  parser.add_argument("--n", type=int, default=2816)
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--refresh-every", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5, help="measured cycles per candidate")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--ab", type=int, default=0, metavar="PAIRS",
                      help="time PAIRS interleaved ordinary steps instead (see the module)")
  args = parser.parse_args(argv)
  common.configure_threads(args.threads)
  clock = common.default_clock(args.threads)
  if args.ab:
    ab(args.layers, args.m, args.n, args.rank, args.ab)
    return

  cands = _candidates(args.layers, args.m, args.n, args.rank, args.refresh_every)
  timings = common.interleaved({k: step for k, (step, _) in cands.items()},
                               args.refresh_every, args.repeats)

  def med(name: str, kind: str) -> float:
    return common.Timing.stats(getattr(timings[name][clock], kind))[0]

  rows = []
  for name, (_, nbytes) in cands.items():
    t = timings[name][clock]
    o, r = common.Timing.stats(t.ordinary), common.Timing.stats(t.refresh)
    rows.append([name, common.fmt_ms(o[0]), common.fmt_ms(o[1]), common.fmt_ms(r[0], 1),
                 common.fmt_ms(r[1], 1), common.fmt_bytes(nbytes)])
  print()
  print(f"## stacked ({args.layers}, {args.m}, {args.n}) vs {args.layers} separate "
        f"({args.m}, {args.n}) leaves, olr.low_rank(scale_by_adam), rank {args.rank}, "
        f"refresh every {args.refresh_every}, {args.repeats} measured cycles, {clock} time")
  print()
  print(common.markdown_table(
      ["candidate", "ordinary ms median", "ordinary ms max", "refresh ms median",
       "refresh ms max", "state bytes"], rows))
  print()
  print(f"ratios stacked / separate ({clock}-time medians):")
  for spec_name in ("svd", "randomized_svd"):
    for kind in ("ordinary", "refresh"):
      ratio = med(f"{spec_name} stacked", kind) / med(f"{spec_name} separate", kind)
      print(f"- {spec_name} {kind}: {ratio:.2f}")
  print()
  common.print_machine()


if __name__ == "__main__":
  main()
