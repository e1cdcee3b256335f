"""One train step of the adapter path against AdamW's: time, FLOP model, compiled peak.

    python -m benchmarks.adapter_step [--size base] [--batch 8] [--seq 256] [--rounds 5]

The Llama ``base`` preset (GaLore's 60M block shapes: width 512, MLP 1376, 8
layers; byte vocabulary), batch 8×256, float32, one thread.  Each candidate is
one jitted step — forward, backward and optimizer update — with its trainable
weights and optimizer state donated; candidates are timed interleaved in one
process (first round dropped) and the median CPU time per step is reported
(one thread: CPU time is what a step costs without the waits a shared machine
adds).

Candidates: ``optax.adamw`` on every weight; the adapter path
(``olr.nnx.LowRankLinear``, Gaussian bases, Adam on Λ) at ranks 128 and 32 with
each :attr:`LowRankLinear.evaluation`: ``"factors"`` (the product through the
factors), ``"merged"`` (``W0 + U Λ`` formed on the fly, again in the backward
pass) and ``"auto"`` (per layer, whichever ``LowRankLinear.flops`` counts
cheaper).  The FLOP model of the block kernels is printed beside the times, and
XLA's compiled peak (``olr.memory.plan_train_step``) beside both.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import common


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="base")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--ranks", type=int, nargs="+", default=[128, 32])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--modes", nargs="+", default=["factors", "merged", "auto"])
  parser.add_argument("--scan", action="store_true",
                      help="stacked blocks under nnx.scan, rematerialized (activations of one "
                      "block kept): the weight-dominated regime of large models")
  args = parser.parse_args(argv)
  common.configure_threads(args.threads)

  import jax
  import optax
  from flax import nnx

  import optax_lowrank as olr
  from benchmarks.plan import is_block_kernel
  from examples.llama import STACKED_RULE, Llama, LlamaConfig, loss_fn

  config = LlamaConfig.preset(args.size, **(dict(scan_layers=True, remat=True) if args.scan
                                             else {}))
  tokens = args.batch * args.seq
  batch = jax.random.randint(jax.random.PRNGKey(1), (args.batch, args.seq + 1), 0,
                             config.vocab_size)

  def jitted(loss, tx, trainable, frozen):
    def step(trainable, opt_state, frozen, batch):
      grads = jax.grad(loss)(trainable, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state

    fn = jax.jit(step, donate_argnums=(0, 1))
    holder = {"t": trainable, "s": tx.init(trainable)}

    def run():
      holder["t"], holder["s"] = fn(holder["t"], holder["s"], frozen, batch)
      jax.block_until_ready(holder["t"])

    peak = olr.memory.plan_train_step(loss, tx, trainable, batch, frozen).peak
    return run, peak

  def split(model):
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

    def loss(trainable, frozen, batch):
      return loss_fn(nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen)), batch)

    return loss, trainable, frozen

  shapes = [(config.dim, config.dim)] * 4 + [(config.dim, config.hidden_dim)] * 2 + \
      [(config.hidden_dim, config.dim)]
  steps, peaks, flops, chosen = {}, {}, {}, {}
  loss, trainable, frozen = split(Llama(config, rngs=nnx.Rngs(0)))
  steps["adamw"], peaks["adamw"] = jitted(loss, optax.adamw(1e-3), trainable, frozen)
  flops["adamw"] = config.n_layers * sum(
      olr.nnx.LowRankLinear.flops(tokens, m, n, None, None)["dense"] for m, n in shapes)
  chosen["adamw"] = "-"
  for rank in args.ranks:
    for mode in args.modes:
      model = Llama(config, rngs=nnx.Rngs(0))
      adapter = olr.adapters.init(nnx.state(model, nnx.Param), olr.gaussian(rank),
                                  where=is_block_kernel,
                                  reshape=STACKED_RULE if args.scan else None)
      olr.nnx.to_low_rank(model, adapter)
      layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, olr.nnx.LowRankLinear)]
      total, picks = 0, []
      for layer in layers:
        layer.evaluation = mode
        shape = layer.base.get_value().shape
        m, n = shape[-2:]
        stacked = shape[0] if len(shape) == 3 else 1
        rl = None if layer.left is None else layer.left.get_value().shape[-1]
        rr = None if layer.right is None else layer.right.get_value().shape[-1]
        cost = layer.flops(tokens, m, n, rl, rr)
        pick = mode if mode != "auto" else min(("factors", "merged"), key=cost.get)
        picks += [pick] * stacked
        total += stacked * cost[pick]
      name = f"adapter r{rank} {mode}"
      loss, trainable, frozen = split(model)
      steps[name], peaks[name] = jitted(loss, olr.nnx.optimizer(optax.adam(1e-3), 0.25),
                                        trainable, frozen)
      flops[name] = total
      chosen[name] = f"{picks.count('merged')}/{len(picks)} merged"

  timings = common.timed_once(steps, args.rounds)
  clock = common.default_clock(args.threads)
  med = {k: statistics.median(v[clock]) for k, v in timings.items()}
  kind = " scanned + remat" if args.scan else ""
  print(f"Llama {args.size!r}{kind}, batch {args.batch}x{args.seq}, float32, "
        f"{args.threads} thread(s), "
        f"{args.rounds} interleaved rounds, median {clock} time per step; jax {jax.__version__}")
  print("\n".join(common.machine_info()))
  head = (f"{'candidate':<24}{'ms/step':>10}{'× adamw':>9}{'kernel GFLOP':>14}{'× adamw':>9}"
          f"{'peak MiB':>10}{'× adamw':>9}  layers")
  print("\n" + head)
  for k in steps:
    print(f"{k:<24}{1e3 * med[k]:>10.0f}{med[k] / med['adamw']:>9.2f}{flops[k] / 1e9:>14.1f}"
          f"{flops[k] / flops['adamw']:>9.2f}{peaks[k] / 2**20:>10.1f}"
          f"{peaks[k] / peaks['adamw']:>9.2f}  {chosen[k]}")
  print("\nkernel GFLOP: the block kernels' forward + backward (LowRankLinear.flops); "
        "attention scores, norms, embedding, head and the update are extra and common.")


if __name__ == "__main__":
  main()
