"""Memory plans of a LLaMA train step at the GaLore paper's sizes, without allocation.

    python -m benchmarks.plan --size 7b --tokens 256 [--json PATH]

For each method (AdamW in BF16, 8-bit Adam, GaLore on the gradient path,
GaLore with 8-bit inner state, the adapter path with Adam on Λ, adapter + INT8
base, adapter + NF4 base + 8-bit Adam on Λ) at the GaLore paper's rank for the
size and at rank 128, with and without donating the trainable weights and the
optimizer state, one train step of the scanned Llama (``examples.llama``
presets ``60m`` … ``13b``, BF16 weights and compute, blocks rematerialized) is
compiled from shapes (``olr.memory.plan_train_step``) — never run — and XLA's
exact bytes are printed: arguments, outputs, temporaries, aliased, peak; beside
them the analytic parts (weights, optimizer state, weight gradients, saved
activations).

XLA on the CPU computes bf16 matrix products in f32 and hoists the conversion
of the stacked weights out of the layer loop; the ``transfer`` column is the
same step compiled without that hoisting, the figure to carry to a GPU (see
``olr.memory.StepPlan``).  Both are printed, and both go to the JSON.
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
from optax_lowrank import quantization

SIZES = ("60m", "130m", "350m", "1b", "7b", "13b", "tiny")  # tiny: for tests
METHODS = ("adamw-bf16", "adamw-8bit", "galore", "galore-8bit", "adapter", "adapter-int8",
           "adapter-nf4-8bit")
# Full-rank updates from low-rank statistics (issue 25), planned when asked for
# (--methods apollo apollo-mini fira); APOLLO-Mini is rank 1 by definition.
FULL_RANK = ("apollo", "apollo-mini", "fira")
RANKED = frozenset(METHODS[2:]) | {"apollo", "fira"}
LR = 1e-3
SCALE = 0.25
BLOCK_SIZE = 256
GIB = 1024**3


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


def stacked_quantized(w: Any, format: str, block_size: int = BLOCK_SIZE) -> Any:
  """Each matrix of a stacked ``(layers, in, out)`` kernel quantized on its own.

  A ``QuantizedArray`` whose codes and scales have a leading layer axis and
  whose static shape is one layer's: ``nnx.scan`` hands each step one
  layer's codes.  Works on arrays (``jax.lax.map``: one layer's float values
  at a time) and on ``ShapeDtypeStruct`` (abstract).
  """
  one = lambda m: quantization.quantize(m, format, block_size)
  if isinstance(w, jax.ShapeDtypeStruct):
    return jax.eval_shape(jax.vmap(one), w)
  return jax.jit(lambda x: jax.lax.map(one, x))(w)


def quantize_layers(model: nnx.Module, format: str) -> None:
  """Replace every ``LowRankLinear`` base of ``model`` by its per-layer quantization."""
  for _, layer in nnx.iter_modules(model):
    if isinstance(layer, olr.nnx.LowRankLinear):
      base = layer.base.get_value()
      if base.ndim == 3:
        layer.base.set_value(stacked_quantized(base, format))
      else:
        layer.base.set_value(quantization.quantize(base, format, BLOCK_SIZE))


def adapter_model(config: LlamaConfig, rank: int, base_format: str | None = None,
                  abstract: bool = True, seed: int = 0) -> nnx.Module:
  """The Llama with its block kernels as ``LowRankLinear`` (Gaussian bases)."""
  def build():
    model = Llama(config, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    adapter = olr.adapters.init(params, olr.gaussian(rank), seed=seed, where=is_block_kernel,
                                reshape=STACKED_RULE)
    olr.nnx.to_low_rank(model, adapter)
    return model

  model = nnx.eval_shape(build) if abstract else build()
  if base_format is not None:
    quantize_layers(model, base_format)
  return model


def method_setup(method: str, config: LlamaConfig, rank: int | None, abstract: bool = True,
                 model: nnx.Module | None = None
                 ) -> tuple[Callable[..., jax.Array], optax.GradientTransformation, Any, Any]:
  """``(loss(trainable, frozen, batch), tx, trainable, frozen)`` of one method.

  ``model``: an already built model for the dense methods (the GPU check
  builds it from shapes without the float init); by default it is built here.
  """
  if method in ("adamw-bf16", "adamw-8bit", "galore", "galore-8bit", *FULL_RANK):
    if model is None:
      model = (nnx.eval_shape if abstract else (lambda f: f()))(
          lambda: Llama(config, rngs=nnx.Rngs(0)))
    if method == "adamw-bf16":
      tx = optax.adamw(LR, weight_decay=0.01)
    elif method == "adamw-8bit":
      tx = olr.adam_8bit(LR, weight_decay=0.01)
    elif method == "galore":
      tx = olr.galore(LR, rank=rank, scale=SCALE, where=is_block_kernel, reshape=STACKED_RULE)
    elif method in FULL_RANK:  # the recipes' own α (APOLLO 1, APOLLO-Mini √128, Fira 0.25)
      common = dict(where=is_block_kernel, reshape=STACKED_RULE)
      tx = (olr.apollo_mini(LR, **common) if method == "apollo-mini"
            else getattr(olr, method)(LR, rank=rank, **common))
    else:
      tx = olr.low_rank(olr.adam_8bit(LR), olr.svd(rank), scale=SCALE, where=is_block_kernel,
                        reshape=STACKED_RULE)
  else:
    fmt = {"adapter": None, "adapter-int8": "int8", "adapter-nf4-8bit": "nf4"}[method]
    if model is None:
      model = adapter_model(config, rank, fmt, abstract)
    inner = olr.adam_8bit(LR) if method.endswith("8bit") else optax.adam(LR)
    tx = olr.nnx.optimizer(inner, SCALE)
  graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

  def loss(trainable, frozen, batch):
    # fresh Variables at the caller's trace level (nnx.scan checks every one)
    frozen = jax.tree.map(lambda x: x, frozen)
    return loss_fn(nnx.merge(graphdef, trainable, frozen), batch)

  return loss, tx, trainable, frozen


def row_name(method: str, rank: int | None) -> str:
  return method if rank is None else f"{method}-r{rank}"


def plan_rows(size: str, tokens: int = 256, methods: tuple[str, ...] = METHODS,
              ranks: tuple[int, ...] | None = None, donation: tuple[bool, ...] = (True, False),
              config: LlamaConfig | None = None, transfer: bool | None = None,
              log: Callable[[str], None] | None = None) -> list[dict]:
  """One JSON-ready row per (method, rank, donation)."""
  config = config or config_for(size)
  ranks = ranks or tuple(dict.fromkeys((PAPER_RANKS.get(size, 128), 128)))
  batch = jax.ShapeDtypeStruct(batch_shape(config, tokens), jnp.int32)
  rows = []
  for method in methods:
    for rank in (ranks if method in RANKED else (None,)):
      t0 = time.perf_counter()
      loss, tx, trainable, frozen = method_setup(method, config, rank)
      for donated in donation:
        p = olr.memory.plan_train_step(loss, tx, trainable, batch, frozen, donate=donated,
                                       transfer=transfer)
        m, t = p.memory, p.transfer_peak
        rows.append({
            "method": row_name(method, rank), "rank": rank, "size": size, "tokens": tokens,
            "donated": donated, "peak_bytes": m.peak, "argument_bytes": m.arguments,
            "output_bytes": m.outputs, "temp_bytes": m.temporaries, "alias_bytes": m.aliased,
            "transfer_peak_bytes": t, "weights_bytes": p.weights,
            "optimizer_state_bytes": p.optimizer_state, "gradient_bytes": p.gradients,
            "activation_bytes": p.activations, "backend": p.backend,
            "upcasts_bf16": p.upcasts_low_precision,
        })
      if log:
        log(f"  {row_name(method, rank)}: {time.perf_counter() - t0:.1f} s")
  return rows


def format_rows(rows: list[dict]) -> str:
  cols = [("peak", "peak_bytes"), ("transfer", "transfer_peak_bytes"),
          ("args", "argument_bytes"), ("outputs", "output_bytes"), ("temp", "temp_bytes"),
          ("aliased", "alias_bytes"), ("| weights", "weights_bytes"),
          ("opt state", "optimizer_state_bytes"), ("w grads", "gradient_bytes"),
          ("activ.", "activation_bytes")]
  width = max(len(r["method"]) for r in rows) + 4
  head = f"{'method':<{width}}{'donated':>8}" + "".join(f"{c:>11}" for c, _ in cols)
  lines = [head + "   (GiB)"]
  for r in rows:
    vals = "".join(f"{(r[k] or 0) / GIB:>11.2f}" for _, k in cols)
    lines.append(f"{r['method']:<{width}}{'yes' if r['donated'] else 'no':>8}{vals}")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="7b", choices=SIZES)
  parser.add_argument("--tokens", type=int, default=256, help="token batch (sequences × 256)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=(*METHODS, *FULL_RANK))
  parser.add_argument("--ranks", type=int, nargs="+", default=None,
                      help="default: the GaLore paper's rank for the size, and 128")
  parser.add_argument("--donation", choices=("both", "yes", "no"), default="both")
  parser.add_argument("--no-transfer", action="store_true",
                      help="skip the second compile without loop-invariant hoisting")
  parser.add_argument("--json", default=None, help="write the rows to this file")
  args = parser.parse_args(argv)
  donation = {"both": (True, False), "yes": (True,), "no": (False,)}[args.donation]
  config = config_for(args.size)
  start, cpu_start = time.perf_counter(), time.process_time()
  print(f"LLaMA {args.size} (dim {config.dim}, {config.n_layers} layers, vocab "
        f"{config.vocab_size}), token batch {args.tokens}, bf16, remat; jax {jax.__version__}, "
        f"backend {jax.default_backend()}")
  rows = plan_rows(args.size, args.tokens, tuple(args.methods),
                   tuple(args.ranks) if args.ranks else None, donation, config,
                   False if args.no_transfer else None, log=print)
  print()
  print(format_rows(rows))
  if rows and rows[0]["upcasts_bf16"]:
    print("\nThis backend computes bf16 products in f32 and hoists the f32 copies of the "
          "stacked weights out of the layer loop: 'peak' is its plan, 'transfer' the same "
          "step without the hoisting (the figure for a GPU, over by at most one layer's "
          "weights in f32).")
  print(f"\nplanned in {time.perf_counter() - start:.0f} s of wall time, "
        f"{time.process_time() - cpu_start:.0f} s of this process's CPU time")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
