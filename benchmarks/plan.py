"""Memory plans of a LLaMA train step at the GaLore paper's sizes, without allocation.

    python -m benchmarks.plan --size 7b --tokens 256 [--json PATH] [--workers 2]

For each method (AdamW in BF16, 8-bit Adam, GaLore on the gradient path,
GaLore with 8-bit inner state, the adapter path with Adam on Λ, adapter + INT8
base, adapter + NF4 base + 8-bit Adam on Λ; quantized bases with the default
merge rule) at the GaLore paper's rank for the size and at rank 128, every
step kind the method takes (:func:`step_kinds`: ordinary; GaLore's refresh;
the adapter's merge) of the scanned Llama (``examples.llama`` presets ``60m``
… ``13b``, BF16 weights and compute, blocks rematerialized) is compiled from
shapes (``olr.memory.plan_train_step``, ``olr.memory.plan_compiled``) — never
run.  Donated (weights and optimizer state reused) for every kind, and not
donated for the ordinary step.

Each kind's figure is the *accelerator* figure: XLA:CPU's buffer assignment
without the buffers only the CPU holds (its bf16 → f32 upcasts,
``olr.memory.cpu_only_buffers``), plus LAPACK's SVD workspace in a refresh.
A row's figure (``accelerator_peak_bytes``) is the maximum over its kinds;
the CPU's own peak and the analytic parts (weights, optimizer state, weight
gradients, saved activations) of the ordinary step are printed beside it.
Rows are planned in ``--workers`` processes.
"""


from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lowrank as olr
from examples.llama import PAPER_RANKS, STACKED_RULE, Llama, LlamaConfig, loss_fn
from optax_lowrank import quantized_merge

SIZES = ("60m", "130m", "350m", "1b", "7b", "13b", "tiny")  # tiny: for tests
METHODS = ("adamw-bf16", "adamw-8bit", "galore", "galore-8bit", "adapter", "adapter-int8",
           "adapter-nf4-8bit")
# Full-rank updates from low-rank statistics (issue 25), planned when asked for
# (--methods apollo apollo-mini fira); APOLLO-Mini is rank 1 by definition.
FULL_RANK = ("apollo", "apollo-mini", "fira")
# The adapter path with bases made from the gradient (olr.svd), planned when
# asked for (--methods adapter-svd adapter-nf4-8bit-svd): their refresh needs
# the full weight gradient, which the adapter's step never forms.
SVD_ADAPTERS = ("adapter-svd", "adapter-nf4-8bit-svd")
RANKED = frozenset(METHODS[2:]) | {"apollo", "fira"} | set(SVD_ADAPTERS)
LR = 1e-3
SCALE = 0.25
BLOCK_SIZE = 256
REFRESH_EVERY = 200
GIB = 1024**3
KINDS = ("ordinary", "refresh", "merge")


def is_block_kernel(path, leaf) -> bool:
  """The attention and MLP kernels of the blocks (GaLore's projected leaves)."""
  del leaf
  return "layers" in path and "kernel" in path


def config_for(size: str, **overrides: Any) -> LlamaConfig:
  """The preset, scanned, in BF16 weights and compute, blocks rematerialized."""
  fields = dict(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, remat=True, scan_layers=True)
  fields.update(overrides)
  return LlamaConfig.preset(size, **fields)


def batch_shape(config: LlamaConfig, tokens: int) -> tuple[int, int]:
  """``(sequences, seq_len + 1)`` holding ``tokens`` input tokens."""
  seq = min(config.max_seq_len, tokens)
  if tokens % seq:
    raise ValueError(f"--tokens {tokens} is not a multiple of the sequence length {seq}")
  return tokens // seq, seq + 1


