"""Layer-wise updates (``olr.layerwise``) against the ordinary step: time and memory plans.

Usage::

    python -m benchmarks.layerwise_step time [--size 60m --batch 8 --seq 256 --pairs 3]
    python -m benchmarks.layerwise_step plan --size 7b --tokens 256 [--json PATH]

``time``: the scanned Llama (``examples.llama``, float32), one jitted step per
candidate with its params and state donated, as in training: ``ordinary`` is
the remat step (``LlamaConfig(remat=True)``: whole-model ``jax.value_and_grad``,
each block recomputed in the backward pass, then ``tx.update``); ``layerwise``
is ``olr.layerwise.make_step`` (each block's forward recomputed once in the
reverse pass and its update applied there).  For AdamW and GaLore (rank 128,
refresh every 200, so the timed steps are ordinary steps).  Candidates run in
interleaved pairs after one warm-up call each; one BLAS/XLA thread; CPU-time
medians and maxima, and the ratio layer-wise / ordinary of the medians.

``plan``: the layer-wise step of ``benchmarks.plan``'s methods (AdamW BF16,
GaLore, GaLore with 8-bit Adam inside) compiled from shapes (never run) in
BF16, params and state donated, with the same JSON fields as
``benchmarks.plan``'s rows (``olr.memory.plan_compiled``: XLA's bytes as
compiled here and the accelerator figure, the CPU's bf16 upcasts removed).
The optimizer's step counters are fixed to constants, but each layer's counter
travels in the reverse scan's carry, so the refresh ``lax.cond`` of a GaLore
layer stays in the program: the one plan (``ordinary``) holds both branches,
the step's worst case (a refresh SVDs one layer's matrices at a time).
``--microbatches k`` plans ``k`` micro-batches of ``--tokens`` each.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from benchmarks import common

METHODS = ("adamw-bf16", "galore", "galore-8bit")


def _tx_for_layers(method: str, rank: int | None, config: Any) -> Any:
  """``benchmarks.plan``'s transformation of ``method``; it sees each block as
  ``{"layers": block}``, so its ``where`` rule (kernels under ``layers``) holds."""
  from benchmarks import plan

  return plan.method_parts(method, config, rank)[1]


def layerwise_parts(config: Any, tx: Any, abstract: bool = True, seed: int = 0,
                    microbatches: int = 1) -> tuple:
  """``(step, outer, layers)`` of the scanned Llama of ``config`` with ``tx``.

  ``layers`` is ``{"layers": stacked blocks}`` (see :func:`_tx_for_layers`).
  """
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import optax_lowrank as olr
  from examples.llama import Llama

  build = lambda: Llama(config, rngs=nnx.Rngs(seed))
  model = nnx.eval_shape(build) if abstract else build()

  def head(m, h, batch):
    logits = m.output(m.norm(h)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  parts = olr.layerwise.split_nnx(model, embed=lambda m, b: m.embed(b[:, :-1]), head=head)
  step = olr.layerwise.make_step(
      parts.embed_fn, lambda layer, h: parts.block_fn(layer["layers"], h), parts.head_fn, tx,
      microbatches=microbatches)
  return step, parts.outer, {"layers": parts.layers}


def _fixed_counts(state: Any, count: int, n_layers: int) -> tuple[Any, Any]:
  """The state's step counters (int32 ``()`` in outer, ``(L,)`` in the layers) as constants."""
  import jax
  import jax.numpy as jnp

  def is_counter(x, stacked):
    return (jnp.issubdtype(x.dtype, jnp.integer) and x.dtype != jnp.uint32
            and tuple(x.shape) == ((n_layers,) if stacked else ()))

  flat_o, def_o = jax.tree.flatten(state.outer)
  flat_l, def_l = jax.tree.flatten(state.layers)
  mask_o = [is_counter(x, False) for x in flat_o]
  mask_l = [is_counter(x, True) for x in flat_l]
  rest = ([None if m else x for x, m in zip(flat_o, mask_o)],
          [None if m else x for x, m in zip(flat_l, mask_l)], state.grad_norm)

  def rebuild(rest):
    ro, rl, grad_norm = rest
    outer = [jnp.full(x.shape, count, x.dtype) if m else r for x, m, r in zip(flat_o, mask_o, ro)]
    layers = [jnp.full(x.shape, count, x.dtype) if m else r for x, m, r in zip(flat_l, mask_l, rl)]
    return state._replace(outer=jax.tree.unflatten(def_o, outer),
                          layers=jax.tree.unflatten(def_l, layers), grad_norm=grad_norm)

  return rest, rebuild


