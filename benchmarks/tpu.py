"""TPU plans and compile costs without a TPU: the real TPU compiler, deviceless.

    python -m benchmarks.tpu plans --size 60m --backends cpu tpu:v5e tpu:v5p [--json PATH]
    python -m benchmarks.tpu ordering [--backends cpu tpu:v5p] [--json PATH]
    python -m benchmarks.tpu compile-cost [--widths 64 512] [--repeats 2] [--json PATH]

Needs ``libtpu`` (``pip install "jax[tpu]==<jax version>"``; run with
``JAX_PLATFORMS=cpu`` so the default backend stays the CPU).  A backend
``tpu:v5e`` or ``tpu:v5p`` compiles for one device of the topology
``v5e:2x2`` / ``v5p:2x2x1`` from :mod:`jax.experimental.topologies`: the step
is lowered and compiled inside ``jax.default_device(device)``, nothing is
allocated or run.

* ``plans``: the scale benchmark's plans (``benchmarks.plan.plan_rows``:
  ``olr.memory.plan_train_step`` of the scanned Llama, BF16, remat, per
  method) with the trainable weights and optimizer state donated, for each
  backend side by side.
* ``ordering``: the two memory orderings of issue 18 on the small bf16 model
  with a large leaf (one block of the 60M shape: width 512, MLP 1376, vocab
  32000, token batch 64): float-state vs 8-bit-state Adam (all leaves, and
  inside ``low_rank``), and the adapter path's float vs INT8 vs NF4 base.
* ``compile-cost``: seconds to compile one train step with a GaLore
  projection made by ``olr.svd`` vs ``olr.randomized_svd`` (and AdamW for
  reference) on TPU and CPU, candidates interleaved, medians of
  ``--repeats`` (each a fresh ``jax.jit``; the compilation cache is off).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

# Before libtpu starts: there is no TPU here, nothing to probe; and let a
# second process (a test run, another benchmark) load it at the same time.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_lowrank as olr  # noqa: E402
from benchmarks import plan  # noqa: E402

TOPOLOGIES = {"tpu:v5e": "v5e:2x2", "tpu:v5p": "v5p:2x2x1"}
BACKENDS = ("cpu", *TOPOLOGIES)
GIB = 1024**3


def device_of(backend: str) -> jax.Device | None:
  """The device to compile for: ``None`` for the CPU, else one of the topology's."""
  if backend == "cpu":
    return None
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="tpu",
                                      topology_name=TOPOLOGIES[backend]).devices[0]


def target(backend: str) -> contextlib.AbstractContextManager:
  """A context in which ``jax.jit(...).lower(...).compile()`` compiles for ``backend``."""
  device = device_of(backend)
  return contextlib.nullcontext() if device is None else jax.default_device(device)


# ----------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------

def plan_backends(size: str, backends: tuple[str, ...], methods: tuple[str, ...],
                  tokens: int = 256, log: Callable[[str], None] | None = print,
                  json_path: str | None = None,
                  kinds: tuple[str, ...] = ("ordinary",)) -> list[dict]:
  """``benchmarks.plan.plan_rows`` (donated) for every backend; rows tagged with it.

  Each row is logged, and written to ``json_path``, as soon as it is planned
  (a GaLore step at the 60M shape takes minutes to compile for the TPU).
  """
  rows = []
  for backend in backends:
    for method in methods:
      with target(backend):
        got = plan.plan_rows(size, tokens, (method,), donation=(True,), kinds=kinds)
      for r in got:
        r["backend"] = backend
        if log:
          log(f"  {r['method']} [{backend}]: peak {r['peak_bytes'] / GIB:.3f} GiB, "
              f"accelerator figure {r['accelerator_peak_bytes'] / GIB:.3f} GiB, "
              f"temp {r['temp_bytes'] / GIB:.3f} GiB")
      rows += got
      if json_path:
        with open(json_path, "w") as f:
          json.dump(rows, f, indent=1)
  return rows