def adapter_setup(config: LlamaConfig, rank: int, base_format: str | None = None,
                  rule: Any = quantized_merge.DEFAULT_MERGE_RULE, abstract: bool = True,
                  seed: int = 0, svd: bool = False) -> tuple[nnx.Module, Any]:
  """The Llama with its block kernels as ``LowRankLinear`` (Gaussian bases), and its adapter.

  ``base_format``: ``None`` (BF16 base) or ``"int8"``/``"nf4"``, quantized by
  ``olr.adapters.quantize_base`` with the merge ``rule`` (the default rule
  keeps a 4-bit residual per element for the merges; ``None``: plain codes).
  A stacked kernel's quantization is its layers' (whole blocks per layer).
  ``svd``: bases by ``olr.svd(rank)`` (stored), the first made from a gradient
  shaped like the weights.
  """
  def build():
    model = Llama(config, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    projection = olr.svd(rank) if svd else olr.gaussian(rank)
    adapter = olr.adapters.init(params, projection, seed=seed, where=is_block_kernel,
                                grads=params if svd else None, reshape=STACKED_RULE)
    if base_format is not None:
      adapter = olr.adapters.quantize_base(adapter, base_format, BLOCK_SIZE, rule=rule)
    olr.nnx.to_low_rank(model, adapter)
    return model, adapter

  return nnx.eval_shape(build) if abstract else build()


def adapter_model(config: LlamaConfig, rank: int, base_format: str | None = None,
                  abstract: bool = True, seed: int = 0,
                  rule: Any = quantized_merge.DEFAULT_MERGE_RULE) -> nnx.Module:
  """The model of :func:`adapter_setup`."""
  return adapter_setup(config, rank, base_format, rule, abstract, seed)[0]


def method_setup(method: str, config: LlamaConfig, rank: int | None, abstract: bool = True,
                 model: nnx.Module | None = None
                 ) -> tuple[Callable[..., jax.Array], optax.GradientTransformation, Any, Any]:
  """``(loss(trainable, frozen, batch), tx, trainable, frozen)`` of one method.

  ``model``: an already built model for the dense methods (the GPU check
  builds it from shapes without the float init); by default it is built here.
  """
  loss, tx, trainable, frozen, _ = method_parts(method, config, rank, abstract, model)
  return loss, tx, trainable, frozen


def method_parts(method: str, config: LlamaConfig, rank: int | None, abstract: bool = True,
                 model: nnx.Module | None = None) -> tuple:
  """:func:`method_setup`'s tuple and the adapter (``None`` on the gradient path)."""
  adapter = None
  if method in ("adamw-bf16", "adamw-8bit", "galore", "galore-8bit", *FULL_RANK):
    if model is None:
      model = (nnx.eval_shape if abstract else (lambda f: f()))(
          lambda: Llama(config, rngs=nnx.Rngs(0)))
    if method == "adamw-bf16":
      tx = optax.adamw(LR, weight_decay=0.01)
    elif method == "adamw-8bit":
      tx = olr.adam_8bit(LR, weight_decay=0.01)
    elif method == "galore":
      tx = olr.galore(LR, rank=rank, scale=SCALE, where=is_block_kernel, reshape=STACKED_RULE,
                      refresh_every=REFRESH_EVERY)
    elif method in FULL_RANK:  # the recipes' own α (APOLLO 1, APOLLO-Mini √128, Fira 0.25)
      common = dict(where=is_block_kernel, reshape=STACKED_RULE, refresh_every=REFRESH_EVERY)
      tx = (olr.apollo_mini(LR, **common) if method == "apollo-mini"
            else getattr(olr, method)(LR, rank=rank, **common))
    else:
      tx = olr.low_rank(olr.adam_8bit(LR), olr.svd(rank), scale=SCALE, where=is_block_kernel,
                        reshape=STACKED_RULE, refresh_every=REFRESH_EVERY)
  else:
    svd = method in SVD_ADAPTERS
    fmt = {"adapter": None, "adapter-int8": "int8", "adapter-nf4-8bit": "nf4"}[
        method.removesuffix("-svd")]
    if model is None:
      model, adapter = adapter_setup(config, rank, fmt, abstract=abstract, svd=svd)
    inner = olr.adam_8bit(LR) if "8bit" in method else optax.adam(LR)
    tx = olr.nnx.optimizer(inner, SCALE)
  graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

  def loss(trainable, frozen, batch):
    # fresh Variables at the caller's trace level (nnx.scan checks every one)
    frozen = jax.tree.map(lambda x: x, frozen)
    return loss_fn(nnx.merge(graphdef, trainable, frozen), batch)

  loss.graphdef = graphdef  # for plan_adapter_refresh

  return loss, tx, trainable, frozen, adapter


def step_kinds(method: str) -> tuple[str, ...]:
  """The step kinds a method takes: every method an ordinary step; GaLore a
  refresh (the ``lax.cond`` branch: SVD of every projected gradient); the
  adapter path a merge (``W0 ← W0 + SᵀΛ``, re-quantized by the merge rule;
  with Gaussian bases this merge is the whole refresh: the next basis comes
  from the key, no gradient is needed); the adapter path with SVD bases a
  refresh instead (:func:`plan_adapter_refresh`: the full weight gradient,
  then the merge with the next bases made from it)."""
  if method.startswith("galore") or method in FULL_RANK or method in SVD_ADAPTERS:
    return ("ordinary", "refresh")
  if method.startswith("adapter"):
    return ("ordinary", "merge")
  return ("ordinary",)


def plan_merge(adapter: Any, donate: bool = True) -> olr.memory.CompiledPlan:
  """The compiled merge ``olr.adapters.merge(adapter, Λ)`` (adapter and Λ donated)."""
  lam = jax.eval_shape(olr.adapters.zeros, adapter)
  merge = lambda a, lam: olr.adapters.merge(a, lam)
  return olr.memory.plan_compiled(
      jax.jit(merge, donate_argnums=(0, 1) if donate else ()).lower(adapter, lam),
      accelerator=None)


def plan_adapter_refresh(loss: Callable[..., jax.Array], adapter: Any, trainable: Any,
                         frozen: Any, batch: Any, donate: bool = True,
                         lower_only: bool = False) -> olr.memory.CompiledPlan:
  """The compiled refresh of the adapter path with bases made from the gradient.

  What a training loop runs every ``refresh_every`` steps::

      grads = olr.nnx.full_weight_grad(loss_fn, model, batch)   # W0 + SᵀΛ, a backward pass
      adapter = olr.nnx.refresh_adapter(model, adapter, grads)  # merge, SVD of every grads leaf

  ``full_weight_grad`` differentiates :func:`olr.nnx.to_dense` of the model:
  it forms every block kernel's float weight and its full ``m×n`` gradient,
  which the adapter's ordinary step never does.  Arguments, donated: the
  model's state (``trainable``: Λ and the unprojected weights; ``frozen``: the
  base and the factors) and the adapter's own leaves that the model does not
  hold (key, refresh index, the unprojected leaves' base); the adapter's
  stored bases *are* the model's factors (``to_low_rank`` stores the basis
  arrays themselves), so they are read from the model, not held twice.
  ``lower_only``: return the lowered function (for ``olr.memory.peak_buffers``).
  """
  graphdef, plans = loss.graphdef, adapter.plans
  mark = jax.ShapeDtypeStruct((), jnp.uint8)  # a projected leaf's base: the model holds it
  rest = (olr.leaves.map_plans(lambda p, w: mark if p.projected else w, plans, adapter.base),
          adapter.key, adapter.refresh_index)
  stored = adapter.stored_bases  # structure only: the arrays come from the model

  def refresh(trainable, frozen, rest, batch):
    base, key, index = rest
    model = nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen))
    layers = {m.path: m for _, m in nnx.iter_modules(model)
              if isinstance(m, olr.nnx.LowRankLinear)}

    def from_layer(p, b):
      if b is None or p.path not in layers:
        return b
      factors = [f.get_value() for f in (layers[p.path].left, layers[p.path].right)
                 if f is not None]
      return jax.tree.unflatten(jax.tree.structure(b), factors)

    current = olr.adapters.Adapter(base, olr.leaves.map_plans(from_layer, plans, stored), key,
                                   index, plans)
    grads = olr.nnx.full_weight_grad(loss_fn, model, batch)
    new = olr.nnx.refresh_adapter(model, current, grads)
    _, trainable, frozen = nnx.split(model, nnx.Param, ...)
    base = olr.leaves.map_plans(lambda p, w: jnp.zeros((), jnp.uint8) if p.projected else w,
                                plans, new.base)
    return trainable, frozen, (base, new.key, new.refresh_index)

  lowered = jax.jit(refresh, donate_argnums=(0, 1, 2) if donate else (),
                    keep_unused=True).lower(trainable, frozen, rest, batch)
  return lowered if lower_only else olr.memory.plan_compiled(lowered)


