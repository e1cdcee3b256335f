"""Step time against matrix size and rank: olr.galore (randomized SVD) vs optax.contrib.galore.

Usage::

    python -m benchmarks.scaling                       # writes docs/img/scaling.png
    python -m benchmarks.scaling --quick --out /tmp/scaling.png

Two sweeps, one float32 leaf each: square ``n × n`` for ``n`` in
``--sizes`` at rank ``--size-rank`` (clamped to ``n``), and ``1024 × 2816`` for
ranks in ``--ranks``.  For every point both optimizers are jitted once and
called in interleaved cycles of ``--refresh-every`` calls (the first of each
cycle is a refresh); the first cycle is warm-up.  ``olr.galore (randomized)`` is
``olr.adam_in_subspace(lr, olr.randomized_svd(rank))``, GaLore's Adam with the
default randomized range finder; ``optax.contrib.galore`` refreshes with
``jnp.linalg.svd``.  Prints a markdown table of medians and writes a two-panel
log-log plot.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from benchmarks import common

LR = 1e-3
NAMES = ("olr.galore (randomized)", "optax.contrib.galore")


def _steps(shape: tuple[int, int], rank: int, refresh_every: int):
  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(0.02 * rng.standard_normal(shape), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)}
  txs = {
      NAMES[0]: olr.adam_in_subspace(LR, olr.randomized_svd(rank), refresh_every=refresh_every),
      NAMES[1]: optax.contrib.galore(LR, rank=rank, update_proj_gap=refresh_every, scale=0.25),
  }
  steps = {}
  for name, tx in txs.items():
    fn = jax.jit(tx.update, donate_argnums=(1,))
    holder = {"s": tx.init(params)}

    def step(fn=fn, holder=holder):
      u, holder["s"] = fn(grads, holder["s"], params)
      jax.block_until_ready((u, holder["s"]))

    steps[name] = step
  return steps


def measure(shape, rank, refresh_every, repeats, clock):
  t = common.interleaved(_steps(shape, rank, refresh_every), refresh_every, repeats)
  return {k: (common.Timing.stats(v[clock].ordinary)[0], common.Timing.stats(v[clock].refresh)[0])
          for k, v in t.items()}


def plot(size_rows, rank_rows, out: str, clock: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {NAMES[0]: ("tab:blue", "o"), NAMES[1]: ("tab:orange", "s")}
  for ax, rows, xlabel, title in (
      (axes[0], size_rows, "n (square n×n leaf)", "vs size"),
      (axes[1], rank_rows, "rank r (1024×2816 leaf)", "vs rank"),
  ):
    xs = [x for x, _ in rows]
    for name in NAMES:
      color, marker = styles[name]
      ax.plot(xs, [res[name][0] * 1e3 for _, res in rows], color=color, marker=marker,
              label=f"{name}: ordinary step")
      ax.plot(xs, [res[name][1] * 1e3 for _, res in rows], color=color, marker=marker,
              linestyle="--", label=f"{name}: refresh step")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"ms per step (median, {clock} time)")
    ax.set_title(f"GaLore-Adam step time {title}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  fig.savefig(out, dpi=120)
  print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
  parser.add_argument("--size-rank", type=int, default=128)
  parser.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128, 256])
  parser.add_argument("--refresh-every", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--no-pin", action="store_true")
  parser.add_argument("--quick", action="store_true", help="small sizes and ranks only")
  parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                      help="time reported (default: cpu for 1 thread, else wall)")
  parser.add_argument("--out", default=os.path.join("docs", "img", "scaling.png"))
  args = parser.parse_args(argv)
  common.configure_threads(args.threads, pin=not args.no_pin)
  clock = args.clock or common.default_clock(args.threads)
  sizes, ranks, rank_shape = args.sizes, args.ranks, (1024, 2816)
  if args.quick:
    sizes, ranks, rank_shape = [64, 128, 256], [8, 16, 32], (128, 352)

  size_rows, rank_rows = [], []
  for n in sizes:
    r = min(args.size_rank, n)
    size_rows.append((n, measure((n, n), r, args.refresh_every, args.repeats, clock)))
  for r in ranks:
    rank_rows.append((r, measure(rank_shape, r, args.refresh_every, args.repeats, clock)))

  def table(rows, label):
    out = []
    for x, res in rows:
      a, b = res[NAMES[0]], res[NAMES[1]]
      out.append([x, common.fmt_ms(a[0]), common.fmt_ms(b[0]), f"{a[0] / b[0]:.2f}",
                  common.fmt_ms(a[1], 1), common.fmt_ms(b[1], 1), f"{b[1] / a[1]:.1f}"])
    return common.markdown_table(
        [label, f"{NAMES[0]} ordinary ms", f"{NAMES[1]} ordinary ms",
         "ordinary ratio (olr/contrib)",
         f"{NAMES[0]} refresh ms", f"{NAMES[1]} refresh ms", "refresh speed-up (contrib/olr)"],
        out)

  print()
  print(f"## scaling (medians of {args.repeats} cycles of {args.refresh_every} calls; "
        f"{args.refresh_every - 1} ordinary + 1 refresh per cycle; {clock} time)")
  print()
  print(f"square n×n leaf, rank min({args.size_rank}, n):")
  print()
  print(table(size_rows, "n"))
  print()
  print(f"{rank_shape[0]}×{rank_shape[1]} leaf:")
  print()
  print(table(rank_rows, "rank"))
  print()
  plot(size_rows, rank_rows, args.out, clock)
  print()
  common.print_machine()


if __name__ == "__main__":
  main()