def format_side_by_side(rows: list[dict], backends: tuple[str, ...]) -> str:
  """Peak and temporaries (GiB) per method, one column pair per backend.

  The CPU's columns are its accelerator figure (where the rows have one) and
  its own peak; a TPU's are its compiled peak (the accelerator figure equals
  it: the TPU does not upcast).
  """
  by = {(r["method"], r["backend"]): r for r in rows}
  methods = list(dict.fromkeys(r["method"] for r in rows))
  width = max(len(m) for m in methods) + 2
  head = f"{'method':<{width}}" + "".join(f"{b + ' figure':>16}{'peak':>9}{'temp':>8}"
                                           for b in backends)
  lines = [head + "   (GiB)"]
  for m in methods:
    cells = ""
    for b in backends:
      r = by.get((m, b))
      fig = r.get("accelerator_peak_bytes", r["peak_bytes"]) if r else None
      cells += (f"{fig / GIB:>16.3f}{r['peak_bytes'] / GIB:>9.3f}{r['temp_bytes'] / GIB:>8.3f}"
                if r else f"{'-':>16}{'-':>9}{'-':>8}")
    lines.append(f"{m:<{width}}{cells}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# memory orderings on the small model
# ----------------------------------------------------------------------------

ORDERING_RANK = 128


def small_config(**overrides: Any):
  """One block of the 60M shape (width 512, MLP 1376, vocab 32000), BF16."""
  return plan.config_for("60m", **{"n_layers": 1, **overrides})


def ordering_setups(config) -> dict[str, Callable[[], tuple]]:
  """name -> ``() -> (loss, tx, trainable, frozen)`` of the ordering benchmark."""
  where = dict(where=plan.is_block_kernel, reshape=plan.STACKED_RULE)
  r = ORDERING_RANK
  return {
      "optax.adam": _dense(config, lambda: optax.adam(1e-3)),
      "olr.adam_8bit": _dense(config, lambda: olr.adam_8bit(1e-3)),
      "olr.adam_8bit (chunk_size=0)": _dense(config, lambda: olr.adam_8bit(1e-3, chunk_size=0)),
      "low_rank(adam, gaussian)": _dense(
          config, lambda: olr.low_rank(optax.adam(1e-3), olr.gaussian(r), **where)),
      "low_rank(adam_8bit, gaussian)": _dense(
          config, lambda: olr.low_rank(olr.adam_8bit(1e-3), olr.gaussian(r), **where)),
      "adapter, float base": lambda: plan.method_setup("adapter", config, r),
      "adapter, INT8 base": lambda: plan.method_setup("adapter-int8", config, r),
      "adapter, NF4 base + 8-bit": lambda: plan.method_setup("adapter-nf4-8bit", config, r),
  }


def ordering_rows(backends: tuple[str, ...], tokens: int = 64, n_layers: int = 1,
                  log: Callable[[str], None] | None = print) -> list[dict]:
  config = small_config(n_layers=n_layers)
  batch = jax.ShapeDtypeStruct(plan.batch_shape(config, tokens), jnp.int32)
  rows = []
  for name, setup in ordering_setups(config).items():
    loss, tx, trainable, frozen = setup()
    for backend in backends:
      with target(backend):
        p = olr.memory.plan_train_step(loss, tx, trainable, batch, frozen, accelerator=False)
      m = p.memory
      rows.append({"method": name, "backend": backend, "layers": n_layers, "tokens": tokens,
                   "peak_bytes": m.peak, "argument_bytes": m.arguments,
                   "temp_bytes": m.temporaries, "alias_bytes": m.aliased,
                   "optimizer_state_bytes": p.optimizer_state})
      if log:
        log(f"  {name} [{backend}]: peak {m.peak / GIB:.3f} GiB, temp "
            f"{m.temporaries / GIB:.3f} GiB")
  return rows


# ----------------------------------------------------------------------------
# compile cost of the refresh's decomposition
# ----------------------------------------------------------------------------

def compile_seconds(setup: Callable[[], tuple], tokens: int, backend: str, config) -> float:
  """Seconds to lower and compile one donated train step (no cache: a fresh jit)."""
  loss, tx, trainable, frozen = setup()
  batch = jax.ShapeDtypeStruct(plan.batch_shape(config, tokens), jnp.int32)
  opt_state = jax.eval_shape(tx.init, trainable)

  def step(trainable, opt_state, frozen, batch):
    grads = jax.grad(loss)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  with target(backend):
    start = time.perf_counter()
    jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, batch).compile()
    return time.perf_counter() - start