def row_name(method: str, rank: int | None) -> str:
  return method if rank is None else f"{method}-r{rank}"


def _figures(p: olr.memory.CompiledPlan) -> dict:
  m, a = p.memory, p.accelerator
  return {"peak_bytes": m.peak, "accelerator_peak_bytes": p.accelerator_peak,
          "argument_bytes": m.arguments, "output_bytes": m.outputs, "temp_bytes": m.temporaries,
          "alias_bytes": m.aliased, "accelerator_temp_bytes": a.temporaries,
          "cpu_only_bytes": p.cpu_only.saved if p.cpu_only else 0,
          "lapack_workspace_bytes": p.lapack_workspace}


def plan_row(size: str, tokens: int, method: str, rank: int | None, donated: bool,
             config: LlamaConfig | None = None, accelerator: bool | None = None,
             kinds: tuple[str, ...] | None = None, parts: tuple | None = None) -> dict:
  """One JSON-ready row: every step kind of one (method, rank, donation).

  The row keeps the ordinary step's figures at the top level (``peak_bytes``,
  ``argument_bytes``...), one sub-dict per kind planned (``row[kind]``), the
  kinds (``step_kinds``) and ``accelerator_peak_bytes``: the maximum of the
  kinds' accelerator figures.  ``parts``: :func:`method_parts`'s tuple, when
  already built (the rows of one method and rank share it).
  """
  config = config or config_for(size)
  batch = jax.ShapeDtypeStruct(batch_shape(config, tokens), jnp.int32)
  loss, tx, trainable, frozen, adapter = parts or method_parts(method, config, rank)
  kinds = tuple(k for k in (kinds or step_kinds(method)) if k in step_kinds(method))
  row = {"method": row_name(method, rank), "rank": rank, "size": size, "tokens": tokens,
         "donated": donated, "step_kinds": list(kinds)}
  ordinary = None
  for kind in kinds:
    if kind == "merge":
      row[kind] = _figures(plan_merge(adapter, donated))
      continue
    if kind == "refresh" and method in SVD_ADAPTERS:
      row[kind] = _figures(plan_adapter_refresh(loss, adapter, trainable, frozen, batch,
                                                donated))
      continue
    # ordinary: step 1 (no refresh); refresh: step REFRESH_EVERY (the cond taken)
    p = olr.memory.plan_train_step(loss, tx, trainable, batch, frozen, donate=donated,
                                   accelerator=accelerator,
                                   count=REFRESH_EVERY if kind == "refresh" else 1)
    row[kind] = _figures(p)
    if kind == "ordinary":
      ordinary = p
  if ordinary is not None:
    row.update(row["ordinary"])
    row.update({"weights_bytes": ordinary.weights,
                "optimizer_state_bytes": ordinary.optimizer_state,
                "gradient_bytes": ordinary.gradients, "activation_bytes": ordinary.activations,
                "backend": ordinary.backend, "upcasts_bf16": ordinary.upcasts_low_precision})
  row["accelerator_peak_bytes"] = max(row[k]["accelerator_peak_bytes"] for k in kinds)
  return row


