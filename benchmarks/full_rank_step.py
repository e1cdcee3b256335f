"""Step time of the full-rank-update recipes (APOLLO, APOLLO-Mini, Fira) next to Flora and GaLore.

Usage::

    python -m benchmarks.full_rank_step --shapes small            # seconds
    python -m benchmarks.full_rank_step --shapes llama --repeats 5 # minutes

The shapes are ``benchmarks.step_time``'s (one Llama block, or the same block
scaled down by 8).  One jitted ``update`` per candidate, state donated, called
in cycles of ``--refresh-every`` calls (the first of each cycle a refresh);
candidates are interleaved cycle by cycle after a warm-up cycle, and the
ordinary and refresh steps are reported separately (medians and max).  The
issue's goal is APOLLO's ordinary step at most 1.1× Flora's at the same rank:
both project the gradient with a Gaussian sketch rebuilt from a key; Flora
then maps Adam's step back with a second GEMM, APOLLO rescales the gradient
instead (two elementwise passes).
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common
from benchmarks.step_time import SHAPES, add_step_time_arguments

LR = 1e-3
REFERENCE = "olr.flora"


def candidates(leaves, rank: int, refresh_every: int, grads_np):
  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr

  params = {n: jnp.asarray(0.02 * np.random.default_rng(1).standard_normal(s), jnp.float32)
            for n, s in leaves}
  grads = {n: jnp.asarray(g) for (n, _), g in zip(leaves, grads_np)}
  T = refresh_every
  txs = {
      "optax.adam": optax.adam(LR),
      REFERENCE: olr.flora(LR, rank=rank, refresh_every=T),
      "olr.apollo": olr.apollo(LR, rank=rank, refresh_every=T),
      "olr.apollo (tensor-wise)": olr.apollo(LR, rank=rank, refresh_every=T,
                                             granularity="tensor"),
      "olr.apollo_mini": olr.apollo_mini(LR, refresh_every=T),
      "olr.apollo (8-bit moments)": olr.apollo(LR, rank=rank, refresh_every=T, eight_bit=True),
      "olr.galore": olr.galore(LR, rank=rank, refresh_every=T),
      "olr.fira": olr.fira(LR, rank=rank, refresh_every=T),
  }
  steps, sizes = {}, {}
  for name, tx in txs.items():
    holder = {"state": tx.init(params)}
    fn = jax.jit(tx.update, donate_argnums=(1,))

    def step(fn=fn, holder=holder):
      u, s = fn(grads, holder["state"], params)
      holder["state"] = s
      jax.block_until_ready((u, s))

    steps[name] = step
    sizes[name] = olr.memory.state_bytes(tx, params).total
  return steps, sizes


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_step_time_arguments(parser, "threads for XLA and BLAS/LAPACK (default 1)")
  args = parser.parse_args(argv)
  common.configure_threads(args.threads, pin=not args.no_pin)
  clock = args.clock or common.default_clock(args.threads)

  leaves, rank = SHAPES[args.shapes]
  rank = args.rank or rank
  repeats = args.repeats or (5 if args.shapes == "llama" else 20)
  rng = np.random.default_rng(0)
  grads_np = [rng.standard_normal(s).astype(np.float32) for _, s in leaves]
  steps, sizes = candidates(leaves, rank, args.refresh_every, grads_np)
  timings = common.interleaved(steps, args.refresh_every, repeats,
                               has_refresh={n: n != "optax.adam" for n in steps})
  ref = common.Timing.stats(timings[REFERENCE][clock].ordinary)[0]
  ref_refresh = common.Timing.stats(timings[REFERENCE][clock].refresh)[0]
  rows = []
  for name in steps:
    t = timings[name][clock]
    o, r = common.Timing.stats(t.ordinary), common.Timing.stats(t.refresh)
    rows.append([
        name, common.fmt_ms(o[0]), common.fmt_ms(o[1]),
        common.fmt_ms(r[0] if r else None, 1), common.fmt_ms(r[1] if r else None, 1),
        common.fmt_bytes(sizes[name]), f"{o[0] / ref:.2f}",
        f"{r[0] / ref_refresh:.2f}" if r else "—",
    ])
  shape_desc = ", ".join(f"{n} {m}×{k}" for n, (m, k) in leaves)
  print()
  print(f"## full-rank updates: step time, shapes={args.shapes} (rank {rank}, refresh every "
        f"{args.refresh_every}, {repeats} measured cycles: {repeats * (args.refresh_every - 1)} "
        f"ordinary and {repeats} refresh calls per row; {clock} time)")
  print()
  print(f"leaves: {shape_desc}; float32; APOLLO-Mini at rank 1, the others at rank {rank}")
  print()
  print(common.markdown_table(
      ["optimizer", "ordinary ms median", "ordinary ms max", "refresh ms median",
       "refresh ms max", "state bytes", f"ordinary / {REFERENCE}", f"refresh / {REFERENCE}"],
      rows,
  ))
  print()
  common.print_machine()


if __name__ == "__main__":
  main()