def _dense(config, tx_fn: Callable[[], optax.GradientTransformation]) -> Callable[[], tuple]:
  """A setup of the dense model (all weights trainable) with the optimizer ``tx_fn()``."""
  def setup():
    loss, _, trainable, frozen = plan.method_setup("adamw-bf16", config, None)
    return loss, tx_fn(), trainable, frozen
  return setup


def cost_candidates(config, rank: int) -> dict[str, Callable[[], tuple]]:
  """AdamW, and GaLore's projection made by ``svd`` and by ``randomized_svd``."""
  where = dict(where=plan.is_block_kernel, reshape=plan.STACKED_RULE)
  return {
      "optax.adamw": _dense(config, lambda: optax.adamw(1e-3, weight_decay=0.01)),
      f"galore svd r{rank}": _dense(config, lambda: olr.galore(1e-3, rank=rank, **where)),
      f"galore randomized_svd r{rank}": _dense(config, lambda: olr.low_rank(
          optax.adam(1e-3), olr.randomized_svd(rank), scale=0.25, **where)),
  }


def compile_cost_rows(widths: tuple[int, ...], backends: tuple[str, ...], repeats: int,
                      rank: int = 128, tokens: int = 64,
                      log: Callable[[str], None] | None = print) -> list[dict]:
  rows = []
  for width in widths:
    config = small_config(dim=width, hidden_dim=1376 * width // 512, n_heads=max(1, width // 64))
    candidates = cost_candidates(config, min(rank, width))
    for backend in backends:
      times: dict[str, list[float]] = {name: [] for name in candidates}
      for _ in range(repeats):  # interleaved
        for name, setup in candidates.items():
          times[name].append(compile_seconds(setup, tokens, backend, config))
      for name, ts in times.items():
        rows.append({"method": name, "width": width, "backend": backend,
                     "compile_s_median": statistics.median(ts), "compile_s": ts})
        if log:
          log(f"  width {width} {name} [{backend}]: {statistics.median(ts):.1f} s "
              f"({', '.join(f'{t:.1f}' for t in ts)})")
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_plans = sub.add_parser("plans", help="scale plans per backend")
  p_plans.add_argument("--size", default="60m", choices=plan.SIZES)
  p_plans.add_argument("--tokens", type=int, default=256)
  p_plans.add_argument("--methods", nargs="+", default=list(plan.METHODS), choices=plan.METHODS)
  p_plans.add_argument("--kinds", nargs="+", default=["ordinary"], choices=plan.KINDS)
  p_order = sub.add_parser("ordering", help="8-bit-state and quantized-base orderings")
  p_order.add_argument("--tokens", type=int, default=64)
  p_order.add_argument("--layers", type=int, default=1)
  p_cost = sub.add_parser("compile-cost", help="svd vs randomized_svd compile seconds")
  p_cost.add_argument("--widths", type=int, nargs="+", default=[64, 512])
  p_cost.add_argument("--repeats", type=int, default=2)
  for p in (p_plans, p_order, p_cost):
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--json", default=None, help="write the rows to this file")
  args = parser.parse_args(argv)
  backends = tuple(args.backends)
  jax.config.update("jax_enable_compilation_cache", False)
  print(f"jax {jax.__version__}, backends {', '.join(backends)}")
  start = time.perf_counter()
  if args.command == "plans":
    rows = plan_backends(args.size, backends, tuple(args.methods), args.tokens,
                         json_path=args.json, kinds=tuple(args.kinds))
    print()
    print(format_side_by_side(rows, backends))
  elif args.command == "ordering":
    rows = ordering_rows(backends, args.tokens, args.layers)
    print()
    print(format_side_by_side(rows, backends))
  else:
    rows = compile_cost_rows(tuple(args.widths), backends, args.repeats)
  print(f"\ndone in {time.perf_counter() - start:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