def _process_seconds() -> float:
  """CPU time of this process and of its finished children (XLA's compile children)."""
  import resource

  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rows_job(args: tuple) -> list[dict]:
  """The rows of one (method, rank): its model, optimizer and adapter built once."""
  size, tokens, method, rank, accelerator, config, plans = args
  t0, c0 = time.perf_counter(), _process_seconds()
  parts = method_parts(method, config, rank)
  rows = []
  for donated, kinds in plans:
    rows.append(plan_row(size, tokens, method, rank, donated, config, accelerator, kinds, parts))
    # the shared set-up is counted in the first row's time
    t1, c1 = time.perf_counter(), _process_seconds()
    rows[-1].update(plan_wall_s=round(t1 - t0, 2), plan_cpu_s=round(c1 - c0, 2))
    t0, c0 = t1, c1
  return rows


def plan_rows(size: str, tokens: int = 256, methods: tuple[str, ...] = METHODS,
              ranks: tuple[int, ...] | None = None, donation: tuple[bool, ...] = (True, False),
              config: LlamaConfig | None = None, accelerator: bool | None = None,
              log: Callable[[str], None] | None = None, workers: int = 1,
              undonated_kinds: tuple[str, ...] = ("ordinary",),
              kinds: tuple[str, ...] = KINDS) -> list[dict]:
  """One row per (method, rank, donation), in that order.

  ``undonated_kinds``: the kinds also planned without donation (a merge or a
  refresh without donation holds two copies of what it rewrites; nobody runs
  one that way).  ``workers > 1`` plans in that many processes, one job per
  (method, rank) (its rows share the model and optimizer), the jobs with the
  most compilations first.  Each row carries ``plan_wall_s`` and
  ``plan_cpu_s`` (its worker's CPU time, XLA's compile children included).
  """
  config = config or config_for(size)
  ranks = ranks or tuple(dict.fromkeys((PAPER_RANKS.get(size, 128), 128)))
  jobs = []
  for method in methods:
    for rank in (ranks if method in RANKED else (None,)):
      plans = []
      for donated in donation:
        planned = tuple(k for k in step_kinds(method) if k in kinds
                        and (donated or k in undonated_kinds))
        if planned:
          plans.append((donated, planned))
      if plans:
        jobs.append((size, tokens, method, rank, accelerator, config, tuple(plans)))

  def report(rows):
    if log:
      for row in rows:
        log(f"  {row['method']} ({'donated' if row['donated'] else 'not donated'}): "
            f"{', '.join(row['step_kinds'])}: {row['plan_wall_s']:.1f} s wall, "
            f"{row['plan_cpu_s']:.1f} s CPU")

  if workers > 1 and len(jobs) > 1:
    import concurrent.futures
    import multiprocessing

    cost = lambda job: sum(len(k) for _, k in job[-1])
    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i]))
    ctx = multiprocessing.get_context("spawn")
    done: dict[int, list[dict]] = {}
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      futures = {pool.submit(_rows_job, jobs[i]): i for i in order}
      for future in concurrent.futures.as_completed(futures):
        done[futures[future]] = future.result()
        report(done[futures[future]])
    return [row for i in range(len(jobs)) for row in done[i]]
  rows = []
  for job in jobs:
    rows += _rows_job(job)
    report(rows[-len(job[-1]):])
  return rows


