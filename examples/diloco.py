"""DiLoCo with low-rank workers on the example Llama: paper 000, Table 3, at small scale.

Run ``python -m examples.diloco`` (see ``--help``).  Four workers (simulated
host devices on a CPU) train the same freshly initialised byte-level Llama
(``examples.llama``) on disjoint slices of the same stream of stdlib-source
batches.  Every round each worker takes ``--local-steps`` Adam steps from the
global weights, then the averaged pseudo-gradient goes to DiLoCo's outer
optimizer (Nesterov SGD, lr 0.7, momentum 0.9); see ``olr.distributed``.  Runs:

* ``diloco``: full-rank workers (the DiLoCo baseline);
* ``identical``: ``olr.low_rank`` workers, one random semi-orthogonal basis
  shared by all workers;
* ``independent``: the same, each worker's basis drawn from its own key;
* ``disjoint``: each worker's basis is its own block of one shared random
  orthogonal matrix, so ``P_i P_jᵀ = 0``.

The projected leaves are the attention and feed-forward kernels of the blocks
(``examples.methods.is_projected``); the embedding, output head and norms are
trained at full size by every worker in every run.  The rank defaults to
``dim / workers``, as in the paper's Table 4 (``rank × workers`` = model
width), so the disjoint blocks together cover each kernel's projected side.
New bases are drawn at the start of every round; Adam's statistics are kept
across it by default (``--on-refresh keep``, GaLore's policy).  ``reset``
zeroes the projected leaves' moments but keeps Adam's step count, so its
bias correction no longer undoes the zeros and the first steps after every
refresh are several times larger than Adam's usual ``lr``: a confound when
comparing against full-rank workers.

Every run trains for each seed of ``--seeds`` (model initialisation and batch
order); one compiled program per run serves all seeds.

``--processes N`` runs the same training as ``N`` connected JAX processes on
this machine (``olr.distributed.launch_local``: loopback, gloo collectives),
each holding ``workers / N`` of the simulated devices, so the DiLoCo sync
crosses process boundaries as it would between hosts.  Every process builds
the same global batches; process 0 alone prints, plots and writes the JSON.
The numbers are those of the one-process run up to float round-off.

It prints one table (final validation loss per run, nats per byte, mean ±
sample standard deviation over the seeds) and writes a plot of the validation
loss after every round (``--plot``, default ``docs/img/diloco.png``) and the
numbers as JSON (``--json``, optional).
Bad input (an unknown scheme, a rank with ``rank × workers`` above the model
width, too few devices) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import optax_lowrank as olr
from examples import data as data_lib
from examples import methods as methods_lib
from examples.llama import LlamaConfig, loss_fn
from examples.train import UsageError, init_params, tree_nbytes
from optax_lowrank import distributed as dist
from optax_lowrank import launch as launch_lib

__all__ = ["RUNS", "build_parser", "configure_host", "format_table", "main", "plot", "run_one"]

RUNS = ("diloco", "identical", "independent", "disjoint")
"""Run names: the full-rank baseline, then the three worker-projection schemes."""


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface (defaults: ≤ 5 minutes on 2 CPU cores)."""
  p = argparse.ArgumentParser(
      prog="python -m examples.diloco",
      description="DiLoCo with full-rank, identical, independent and disjoint low-rank workers.",
  )
  p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
  p.add_argument("--workers", type=int, default=4, help="K (default: 4)")
  p.add_argument("--rounds", type=int, default=12, help="outer steps (default: 12)")
  p.add_argument("--local-steps", type=int, default=25, help="L, inner steps per round (25)")
  p.add_argument("--dim", type=int, default=64, help="model width (default: 64)")
  p.add_argument("--layers", type=int, default=2, help="transformer blocks (default: 2)")
  p.add_argument("--seq-len", type=int, default=64, help="tokens per window (default: 64)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per worker and step (8)")
  p.add_argument("--rank", type=int, default=None, help="per worker (default: dim / workers)")
  p.add_argument("--inner-lr", type=float, default=3e-3, help="peak Adam lr (default: 3e-3)")
  p.add_argument("--outer-lr", type=float, default=0.7, help="default: 0.7 (DiLoCo)")
  p.add_argument("--outer-momentum", type=float, default=0.9, help="default: 0.9 (DiLoCo)")
  p.add_argument("--scale", type=float, default=1.0,
                 help="α on the back-projected updates of projected leaves (default: 1)")
  p.add_argument("--on-refresh", default="keep", choices=("keep", "reset", "transport"),
                 help="what a new basis does to Adam's moments (default: keep)")
  p.add_argument("--seeds", default="0",
                 help="comma-separated seeds of the model init and batch order (default: 0)")
  p.add_argument("--bases-seed", type=int, default=0, help="seed of the random bases (0)")
  p.add_argument("--eval-batches", type=int, default=8, help="validation batches of 32 (8)")
  p.add_argument("--max-bytes", type=int, default=8_000_000, help="corpus budget (8e6)")
  p.add_argument("--plot", default="docs/img/diloco.png", help="'' to skip")
  p.add_argument("--json", default="", help="write the results here too")
  p.add_argument("--processes", type=int, default=1,
                 help="run as N connected JAX processes on this machine, workers/N devices "
                      "each (default: 1, one process)")
  p.add_argument("--timeout", type=float, default=3600.0,
                 help="with --processes > 1: seconds before every process is stopped (3600)")
  return p


