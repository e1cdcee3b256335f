"""Real peak memory and step time of the planned train steps, on the device at hand.

    PYTHONPATH=. python -m benchmarks.device_check [--json PATH] [--steps 5]

On an accelerator: the LLaMA ``1b`` preset for every method of
``benchmarks.plan``, then ``7b`` for the methods whose compiled plan fits the
device, token batch 256, BF16, at the GaLore paper's rank of the size.  Without
one (CPU): the ``tiny`` preset, scanned, so the same code runs in CI.

Each (size, method, step kind) runs in its own process, so that the device's
``peak_bytes_in_use`` (``jax.local_devices()[0].memory_stats()``) is that
step's alone: every method's ordinary step; GaLore's refresh (the step
counters set to a refresh step, one step); the adapter's merge
(``olr.adapters.merge`` of the adapter with random Λ, once).  A child
compiles the step from shapes, reads the plan of that
very executable (``memory_analysis``), skips the run when the plan exceeds the
device's memory, builds random weights of the right shapes (a quantized base as
random codes and scales: the arithmetic of a step does not depend on the
values), runs ``--steps`` steps with the weights and optimizer state donated,
and reports the real peak beside the plan's peak and the median step time
(first step excluded).  A whole run stops launching children after
``--budget-s`` seconds (8 minutes by default, for one H100).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES_ACCELERATOR = ("1b", "7b")
# 7B in the order of expected peak, smallest first: what fits runs before the budget ends
ORDER_7B = ("adapter-nf4-8bit", "adapter-int8", "adapter", "galore-8bit", "galore", "adamw-8bit",
            "adamw-bf16")
GIB = 1024**3


def _child(args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr
  from benchmarks.plan import REFRESH_EVERY, batch_shape, config_for, method_parts

  config = config_for(args.size)
  rank = args.rank
  loss, tx, trainable, frozen, adapter = method_parts(args.child, config, rank)  # shapes only
  batch = jax.ShapeDtypeStruct(batch_shape(config, args.tokens), jnp.int32)
  opt_state = jax.eval_shape(tx.init, trainable)

  def step(trainable, opt_state, frozen, batch):
    value, grads = jax.value_and_grad(loss)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  def merge(adapter, lam, frozen, batch):  # olr.adapters.merge; the loss for the row's "loss"
    del frozen, batch
    new, lam = olr.adapters.merge(adapter, lam)
    return new, lam, jnp.zeros([], jnp.float32)

  device = jax.local_devices()[0]
  row = {"size": args.size, "method": args.child if rank is None else f"{args.child}-r{rank}",
         "kind": args.kind, "rank": rank, "tokens": args.tokens, "device": device.device_kind,
         "platform": device.platform, "jax": jax.__version__}
  if args.kind == "merge":  # the merge's arguments: the adapter and Λ
    fn, trainable, opt_state = merge, adapter, jax.eval_shape(olr.adapters.zeros, adapter)
  else:
    fn = step
  # On the CPU (CI's smoke run) skip LLVM's optimizations: the same buffer
  # assignment (so the same plan), a slower step, a faster compile.
  options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
             if device.platform == "cpu" else {})
  t0 = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen,
                                                      batch).compile(compiler_options=options)
  row["compile_s"] = time.perf_counter() - t0
  m = compiled.memory_analysis()
  plan = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  row["plan_peak_bytes"] = int(plan)
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  row["bytes_limit"] = limit
  if limit is not None and plan > limit:
    row["status"] = "does not fit (plan)"
    return row

  keys = iter(jax.random.split(jax.random.PRNGKey(0), 100_000))

  @functools.cache
  def maker(shape, dtype):  # one compile per distinct leaf shape, one leaf at a time
    @jax.jit
    def make(key):
      if jnp.issubdtype(dtype, jnp.floating):  # drawn in its own dtype: no f32 copy
        return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)
      info = jnp.iinfo(dtype)
      return jax.random.randint(key, shape, max(info.min, -127), min(info.max, 127),
                                jnp.int32).astype(dtype)
    return make

  def fill(x):
    return maker(tuple(x.shape), jnp.dtype(x.dtype))(next(keys))

  try:
    trainable = jax.tree.map(fill, trainable)
    frozen = jax.tree.map(fill, frozen)
    if args.kind == "merge":
      opt_state = jax.tree.map(fill, opt_state)  # Λ
    else:
      opt_state = jax.jit(tx.init)(trainable)
    if args.kind == "refresh":  # the step counters at a refresh step: the cond's branch runs
      opt_state = jax.tree.map(
          lambda x: jnp.full_like(x, REFRESH_EVERY)
          if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer) else x, opt_state)
    tokens = jax.random.randint(next(keys), batch.shape, 0, config.vocab_size, jnp.int32)
    times, value = [], None
    for _ in range(args.steps):
      t0 = time.perf_counter()
      trainable, opt_state, value = compiled(trainable, opt_state, frozen, tokens)
      jax.block_until_ready((trainable, value))
      times.append(time.perf_counter() - t0)
  except Exception as e:  # noqa: BLE001 - an out-of-memory error is a result here
    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row
  stats = device.memory_stats() or {}
  row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  row["step_ms"] = 1e3 * statistics.median(times[1:] or times)
  row["loss"] = float(value)
  row["status"] = "ok"
  return row


def _probe() -> tuple[str, str]:
  """The default backend and device kind, from a child (the parent keeps no device)."""
  code = "import jax; d = jax.local_devices()[0]; print(d.platform, '|', d.device_kind)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  platform, kind = out.stdout.strip().splitlines()[-1].split("|")
  return platform.strip(), kind.strip()


def _run_child(size: str, method: str, rank: int | None, tokens: int, steps: int,
               timeout: float, kind: str = "ordinary") -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    cmd = [sys.executable, "-m", "benchmarks.device_check", "--child", method, "--size", size,
           "--tokens", str(tokens), "--steps", str(steps), "--out", out, "--kind", kind]
    if rank is not None:
      cmd += ["--rank", str(rank)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"size": size, "method": method, "kind": kind, "rank": rank, "status": "timed out"}
    if os.path.exists(out):
      with open(out) as f:
        return json.load(f)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return {"size": size, "method": method, "kind": kind, "rank": rank,
            "status": f"process failed (rc {proc.returncode}): {tail[0][:200]}"}


def format_rows(rows: list[dict]) -> str:
  largest = max((r.get("plan_peak_bytes") or 0 for r in rows), default=0)
  unit, div = ("GiB", GIB) if largest >= GIB else ("MiB", 2**20)
  fmt = lambda b: "-" if b is None else f"{b / div:.2f}"
  lines = [f"{'size':<6}{'method':<26}{'kind':<10}"
           f"{'plan ' + unit:>10}{'real ' + unit:>10}{'real/plan':>10}"
           f"{'ms/step':>10}{'loss':>8}  status"]
  for r in rows:
    plan, real = r.get("plan_peak_bytes"), r.get("peak_bytes_in_use")
    ratio = f"{real / plan:.2f}" if plan and real else "-"
    ms = f"{r['step_ms']:.1f}" if r.get("step_ms") is not None else "-"
    loss = f"{r['loss']:.2f}" if r.get("loss") is not None else "-"
    kind = r.get("kind", "ordinary")
    lines.append(f"{r['size']:<6}{r['method']:<26}{kind:<10}{fmt(plan):>10}{fmt(real):>10}{ratio:>10}"
                 f"{ms:>10}{loss:>8}  {r['status']}")
  return "\n".join(lines)


def main(argv=None) -> None:
  from benchmarks.plan import METHODS, RANKED, step_kinds

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None, help="write the rows to this file")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--tokens", type=int, default=None,
                      help="token batch (default: 256; 64 on the CPU)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--sizes", nargs="+", default=None,
                      help="default: 1b and 7b on an accelerator, tiny on the CPU")
  parser.add_argument("--budget-s", type=float, default=480.0)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--kind", default="ordinary", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    row = _child(args)
    with open(args.out, "w") as f:
      json.dump(row, f)
    return

  from examples.llama import PAPER_RANKS

  start = time.perf_counter()
  platform, kind = _probe()
  sizes = args.sizes or (["tiny"] if platform == "cpu" else list(SIZES_ACCELERATOR))
  tokens = args.tokens or (64 if sizes == ["tiny"] else 256)
  print(f"device: {platform} ({kind}); sizes {sizes}, token batch {tokens}, {args.steps} steps")
  rows = []
  for size in sizes:
    methods = args.methods if size != "7b" else [m for m in ORDER_7B if m in args.methods]
    rank = PAPER_RANKS.get(size, 8)
    for method in methods:
      for kind in step_kinds(method):
        left = args.budget_s - (time.perf_counter() - start)
        if left <= 0:
          rows.append({"size": size, "method": method, "kind": kind, "rank": None,
                       "status": "skipped (time)"})
          continue
        row = _run_child(size, method, rank if method in RANKED else None, tokens,
                         1 if kind != "ordinary" else args.steps, timeout=left, kind=kind)
        rows.append(row)
        print(f"  {size} {row['method']} {kind}: {row['status']}", flush=True)
  print()
  print(format_rows(rows))
  print(f"\n{time.perf_counter() - start:.0f} s in all")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