def plan_layerwise_row(size: str, tokens: int, method: str, rank: int | None,
                       donated: bool = True, kinds: tuple[str, ...] | None = None,
                       microbatches: int = 1) -> dict:
  """One JSON row like ``benchmarks.plan.plan_row``'s, for the layer-wise step.

  With ``microbatches=k`` the batch holds ``k × tokens`` tokens, run as ``k``
  micro-batches of ``tokens`` (``make_step(..., microbatches=k)``).
  """
  import jax
  import jax.numpy as jnp

  import optax_lowrank as olr
  from benchmarks import plan

  config = plan.config_for(size)
  tx = _tx_for_layers(method, rank, config)
  step, outer, layers = layerwise_parts(config, tx, microbatches=microbatches)
  sequences, width = plan.batch_shape(config, tokens)
  batch = jax.ShapeDtypeStruct((sequences * microbatches, width), jnp.int32)
  state = jax.eval_shape(step.init, outer, layers)
  kinds = kinds or ("ordinary",)  # holds the refresh branch too, see the module docstring
  suffix = "-layerwise" + (f"-k{microbatches}" if microbatches > 1 else "")
  row = {"method": plan.row_name(method, rank) + suffix, "rank": rank, "size": size,
         "tokens": tokens * microbatches, "microbatches": microbatches, "donated": donated,
         "layerwise": True, "step_kinds": list(kinds)}
  for kind in kinds:
    count = plan.REFRESH_EVERY if kind == "refresh" else 1
    rest, rebuild = _fixed_counts(state, count, config.n_layers)

    def fn(outer, layers, rest, batch, rebuild=rebuild):
      outer, layers, new_state, loss = step.update(outer, layers, rebuild(rest), batch)
      return outer, layers, new_state, loss

    donate = (0, 1, 2) if donated else ()
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jax.jit(fn, donate_argnums=donate).lower(outer, layers, rest, batch)
    p = olr.memory.plan_compiled(lowered)
    row[kind] = plan._figures(p)
    row[kind]["plan_wall_s"] = time.perf_counter() - t0
    row[kind]["plan_cpu_s"] = time.process_time() - c0
  row.update({k: v for k, v in row[kinds[0]].items()})
  row["weights_bytes"] = common.tree_bytes((outer, layers))
  row["optimizer_state_bytes"] = common.tree_bytes(state)
  row["accelerator_peak_bytes"] = max(row[k]["accelerator_peak_bytes"] for k in kinds)
  return row


def _plan_main(args: argparse.Namespace) -> None:
  import jax.numpy as jnp  # noqa: F401 - JAX is configured before the first import below

  from benchmarks import plan

  ranks = args.ranks or [128]
  rows = []
  for method in args.methods:
    for rank in ([None] if method == "adamw-bf16" else ranks):
      row = plan_layerwise_row(args.size, args.tokens, method, rank,
                               microbatches=args.microbatches)
      rows.append(row)
      gib = plan.GIB
      figs = " ".join(f"{k} {row[k]['accelerator_peak_bytes'] / gib:.2f}"
                      for k in row["step_kinds"])
      print(f"{row['method']:<28} accelerator GiB: {figs} | as compiled here: "
            f"{row['peak_bytes'] / gib:.2f} | state {row['optimizer_state_bytes'] / gib:.2f} "
            f"| weights {row['weights_bytes'] / gib:.2f}", flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump(rows, f, indent=2)


def _time_main(args: argparse.Namespace) -> None:
  common.configure_threads(args.threads)
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import optax_lowrank as olr
  from examples.llama import STACKED_RULE, Llama, LlamaConfig, loss_fn

  config = LlamaConfig.preset(args.size, remat=True, scan_layers=True)
  batch = jax.random.randint(jax.random.key(0), (args.batch, args.seq + 1), 0, config.vocab_size)
  is_kernel = lambda path, leaf: "layers" in path and "kernel" in path
  txs = {
      "adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
      "galore": lambda: olr.galore(1e-3, rank=args.rank, refresh_every=200, where=is_kernel,
                                   reshape=STACKED_RULE),
  }
  steps = {}
  for name, make in txs.items():
    tx = make()
    model = Llama(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)

    def ordinary(params, opt_state, batch, tx=tx, graphdef=graphdef):
      loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    o_update = jax.jit(ordinary, donate_argnums=(0, 1))
    o_box = {"args": (jax.tree.map(jnp.copy, params), tx.init(params))}

    def o_step(box=o_box, update=o_update):
      p, s, loss = update(*box["args"], batch)
      box["args"] = (p, s)
      jax.block_until_ready(loss)

    step, outer, layers = layerwise_parts(config, tx, abstract=False)
    l_update = jax.jit(step.update, donate_argnums=(0, 1, 2))
    l_box = {"args": (outer, layers, step.init(outer, layers))}

    def l_step(box=l_box, update=l_update):
      *carry, loss = update(*box["args"], batch)
      box["args"] = tuple(carry)
      jax.block_until_ready(loss)

    steps[f"{name} ordinary"] = o_step
    steps[f"{name} layerwise"] = l_step
  timings = common.timed_once(steps, args.pairs)
  rows = []
  clock = common.default_clock(args.threads)
  for name in steps:
    xs = timings[name][clock]
    med, mx = common.Timing.stats(xs)
    rows.append([name, common.fmt_ms(med, 0), common.fmt_ms(mx, 0),
                 common.fmt_ms(common.Timing.stats(timings[name]["wall"])[0], 0)])
  print()
  print(f"## layer-wise vs ordinary remat step: Llama {args.size} (scanned, float32), batch "
        f"{args.batch}x{args.seq}, {args.pairs} interleaved rounds after 1 warm-up call, "
        f"{clock} time")
  print()
  print(common.markdown_table(["candidate", f"{clock} ms median", f"{clock} ms max",
                               "wall ms median"], rows))
  print()
  for name in txs:
    ratio = (common.Timing.stats(timings[f"{name} layerwise"][clock])[0]
             / common.Timing.stats(timings[f"{name} ordinary"][clock])[0])
    print(f"- {name}: layer-wise / ordinary = {ratio:.3f}")
  print()
  common.print_machine()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("time", help="step time, interleaved pairs")
  t.add_argument("--size", default="60m")
  t.add_argument("--batch", type=int, default=8)
  t.add_argument("--seq", type=int, default=256)
  t.add_argument("--rank", type=int, default=128)
  t.add_argument("--pairs", type=int, default=3)
  t.add_argument("--threads", type=int, default=1)
  p = sub.add_parser("plan", help="memory plans of the layer-wise step (compiled from shapes)")
  p.add_argument("--size", default="7b")
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--ranks", type=int, nargs="*", default=None)
  p.add_argument("--microbatches", type=int, default=1,
                 help="k micro-batches of --tokens each in one step")
  p.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  (_time_main if args.cmd == "time" else _plan_main)(args)


if __name__ == "__main__":
  main()