def format_rows(rows: list[dict]) -> str:
  """The table: the accelerator figure of every kind, then the ordinary step's parts."""
  kinds = [k for k in KINDS if any(k in r for r in rows)]
  width = max(len(r["method"]) for r in rows) + 4
  cols = ([("max accel", lambda r: r["accelerator_peak_bytes"])]
          + [(k, lambda r, k=k: r[k]["accelerator_peak_bytes"] if k in r else None)
             for k in kinds]
          + [("CPU peak", lambda r: r.get("peak_bytes")),
             ("cpu-only", lambda r: r.get("cpu_only_bytes")),
             ("| weights", lambda r: r.get("weights_bytes")),
             ("opt state", lambda r: r.get("optimizer_state_bytes")),
             ("w grads", lambda r: r.get("gradient_bytes")),
             ("activ.", lambda r: r.get("activation_bytes"))])
  head = f"{'method':<{width}}{'donated':>8}" + "".join(f"{c:>11}" for c, _ in cols)
  lines = [head + "   (GiB)"]
  for r in rows:
    vals = "".join(f"{'-':>11}" if f(r) is None else f"{f(r) / GIB:>11.2f}" for _, f in cols)
    lines.append(f"{r['method']:<{width}}{'yes' if r['donated'] else 'no':>8}{vals}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="7b", choices=SIZES)
  parser.add_argument("--tokens", type=int, default=256, help="token batch (sequences × 256)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=(*METHODS, *FULL_RANK, *SVD_ADAPTERS))
  parser.add_argument("--ranks", type=int, nargs="+", default=None,
                      help="default: the GaLore paper's rank for the size, and 128")
  parser.add_argument("--donation", choices=("both", "yes", "no"), default="both")
  parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                      help="step kinds to plan (each method plans those it takes)")
  parser.add_argument("--no-accelerator", action="store_true",
                      help="skip reading the buffer assignment for the accelerator figure")
  parser.add_argument("--workers", type=int, default=2, help="processes planning rows")
  parser.add_argument("--layerwise", action="store_true",
                      help="also plan the layer-wise step (olr.layerwise) of adamw-bf16, galore "
                           "and galore-8bit, donated (benchmarks.layerwise_step)")
  parser.add_argument("--json", default=None, help="write the rows to this file")
  args = parser.parse_args(argv)
  donation = {"both": (True, False), "yes": (True,), "no": (False,)}[args.donation]
  config = config_for(args.size)
  start, cpu_start = time.perf_counter(), _process_seconds()
  print(f"LLaMA {args.size} (dim {config.dim}, {config.n_layers} layers, vocab "
        f"{config.vocab_size}), token batch {args.tokens}, bf16, remat; jax {jax.__version__}, "
        f"backend {jax.default_backend()}, {args.workers} worker(s)")
  rows = plan_rows(args.size, args.tokens, tuple(args.methods),
                   tuple(args.ranks) if args.ranks else None, donation, config,
                   False if args.no_accelerator else None, log=print, workers=args.workers,
                   kinds=tuple(args.kinds))
  if args.layerwise:
    from benchmarks import layerwise_step

    for method in (m for m in args.methods if m in layerwise_step.METHODS):
      for rank in ([None] if method not in RANKED else
                   (args.ranks or sorted({PAPER_RANKS.get(args.size, 128), 128}))):
        rows.append(layerwise_step.plan_layerwise_row(args.size, args.tokens, method, rank))
        print(f"planned {rows[-1]['method']}", flush=True)
  print()
  print(format_rows(rows))
  if rows and rows[0].get("upcasts_bf16"):
    print("\nThis backend computes bf16 products in f32: 'CPU peak' is its plan; the kinds' "
          "columns are the accelerator figure (olr.memory.cpu_only_buffers: the buffer "
          "assignment without the CPU's bf16 upcasts, plus LAPACK's SVD workspace).")
  print(f"\nplanned in {time.perf_counter() - start:.0f} s of wall time, "
        f"{_process_seconds() - cpu_start:.0f} s of CPU time (this process and its workers)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
