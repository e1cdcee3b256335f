"""Per-step time distribution of the optimizer's update, refresh steps included.

Usage::

    python -m benchmarks.refresh_time                  # 60M block kernels, rank 128, T = 8
    python -m benchmarks.refresh_time --layers 2 --dim 64 --hidden 176 --rank 16   # seconds
    python -m benchmarks.refresh_time --overlaps       # subspace overlaps in real training

The block kernels of a 60M-shaped scanned Llama (``--layers`` stacked layers:
``(L, dim, dim)`` ×4 for attention, ``(L, dim, hidden)`` ×2 and
``(L, hidden, dim)`` for the MLP), each stack with the rule ``((0,), (1,), (2,))``
(one basis per layer), under ``olr.low_rank(optax.scale_by_adam(), spec,
refresh_every=T, reshape=..., refresh_schedule=...)``.  One jitted update per
candidate (state donated, as in a training loop); the gradient of step ``t`` is
``cos(θt)·A + sin(θt)·B`` for fixed random ``A``, ``B`` (a subspace that drifts,
``θ = --drift``), made before the call and not timed.  Candidates are
interleaved step by step; the first ``T`` steps (compilation, the first bases)
are warm-up, then ``--periods × T`` steps are measured.

Reported per candidate (CPU time of the process with one thread, robust to a
busy machine; wall time beside it): median, p99 and max of the per-step time,
max / median, the amortized refresh time (mean step time minus the median of
today's steps that refresh nothing: the projection and Adam cost the same
for every candidate), and the amortized refresh FLOPs (``spec.refresh_flops``
of every matrix due on every measured step, from the schedule itself), both
relative to today's (``svd``, ``"fixed"``).

``--overlaps`` instead trains the example Llama (``examples.train``'s data
and step, ``--size small`` scanned: one basis per layer, ``--train-steps``
steps, ``--train-refresh-every`` T = 50 by default) with a staggered schedule and
logs, at every refresh of every matrix, the overlap of its old and new
subspaces ``ρ = ‖U_oldᵀ U_new‖²_F / r``, the chance-corrected ``κ = (ρ − c) /
(1 − c)`` (``c = r/n``, the overlap of random subspaces) that
``refresh_schedule.lazy`` smooths, and the cosine of the first columns
(Q-GaLore's statistic; a singular vector for SVD bases only).  One row per
kernel, one column per window of ``--window`` steps: what the lazy defaults are set from.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks import common

CANDIDATES = (
    ("svd", "fixed"),            # today
    ("svd", "staggered"),
    ("svd", "lazy"),
    ("randomized_svd", "fixed"),
    ("randomized_svd", "staggered"),
    ("subspace_iteration", "fixed"),
    ("subspace_iteration", "staggered"),
    ("subspace_iteration", "lazy"),
)


def shapes(layers: int, dim: int, hidden: int) -> dict[str, tuple[int, int, int]]:
  out = {f"attn_{k}": (layers, dim, dim) for k in ("q", "k", "v", "o")}
  out.update(mlp_w1=(layers, dim, hidden), mlp_w3=(layers, dim, hidden),
             mlp_w2=(layers, hidden, dim))
  return out


def _percentile(xs, q):
  return float(np.percentile(np.asarray(xs), q, method="higher"))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=1376)
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--refresh-every", type=int, default=8)
  parser.add_argument("--periods", type=int, default=3, help="measured steps = periods × T")
  parser.add_argument("--drift", type=float, default=0.02, help="θ, radians per step")
  parser.add_argument("--only", default="", help="comma-separated 'spec/schedule' candidates")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--overlaps", action="store_true",
                      help="log subspace overlaps in training instead (see the module)")
  parser.add_argument("--size", default="small", help="--overlaps: examples.llama preset")
  parser.add_argument("--train-steps", type=int, default=400, help="--overlaps: steps")
  parser.add_argument("--window", type=int, default=100, help="--overlaps: steps per column")
  parser.add_argument("--train-refresh-every", type=int, default=50, help="--overlaps: T")
  parser.add_argument("--methods", default="galore_staggered,galore_tracking",
                      help="--overlaps: examples.methods names with a staggered schedule")
  args = parser.parse_args(argv)
  if args.overlaps:
    overlaps_in_training(args)
    return
  common.configure_threads(args.threads)
  clock = common.default_clock(args.threads)

  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr
  from optax_lowrank import leaves
  from optax_lowrank import refresh_schedule as rs

  T, rule = args.refresh_every, ((0,), (1,), (2,))
  kernels = shapes(args.layers, args.dim, args.hidden)
  rng = np.random.default_rng(0)
  a = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in kernels.items()}
  b = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32)) for k, s in kernels.items()}
  grad_at = jax.jit(lambda t: jax.tree.map(
      lambda x, y: jnp.cos(args.drift * t) * x + jnp.sin(args.drift * t) * y, a, b))
  specs = {"svd": olr.svd(args.rank), "randomized_svd": olr.randomized_svd(args.rank),
           "subspace_iteration": olr.subspace_iteration(args.rank)}
  only = {tuple(c.split("/")) for c in args.only.split(",") if c}
  cands = [c for c in CANDIDATES if not only or c in only]

  runs = {}
  for spec_name, sched in cands:
    spec = specs[spec_name]
    tx = olr.low_rank(optax.scale_by_adam(), spec, refresh_every=T, scale=0.25,
                      reshape=rule, refresh_schedule=sched)
    plans = leaves.plan(a, spec, None, rule)
    flops = {p.path: spec.refresh_flops(p.view_shape)
             for p in jax.tree.leaves(plans, is_leaf=leaves.is_plan)}
    runs[(spec_name, sched)] = dict(
        update=jax.jit(tx.update, donate_argnums=(1,)), state=tx.init(a), plans=plans,
        schedule=rs.as_schedule(sched), flops=flops, cpu=[], wall=[], work=[])

  def due_flops(run, count):
    due = rs.due(run["schedule"], run["plans"], T, count, run["state"].schedule)
    return sum(int(np.sum(np.asarray(due[k]))) * run["flops"][k] for k in run["flops"])

  steps = T * (1 + args.periods)
  for t in range(steps):
    g = jax.block_until_ready(grad_at(t))
    for run in runs.values():
      work = due_flops(run, t)
      c0, t0 = time.process_time(), time.perf_counter()
      u, run["state"] = run["update"](g, run["state"])
      jax.block_until_ready(u)
      wall, cpu = time.perf_counter() - t0, time.process_time() - c0
      if t >= T:
        run["cpu"].append(cpu)
        run["wall"].append(wall)
        run["work"].append(work)

  today = runs.get(("svd", "fixed"))
  base_ordinary = None
  if today is not None:
    quiet = [x for x, w in zip(today[clock], today["work"]) if w == 0]
    base_ordinary = statistics.median(quiet) if quiet else None
  rows = []
  for (spec_name, sched), run in runs.items():
    xs = run[clock]
    med = statistics.median(xs)
    mean = sum(xs) / len(xs)
    refresh_time = mean - base_ordinary if base_ordinary is not None else float("nan")
    work = sum(run["work"]) / len(run["work"])
    row = [f"{spec_name} / {sched}", common.fmt_ms(med, 1), common.fmt_ms(_percentile(xs, 99), 1),
           common.fmt_ms(max(xs), 1), f"{max(xs) / med:.2f}",
           common.fmt_ms(statistics.median(run["wall"]), 1), common.fmt_ms(refresh_time, 1),
           f"{work / 1e9:.2f}"]
    if today is not None:
      t_mean = sum(today[clock]) / len(today[clock])
      row += [f"{refresh_time / (t_mean - base_ordinary):.3f}",
              f"{work / (sum(today['work']) / len(today['work'])):.3f}"]
    rows.append(row)
  header = ["candidate", "median ms", "p99 ms", "max ms", "max / median", "wall median ms",
            "refresh ms / step", "refresh GFLOP / step"]
  if today is not None:
    header += ["refresh time vs today", "refresh FLOPs vs today"]
  print()
  print(f"## optimizer update per step: {len(kernels)} stacks of {args.layers} layers "
        f"({', '.join(sorted({str(s) for s in kernels.values()}))}), "
        f"low_rank(scale_by_adam), rank {args.rank}, T = {T}, {args.periods}×T measured steps "
        f"after {T} warm-up, drift {args.drift} rad/step, {clock} time")
  print()
  print(common.markdown_table(header, rows))
  if base_ordinary is not None:
    print()
    print(f"today's median step without any refresh: {common.fmt_ms(base_ordinary, 1)} ms")
  print()
  common.print_machine()


def overlaps_in_training(args: argparse.Namespace) -> list[dict]:
  """Trains with each of ``args.methods`` and prints the overlaps of every refresh."""
  common.configure_threads(args.threads)
  import jax

  from examples import train as train_lib

  T = args.train_refresh_every
  rows = []
  for name in [m for m in args.methods.split(",") if m]:
    job = train_lib._prepare(train_lib.build_parser().parse_args(
        ["--methods", name, "--steps", str(args.train_steps), "--refresh-every", str(T),
         "--size", args.size, "--scan-layers", "--no-progress"]))
    method, settings = job.methods[0], job.settings
    graphdef, params = train_lib.init_params(job.model_config, settings.seed)
    tx = method.make_tx(settings.lr_for(method), settings.steps, settings.method_config)
    state = train_lib.init_state(method, tx, params, settings.method_config)
    step = jax.jit(train_lib.make_train_step(graphdef, tx, method))
    batches = train_lib._train_batches(job.corpus, settings, 0)
    for t in range(args.train_steps):
      before = _low_rank_state(state)
      state, _ = step(state, next(batches))
      after = _low_rank_state(state)
      if t == 0:
        continue
      old = jax.tree_util.tree_leaves_with_path(before.bases, is_leaf=_is_basis)
      new = jax.tree.leaves(after.bases, is_leaf=_is_basis)
      rho = jax.tree.leaves(after.schedule.overlap)
      for (path, b_old), b_new, o in zip(old, new, rho):
        f_old = np.asarray(next(f for f in b_old.factors if f is not None))
        f_new = np.asarray(next(f for f in b_new.factors if f is not None))
        n, r = f_old.shape[-2:]
        for layer in range(f_old.shape[0]):
          if np.array_equal(f_old[layer], f_new[layer]):
            continue  # not due
          c = r / n
          rho_l = float(np.asarray(o)[layer])
          rows.append(dict(method=name, step=t, kernel=_kernel_name(path), layer=layer,
                           rho=rho_l, kappa=(rho_l - c) / (1 - c), chance=c, cos1=float(
                               abs(f_old[layer][:, 0] @ f_new[layer][:, 0]))))
  _print_overlaps(rows, args.window, T, args)
  return rows


def _low_rank_state(train_state):
  from optax_lowrank.low_rank import LowRankState

  is_state = lambda x: isinstance(x, LowRankState)
  import jax

  return next(x for x in jax.tree.leaves(train_state.opt_state, is_leaf=is_state) if is_state(x))


def _is_basis(x) -> bool:
  return hasattr(x, "factors")


def _kernel_name(path) -> str:
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  keys = [k for k in keys if k not in ("kernel", "layers", "value")]
  return "/".join(keys[-2:])


def _print_overlaps(rows: list[dict], window: int, T: int, args: argparse.Namespace) -> None:
  print()
  print(f"## subspace overlap at each refresh, examples.train --size {args.size} --scan-layers, "
        f"T = {T}, {args.train_steps} steps (means over the layers and refreshes of a window)")
  for name in dict.fromkeys(r["method"] for r in rows):
    mine = [r for r in rows if r["method"] == name]
    windows = sorted({r["step"] // window for r in mine})
    kernels = list(dict.fromkeys(r["kernel"] for r in mine))
    header = ["kernel", "c = r/n"] + [
        f"ρ {w * window}-{(w + 1) * window}" for w in windows] + [
        f"κ {windows[-1] * window}-", f"cos₁ {windows[-1] * window}-"]
    table = []
    for k in kernels:
      ks = [r for r in mine if r["kernel"] == k]
      last = [r for r in ks if r["step"] // window == windows[-1]]
      table.append([k, f"{ks[0]['chance']:.3f}"] + [
          f"{np.mean([r['rho'] for r in ks if r['step'] // window == w]):.2f}"
          if any(r["step"] // window == w for r in ks) else "" for w in windows] + [
          f"{np.mean([r['kappa'] for r in last]):.2f}",
          f"{np.mean([r['cos1'] for r in last]):.2f}"])
    print()
    print(f"### {name}: {len(mine)} refreshes; ρ quantiles (0, .1, .5, .9, 1): "
          + ", ".join(f"{q:.3f}" for q in np.quantile([r["rho"] for r in mine],
                                                      [0, .1, .5, .9, 1])))
    print()
    print(common.markdown_table(header, table))
  print()
  common.print_machine()


if __name__ == "__main__":
  main()