def _check(args: argparse.Namespace, devices: bool = True) -> list[str]:
  """Validates the arguments (the device count too if ``devices``); returns the runs.

  Raises UsageError.
  """
  try:
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
  except ValueError:
    raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
  if not args.seeds:
    raise UsageError("--seeds is empty")
  runs = [r.strip() for r in args.runs.split(",") if r.strip()]
  unknown = [r for r in runs if r not in RUNS]
  if unknown or not runs:
    raise UsageError(f"unknown run {unknown or '(none)'}; valid: {', '.join(RUNS)}")
  for name in ("workers", "rounds", "local_steps", "dim", "layers", "seq_len", "batch_size",
               "eval_batches", "processes"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.workers % args.processes:
    raise UsageError(
        f"--workers {args.workers} is not divisible by --processes {args.processes}: every "
        "process holds the same number of workers"
    )
  if args.rank is None:
    args.rank = max(1, args.dim // args.workers)
  if "disjoint" in runs and args.rank * args.workers > args.dim:
    raise UsageError(
        f"--rank {args.rank} × --workers {args.workers} exceeds the model width {args.dim}: "
        "the disjoint blocks would not fit"
    )
  if devices and jax.device_count() < args.workers:
    raise UsageError(
        f"{args.workers} workers need {args.workers} devices, JAX has {jax.device_count()}; "
        "set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
    )
  return runs


def run_one(
    name: str,
    args: argparse.Namespace,
    config: LlamaConfig,
    corpus: data_lib.Corpus,
    mesh: Mesh,
    log: Any = print,
) -> dict[str, Any]:
  """Trains one run for every seed of ``--seeds``; returns its histories and costs.

  The seed sets the model initialisation and the batch order.  The bases' seed
  is ``--bases-seed`` for every seed, so that one compiled program serves them
  all; each round draws new bases anyway (the refresh index is folded into
  the key), so one run already sees ``--rounds`` independent draws.  ``log``
  prints the progress lines.
  """
  graphdef, _ = init_params(config, 0)

  def batch_loss(p: Any, batch: jax.Array) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, p), batch)

  total = args.rounds * args.local_steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.inner_lr, max(1, total // 20), total, args.inner_lr * 0.1
  )
  outer = optax.sgd(args.outer_lr, momentum=args.outer_momentum, nesterov=True)
  projection = None if name == "diloco" else olr.semi_orthogonal(args.rank)
  diloco = dist.make_diloco(
      batch_loss, optax.adam(schedule), mesh, local_steps=args.local_steps,
      projection=projection, scheme="identical" if name == "diloco" else name, outer=outer,
      seed=args.bases_seed, on_refresh=args.on_refresh, scale=args.scale,
      where=methods_lib.is_projected,
  )
  evaluate = jax.jit(batch_loss)
  val = list(data_lib.val_batches(corpus.val, 32, args.seq_len, args.eval_batches))

  def val_loss(p: Any) -> float:
    return float(np.mean([evaluate(p, b) for b in val]))

  histories, start = [], time.perf_counter()
  for seed in args.seeds:
    # The same batches for every run: K·B windows per step, worker k gets rows k·B..(k+1)·B.
    stream = data_lib.batches(corpus.train, args.workers * args.batch_size, args.seq_len,
                              seed=seed)
    state = diloco.init(init_params(config, seed)[1])
    history = {"step": [0], "val_loss": [val_loss(state.params)], "train_loss": [math.nan]}
    for g in range(args.rounds):
      batches = np.stack([next(stream) for _ in range(args.local_steps)])
      state, metrics = diloco.round(state, batches)
      history["step"].append((g + 1) * args.local_steps)
      history["val_loss"].append(val_loss(state.params))
      history["train_loss"].append(float(metrics.loss))
      log(f"  {name:12s} seed {seed}  round {g + 1:3d}/{args.rounds}  "
          f"train {float(metrics.loss):.4f}  val {history['val_loss'][-1]:.4f}", flush=True)
    histories.append(history)
  finals = [h["val_loss"][-1] for h in histories]
  per_worker = jax.tree.map(lambda x: x[0], state.inner_states)
  return {
      "run": name,
      "projection": "full rank" if projection is None else f"semi-orthogonal r={args.rank}",
      "seeds": list(args.seeds),
      "final_val_loss": finals,
      "mean": float(np.mean(finals)),
      "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else math.nan,
      "inner_state_kib": tree_nbytes(per_worker) / 1024,
      "dims_per_round": _dims(name, args),
      "seconds": time.perf_counter() - start,
      "histories": histories,
  }


