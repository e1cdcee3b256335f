"""Compiled peak memory of one Llama-style train step, per optimizer and path.

    python -m benchmarks.memory [--size small] [--rank 32] [--batch 8]

Rows (paper 003 §5 / paper 000 Table 2):
  a  optax.adamw, full rank
  b  olr.galore on the gradient path (full-size weight gradients are formed)
  c  the adapter path: olr.nnx.LowRankLinear layers, Adam on Λ
  d  (c) with an INT8 frozen base
  e  (c) with 8-bit Adam on Λ
each compiled with and without donating params and optimizer state.  Figures
are XLA's buffer assignment (``olr.memory.step_memory``): exact bytes, no
timing; they depend on the XLA version and backend (here: CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_lowrank as olr
from examples.llama import Llama, LlamaConfig, loss_fn


def is_block_kernel(path, leaf) -> bool:
  """Attention and MLP kernels of the blocks (not embedding or output head)."""
  return "layers" in path and "kernel" in path


def _dense_step(model, tx):
  graphdef, params = nnx.split(model, nnx.Param)

  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step, (params, tx.init(params))


def _adapter_step(model, inner, scale, quantize=None):
  params = nnx.state(model, nnx.Param)
  adapter = olr.adapters.init(params, olr.gaussian(_RANK), where=is_block_kernel)
  if quantize:
    adapter = olr.adapters.quantize_base(adapter, quantize)
  olr.nnx.to_low_rank(model, adapter)
  tx = olr.nnx.optimizer(inner, scale)
  graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

  def step(trainable, opt_state, frozen, batch):
    grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, frozen), batch))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  return step, (trainable, tx.init(trainable), frozen)


_RANK = 32


def measure(size: str | LlamaConfig = "small", rank: int = 32, batch_size: int = 8,
            seq_len: int | None = None, donation: tuple[bool, ...] = (False, True)) -> dict:
  """``{row: tuple of StepMemory, one per entry of donation}``."""
  global _RANK
  _RANK = rank
  config = LlamaConfig.preset(size) if isinstance(size, str) else size
  seq_len = seq_len or config.max_seq_len
  batch = jnp.zeros((batch_size, seq_len + 1), jnp.int32)
  lr = 1e-3
  rows = {}

  def add(name, step, args):
    rows[name] = tuple(
        olr.memory.step_memory(step, *args, batch, donate_argnums=(0, 1) if d else ())
        for d in donation
    )

  model = lambda: Llama(config, rngs=nnx.Rngs(0))
  add("a adamw", *_dense_step(model(), optax.adamw(lr)))
  add("b galore (gradient path)",
      *_dense_step(model(), olr.galore(lr, rank=rank, where=is_block_kernel)))
  add("c adapter (nnx layer)", *_adapter_step(model(), optax.adam(lr), 0.25))
  add("d adapter + int8 base", *_adapter_step(model(), optax.adam(lr), 0.25, "int8"))
  add("e adapter + 8-bit Adam", *_adapter_step(model(), olr.adam_8bit(lr, min_8bit_size=0),
                                               0.25))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="small", choices=["tiny", "small", "base"])
  parser.add_argument("--rank", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=None,
                      help="tokens per sequence (default: the preset's max_seq_len)")
  args = parser.parse_args(argv)
  rows = measure(args.size, args.rank, args.batch, args.seq_len)
  print(f"Llama preset {args.size!r}, rank {args.rank}, batch {args.batch}x{args.seq_len}, "
        f"jax {jax.__version__}, backend {jax.default_backend()}")
  print("\nwithout donation")
  print(olr.memory.format_table({k: v[0] for k, v in rows.items()}))
  print("\nwith params and optimizer state donated")
  print(olr.memory.format_table({k: v[1] for k, v in rows.items()}))


if __name__ == "__main__":
  main()