def _dims(name: str, args: argparse.Namespace) -> str:
  """How many dimensions of a kernel's projected side one round can move."""
  if name == "diloco":
    return "all"
  if name == "identical":
    return f"{args.rank}"
  return f"{min(args.rank * args.workers, args.dim)}" + (" (a.s.)" if name == "independent" else "")


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """The results as a Markdown table (mean ± sample std over the seeds)."""
  base = next((r for r in results if r["run"] == "diloco"), None)
  lines = [
      "| run | worker projection | dims moved / round | final val loss | vs DiLoCo | "
      "per seed | inner state / worker (KiB) | seconds |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    loss = f"{r['mean']:.4f}" + ("" if math.isnan(r["std"]) else f" ± {r['std']:.4f}")
    delta = "" if base is None else f"{r['mean'] - base['mean']:+.4f}"
    seeds = " / ".join(f"{x:.3f}" for x in r["final_val_loss"])
    lines.append(
        f"| {r['run']} | {r['projection']} | {r['dims_per_round']} | {loss} | {delta} | "
        f"{seeds} | {r['inner_state_kib']:.0f} | {r['seconds']:.0f} |"
    )
  return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
  """Validation loss after every round, one line per run."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for r in results:
    steps = r["histories"][0]["step"][1:]
    curves = np.array([h["val_loss"][1:] for h in r["histories"]])
    (line,) = ax.plot(steps, curves.mean(axis=0), marker=".", label=r["run"])
    if len(curves) > 1:  # the band spans the seeds
      ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=line.get_color(),
                      alpha=0.15)
  ax.set_xlabel("local steps per worker (one point per round)")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)


def configure_host(workers: int) -> None:
  """Simulated devices and one OpenBLAS thread, unless the environment says otherwise.

  Takes effect only before JAX starts its CPU backend (the first device query)
  and before the first LAPACK call: ``python -m examples.diloco`` calls it
  first thing.  One OpenBLAS thread because its default pool, on a busy
  2-core machine, made a 352×128 QR take 1 s instead of 4 ms.
  """
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={workers}".strip()


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
  """Starts this script as ``--processes`` connected processes; returns the exit code."""
  command = [sys.executable, "-m", "examples.diloco", *argv]
  try:
    dist.launch_local(command, args.processes, devices_per_process=args.workers // args.processes,
                      timeout=args.timeout, capture=False)
  except dist.LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the comparison; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  # With --processes > 1 this process checks the arguments, then only starts and watches
  # the others (which run this same command with OLR_PROCESS_ID set).
  launcher = args.processes > 1 and launch_lib.ENV_PROCESS_ID not in os.environ
  if not launcher:
    configure_host(max(1, args.workers // max(1, args.processes)))
    dist.initialize_local()  # connects the processes _launch started; else nothing
  lead = launcher or jax.process_index() == 0
  log = print if lead else (lambda *a, **k: None)
  try:
    runs = _check(args, devices=not launcher)
    config = LlamaConfig.preset(
        "tiny", dim=args.dim, n_layers=args.layers, n_heads=4, hidden_dim=args.dim * 11 // 4,
        max_seq_len=args.seq_len, dtype=jnp.float32, param_dtype=jnp.float32,
    )
  except (UsageError, ValueError) as e:  # ValueError: a width the model cannot take
    if lead:
      print(f"error: {e}", file=sys.stderr)
    return 2
  if launcher:
    return _launch(args, argv)
  corpus = data_lib.load_corpus(max_bytes=args.max_bytes)
  mesh = Mesh(np.array(jax.devices()[: args.workers]), ("workers",))
  setting = (
      f"{args.workers} workers × {args.rounds} rounds × {args.local_steps} local steps, "
      f"Llama dim {args.dim} × {args.layers} layers, seq {args.seq_len}, "
      f"batch {args.batch_size}/worker, rank {args.rank}, inner Adam {args.inner_lr:g}, "
      f"outer Nesterov {args.outer_lr:g}/{args.outer_momentum:g}, on_refresh={args.on_refresh}, "
      f"{'' if args.scale == 1 else f'scale {args.scale:g}, '}"
      f"seeds {','.join(map(str, args.seeds))}"
      f"{f', {args.processes} processes' if args.processes > 1 else ''}"
  )
  log(setting, flush=True)
  results = [run_one(name, args, config, corpus, mesh, log) for name in runs]
  if not lead:
    return 0
  print()
  print(format_table(results))
  if args.plot:
    plot(results, Path(args.plot), setting)
    print(f"\nplot: {args.plot}")
  if args.json:
    meta = {
        "setting": setting, "argv": argv, "processes": args.processes,
        "date": datetime.date.today().isoformat(), "machine": platform.platform(),
        "cpus": os.cpu_count(), "jax": jax.__version__,
    }
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
