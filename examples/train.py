"""Train the example Llama on a real corpus with each optimizer and compare them.

Run ``python -m examples.train`` (see ``--help``). For every method of
``--methods`` (default: every registered one, see :mod:`examples.methods`) the
job trains the same freshly initialised model (same seed) on the same batches,
evaluates it on a fixed set of validation windows every ``--eval-every`` steps,
and finally prints one table:

* final validation loss (nats per byte) and perplexity (``exp`` of it);
* optimizer-state MiB: the sum of ``nbytes`` over the optimizer-state leaves
  (moments, stored projection bases, counters, keys);
* compiled train-step MiB: from the XLA memory analysis of the compiled,
  jitted step, ``argument + output + temp − alias`` bytes. The step donates
  its train state, so outputs alias their inputs; the aliased bytes are
  subtracted once so the state is counted once. Temp holds activations and
  gradients, the same for every method;
* ms/step: median wall time of a step after the first few (warm-up) steps.

``results.json`` also holds, per run, the validation curve, the training
losses, the XLA byte counts of the step, its compile time and wall time.

It also writes ``results.json``, ``results.md`` (the table) and
``val_loss.png`` (validation curves) to ``--out``.

Checkpoints (``--save-every N``) go to ``--ckpt-dir/<method>/`` with
orbax-checkpoint; ``--resume`` continues each run from its latest checkpoint,
bit-identically, and refuses (exit code 2) if the checkpoint was written by
another method, model config or run settings. ``--stop-after K`` stops each
run after K steps (to be resumed later).

``--layerwise`` trains each method with layer-wise updates
(``olr.layerwise.make_step``: every block is updated inside the backward pass,
one block's gradient alive at a time) on the scanned model; the adapter
methods train an adapter's coefficients and are refused with it.

Bad input (an unknown method or size, a ``--data`` path without text, a
``--seq-len`` above the model's ``max_seq_len``, ...) prints one line and exits
with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import optax_lowrank as olr
from examples import checkpoint as ckpt_lib
from examples import data as data_lib
from examples import methods as methods_lib
from examples.llama import PRESETS, Llama, LlamaConfig, loss_fn

__all__ = [
    "DEFAULT_STEPS",
    "RunSettings",
    "TrainState",
    "UsageError",
    "cached_eval_step",
    "cached_train_step",
    "compile_step",
    "format_table",
    "init_params",
    "init_state",
    "main",
    "make_eval_step",
    "make_layerwise_train_step",
    "make_train_step",
    "tree_nbytes",
    "train_method",
]

DEFAULT_STEPS = 120
"""Steps per method of the default run: all 7 methods on ``small`` took 2 min 53 s on
2 CPU cores (2026-11-25, install excluded), inside the 5-minute budget with room for
slower machines; docs/results.md runs the same job 5× longer."""

WARMUP_STEPS = 3
"""Timed steps left out of the ms/step median (the first calls run slower)."""

_MIB = 2.0**20


class TrainState(NamedTuple):
  """Everything a run carries from step to step (and checkpoints).

  Attributes:
    step: int32 ``()``, updates done.
    trainable: the tree the optimizer updates (the params, or an adapter's
      coefficients for methods with a ``param_transform``).
    frozen: ``None``, or the tree a ``param_transform`` keeps beside it.
    opt_state: the optimizer state.
  """

  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """The settings shared by every method of one job.

  Attributes:
    steps: updates per method.
    batch_size: windows per batch.
    seq_len: model input length (windows hold ``seq_len + 1`` bytes).
    seed: seed of the model initialisation, the batch sampler and random
      projections.
    eval_every: steps between evaluations (also at step 0 and at the end).
    eval_batches: validation batches per evaluation (fixed windows).
    learning_rate: peak learning rate for every method, or ``None`` for each
      method's own default.
    method_config: the methods' shared hyper-parameters.
    data: the corpus root, as a string (for the checkpoint check).
    max_bytes: the corpus byte budget, or ``None``.
    layerwise: train with layer-wise updates (``olr.layerwise``: the
      optimizer updates each block inside the backward pass; needs a scanned
      model and a method without a ``param_transform``).
  """

  steps: int
  batch_size: int
  seq_len: int
  seed: int
  eval_every: int
  eval_batches: int
  learning_rate: float | None
  method_config: methods_lib.MethodConfig
  data: str
  max_bytes: int | None
  layerwise: bool = False

  def lr_for(self, method: methods_lib.Method) -> float:
    """The peak learning rate ``method`` trains with."""
    return method.learning_rate if self.learning_rate is None else self.learning_rate

  def trajectory(self, method: methods_lib.Method) -> dict[str, Any]:
    """The settings that determine a run's trajectory (compared on resume)."""
    return {
        "steps": self.steps,
        "batch_size": self.batch_size,
        "seq_len": self.seq_len,
        "seed": self.seed,
        "learning_rate": self.lr_for(method),
        "method_config": dataclasses.asdict(self.method_config),
        "data": self.data,
        "max_bytes": self.max_bytes,
        # only when set: checkpoints of ordinary runs keep their meta
        **({"layerwise": True} if self.layerwise else {}),
    }


def model_config_json(config: LlamaConfig) -> dict[str, Any]:
  """A model config as JSON values (dtypes by name)."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    out[field.name] = jnp.dtype(value).name if field.name.endswith("dtype") else value
  return out


# ----------------------------------------------------------------------------
# Model, state, steps.


def init_params(config: LlamaConfig, seed: int) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """A fresh model split into its graph and a plain nested dict of its weights.

  Args:
    config: the model config (its dtypes are used as given; pin float32).
    seed: the initialisation seed.

  Returns:
    ``(graphdef, params)``; ``nnx.merge(graphdef, params)`` rebuilds the model.
    Param paths read like ``('layers', 0, 'attention', 'wq', 'kernel')``.
  """
  model = Llama(config, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def init_state(
    method: methods_lib.Method,
    tx: optax.GradientTransformation,
    params: Any,
    config: methods_lib.MethodConfig,
) -> TrainState:
  """The train state at step 0 (the params are copied, never shared).

  Args:
    method: the method (its ``param_transform``, if any, splits the params).
    tx: the method's optimizer.
    params: the initial weights.
    config: the method config, passed to ``param_transform.init``.

  Returns:
    The state.
  """
  params = jax.tree.map(jnp.copy, params)
  if method.param_transform is None:
    trainable, frozen = params, None
  else:
    trainable, frozen = method.param_transform.init(params, config)
  return TrainState(jnp.zeros([], jnp.int32), trainable, frozen, tx.init(trainable))


def _materializer(method: methods_lib.Method) -> Callable[[Any, Any], Any]:
  if method.param_transform is None:
    return lambda trainable, frozen: trainable
  return method.param_transform.materialize


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, method: methods_lib.Method
) -> Callable[[TrainState, jax.Array], tuple[TrainState, jax.Array]]:
  """The functional train step ``(state, batch) -> (state, loss)`` (not yet jitted).

  Args:
    graphdef: the model graph from :func:`init_params`.
    tx: the method's optimizer.
    method: the method (for its ``param_transform`` hooks, see
      :class:`examples.methods.ParamTransform` for the order of operations).

  Returns:
    The step; ``loss`` is the batch loss before the update (after
    ``before_update``).
  """
  materialize = _materializer(method)
  transform = method.param_transform

  def batch_loss(params: Any, batch: jax.Array) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, params), batch)

  def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, jax.Array]:
    trainable, frozen, opt_state = state.trainable, state.frozen, state.opt_state
    if transform is not None and transform.before_update is not None:
      trainable, frozen, opt_state = transform.before_update(
          trainable, frozen, opt_state, state.step, lambda p: jax.grad(batch_loss)(p, batch)
      )
    loss, grads = jax.value_and_grad(
        lambda t: batch_loss(materialize(t, frozen), batch)
    )(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return TrainState(state.step + 1, trainable, frozen, opt_state), loss

  return step


def _layerwise_parts(graphdef: nnx.GraphDef, params: Any) -> Any:
  """The scanned model as ``olr.layerwise.split_nnx`` parts (the head as ``loss_fn``'s)."""
  def head(model: Llama, h: jax.Array, batch: jax.Array) -> jax.Array:
    logits = model.output(model.norm(h)).astype(jnp.float32)  # as Llama.__call__
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  return olr.layerwise.split_nnx(nnx.merge(graphdef, params),
                                 embed=lambda model, batch: model.embed(batch[:, :-1]), head=head)


def make_layerwise_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: Any
) -> tuple[Callable[[TrainState, jax.Array], tuple[TrainState, jax.Array]], Callable[..., Any]]:
  """The layer-wise step ``(state, batch) -> (state, loss)`` and its state's init.

  ``state.trainable`` is the whole param dict, as in the ordinary step;
  ``state.opt_state`` is an ``olr.layerwise.LayerwiseState``.  ``tx`` sees
  ``outer`` (embedding, final norm, head) as one tree and every block as the
  tree ``{"layers": block}``, so the methods' ``where`` rule (kernels under
  ``layers``) and weight-decay mask apply to the blocks as in the ordinary
  step, each block's kernels now 2-D matrices.
  """
  parts = _layerwise_parts(graphdef, params)
  lw = olr.layerwise.make_step(
      parts.embed_fn, lambda layer, h: parts.block_fn(layer["layers"], h), parts.head_fn, tx)

  def split(params):
    return {k: v for k, v in params.items() if k != "layers"}, {"layers": params["layers"]}

  def init(params: Any) -> Any:
    return lw.init(*split(params))

  def step(state: TrainState, batch: jax.Array) -> tuple[TrainState, jax.Array]:
    outer, layers, opt_state, loss = lw.update(*split(state.trainable), state.opt_state, batch)
    trainable = {**outer, "layers": layers["layers"]}
    return TrainState(state.step + 1, trainable, state.frozen, opt_state), loss

  return step, init


def make_eval_step(
    graphdef: nnx.GraphDef, method: methods_lib.Method
) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """A jitted ``(trainable, frozen, batch) -> mean loss``."""
  materialize = _materializer(method)
  return jax.jit(
      lambda trainable, frozen, batch: loss_fn(
          nnx.merge(graphdef, materialize(trainable, frozen)), batch
      )
  )


def compile_step(
    step: Callable[..., Any], state: TrainState, batch: jax.Array
) -> tuple[Callable[..., Any], dict[str, float], float]:
  """Compiles ``step`` ahead of time (donating the state) and reads its memory.

  Args:
    step: from :func:`make_train_step`.
    state, batch: example inputs (shapes and dtypes only).

  Returns:
    ``(compiled, memory, seconds)``; ``memory`` has the XLA byte counts
    ``argument``, ``output``, ``alias``, ``temp`` (NaN if the backend gives
    none) and ``peak = argument + output + temp − alias``; ``seconds`` is the
    time taken to trace, lower and compile.
  """
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  names = {
      "argument": "argument_size_in_bytes",
      "output": "output_size_in_bytes",
      "alias": "alias_size_in_bytes",
      "temp": "temp_size_in_bytes",
  }
  memory = {k: float(getattr(stats, v, math.nan)) if stats else math.nan for k, v in names.items()}
  memory["peak"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
  return compiled, memory, seconds


# Compiled steps and jitted evaluations, per process: repeated runs with the same
# method, model, schedule and shapes (several main() calls in a notebook or a
# test session, a resume) reuse the executable instead of compiling it again.
_STEP_CACHE: dict[Any, tuple[Callable[..., Any], dict[str, float], float]] = {}
_EVAL_CACHE: dict[Any, Callable[..., jax.Array]] = {}
_CACHE_SIZE = 16


def _avals(tree: Any) -> tuple[Any, ...]:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves)


def cached_train_step(
    method: methods_lib.Method,
    model_config: LlamaConfig,
    settings: RunSettings,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: jax.Array,
) -> tuple[Callable[..., Any], dict[str, float], float]:
  """:func:`compile_step` of :func:`make_train_step`, cached per process.

  ``tx`` must be ``method.make_tx(settings.lr_for(method), settings.steps,
  settings.method_config)`` and ``graphdef`` the graph of ``model_config``: the
  cache key is made of those, plus the shapes and dtypes of ``state`` and
  ``batch`` and the x64 flag.
  """
  key = (
      method, model_config, settings.lr_for(method), settings.steps, settings.method_config,
      _avals((state, batch)), bool(jax.config.jax_enable_x64),
  )
  if key not in _STEP_CACHE:
    if len(_STEP_CACHE) >= _CACHE_SIZE:
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    _STEP_CACHE[key] = compile_step(make_train_step(graphdef, tx, method), state, batch)
  return _STEP_CACHE[key]


def cached_eval_step(
    method: methods_lib.Method, model_config: LlamaConfig, graphdef: nnx.GraphDef
) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """:func:`make_eval_step`, one jitted function per (model, param transform)."""
  key = (model_config, method.param_transform)
  if key not in _EVAL_CACHE:
    if len(_EVAL_CACHE) >= _CACHE_SIZE:
      _EVAL_CACHE.pop(next(iter(_EVAL_CACHE)))
    _EVAL_CACHE[key] = make_eval_step(graphdef, method)
  return _EVAL_CACHE[key]


def tree_nbytes(tree: Any) -> int:
  """Total ``nbytes`` of the array leaves of a pytree."""
  return int(sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# One run.


def _evaluate(eval_step, state: TrainState, val: Sequence[jax.Array]) -> float:
  losses = [eval_step(state.trainable, state.frozen, b) for b in val]
  return float(np.mean([float(x) for x in losses]))


def _train_batches(
    corpus: data_lib.Corpus, settings: RunSettings, skip: int
) -> Iterator[jax.Array]:
  """The training batches from position ``skip`` on (int32 device arrays)."""
  it = data_lib.batches(corpus.train, settings.batch_size, settings.seq_len, settings.seed)
  for batch in islice(it, skip, None):
    yield jnp.asarray(batch, dtype=jnp.int32)


def expected_meta(
    method: methods_lib.Method, model_config: LlamaConfig, settings: RunSettings
) -> dict[str, Any]:
  """The checkpoint fields that must match for a resume."""
  return {
      "method": method.name,
      "model": model_config_json(model_config),
      "run": settings.trajectory(method),
  }


def train_method(
    method: methods_lib.Method,
    model_config: LlamaConfig,
    corpus: data_lib.Corpus,
    settings: RunSettings,
    *,
    init: tuple[nnx.GraphDef, Any] | None = None,
    ckpt_dir: str | os.PathLike[str] | None = None,
    save_every: int = 0,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], TrainState]:
  """Trains the model with one method and measures it.

  Args:
    method: the method.
    model_config: the model.
    corpus: the data (train and validation splits).
    settings: the job's settings.
    init: ``(graphdef, params)`` from :func:`init_params` (made from
      ``settings.seed`` if not given); the params are copied.
    ckpt_dir: this run's checkpoint directory (needed for saving or resuming).
    save_every: save every this many steps and at the last step (0: never).
    resume: continue from the latest checkpoint in ``ckpt_dir`` if there is one
      (its meta must match, see :meth:`Checkpointer.check`).
    stop_after: stop once this many steps are done (the schedule still spans
      ``settings.steps``).
    progress: show a tqdm bar.

  Returns:
    ``(result, state)``: the JSON-able measurements and the final state.

  Raises:
    ResumeMismatchError: if the checkpoint belongs to another method, model or run.
  """
  graphdef, params = init if init is not None else init_params(model_config, settings.seed)
  lr = settings.lr_for(method)
  tx = method.make_tx(lr, settings.steps, settings.method_config)
  if settings.layerwise:
    layerwise_step, layerwise_init = make_layerwise_train_step(graphdef, tx, params)
    params = jax.tree.map(jnp.copy, params)
    state = TrainState(jnp.zeros([], jnp.int32), params, None, layerwise_init(params))
  else:
    layerwise_step = None
    state = init_state(method, tx, params, settings.method_config)
  end = settings.steps if stop_after is None else min(settings.steps, stop_after)

  expected = expected_meta(method, model_config, settings)
  history: dict[str, list[float]] = {"step": [], "val_loss": []}
  train_losses: list[float] = []
  resumed_from = None
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir) if ckpt_dir is not None else None
  try:
    if resume and checkpointer is not None and checkpointer.latest_step() is not None:
      checkpointer.check(expected)
      state, meta = checkpointer.restore(ckpt_lib.abstract_like(state))
      history = {k: list(v) for k, v in meta["history"].items()}
      train_losses = list(meta["train_loss"])
      resumed_from = int(meta["position"])
      if int(state.step) != resumed_from:
        raise ckpt_lib.ResumeMismatchError(
            f"checkpoint in {checkpointer.directory} is inconsistent: state at step "
            f"{int(state.step)}, data position {resumed_from}"
        )
    start = int(state.step)
    batches = _train_batches(corpus, settings, skip=start)
    val = [
        jnp.asarray(b, dtype=jnp.int32)
        for b in data_lib.val_batches(
            corpus.val, settings.batch_size, settings.seq_len, settings.eval_batches
        )
    ]
    eval_step = cached_eval_step(method, model_config, graphdef)
    if layerwise_step is not None:
      step_fn, memory, compile_s = compile_step(layerwise_step, state, val[0])
    else:
      step_fn, memory, compile_s = cached_train_step(
          method, model_config, settings, graphdef, tx, state, val[0]
      )
    opt_bytes = tree_nbytes(state.opt_state)

    def save(step: int) -> None:
      meta = {
          **expected,
          "position": step,
          "history": history,
          "train_loss": train_losses,
      }
      checkpointer.save(step, state, meta)

    if start == 0 and not history["step"]:
      history["step"].append(0)
      history["val_loss"].append(_evaluate(eval_step, state, val))
    times: list[float] = []
    bar = tqdm(
        total=end, initial=start, desc=f"{method.name:>14}", disable=not progress,
        dynamic_ncols=True, mininterval=0.5, leave=True,
    )
    wall = time.perf_counter()
    for step in range(start + 1, end + 1):
      batch = next(batches)
      t0 = time.perf_counter()
      state, loss = step_fn(state, batch)
      loss = float(loss)
      times.append(time.perf_counter() - t0)
      train_losses.append(loss)
      postfix = {"loss": f"{loss:.3f}"}
      if step % settings.eval_every == 0 or step == end:
        history["step"].append(step)
        history["val_loss"].append(_evaluate(eval_step, state, val))
        postfix["val"] = f"{history['val_loss'][-1]:.3f}"
      if checkpointer is not None and save_every > 0 and (step % save_every == 0 or step == end):
        save(step)
      bar.set_postfix(postfix, refresh=False)
      bar.update(1)
    bar.close()
    wall = time.perf_counter() - wall
  finally:
    if checkpointer is not None:
      checkpointer.close()

  timed = times[WARMUP_STEPS:] if len(times) > WARMUP_STEPS else times
  final = history["val_loss"][-1]
  result = {
      "method": method.name,
      "description": method.description,
      "learning_rate": lr,
      "steps": int(state.step),
      "resumed_from": resumed_from,
      "final_val_loss": final,
      "perplexity": math.exp(final),
      "opt_state_bytes": opt_bytes,
      "opt_state_mib": opt_bytes / _MIB,
      "step_memory_bytes": memory,
      "step_peak_mib": memory["peak"] / _MIB,
      "ms_per_step": float(np.median(timed) * 1e3) if timed else None,
      "compile_s": compile_s,
      "train_wall_s": wall,
      "val_history": history,
      "train_loss": train_losses,
  }
  return result, state


# ----------------------------------------------------------------------------
# Report.


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """The comparison table (Markdown-compatible)."""
  header = (
      "method", "lr", "steps", "val loss", "ppl", "opt-state MiB", "step peak MiB", "ms/step"
  )
  rows = []
  for r in results:
    ms = "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.0f}"
    rows.append((
        r["method"], f"{r['learning_rate']:g}", str(r["steps"]), f"{r['final_val_loss']:.4f}",
        f"{r['perplexity']:.3f}", f"{r['opt_state_mib']:.2f}", f"{r['step_peak_mib']:.1f}", ms,
    ))
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

  def line(cells: Sequence[str]) -> str:
    parts = [
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "| " + " | ".join(parts) + " |"

  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), sep, *(line(row) for row in rows)])


TABLE_NOTE = (
    "val loss: nats/byte on fixed validation windows; ppl = exp(val loss). "
    "opt-state MiB: sum of nbytes of the optimizer-state leaves. "
    "step peak MiB: compiled train step, argument + output + temp - aliased (donated state "
    "counted once). ms/step: median after warm-up."
)


def plot_curves(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
  """Writes the validation curves of all runs to a PNG (Agg, no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4.5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for r in results:
    ax.plot(r["val_history"]["step"], r["val_history"]["val_loss"], marker=".", label=r["method"])
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)


# ----------------------------------------------------------------------------
# CLI.


class UsageError(Exception):
  """Bad command-line input: reported on one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> None:  # one line instead of usage + message
    raise UsageError(message)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not value > 0 or not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  p = _Parser(
      prog="python -m examples.train",
      description="Train the example Llama with several optimizers on the same data and compare.",
  )
  registered = methods_lib.names()
  p.add_argument(
      "--methods", default="all",
      help=f"comma-separated methods, or 'all' (default). Registered: {', '.join(registered)}",
  )
  p.add_argument(
      "--size", default="small", metavar="PRESET",
      help=f"model preset: {', '.join(PRESETS)} (default: small)",
  )
  p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                 help=f"updates per method (default: {DEFAULT_STEPS})")
  p.add_argument("--batch-size", type=_positive_int, default=8, help="default: 8")
  p.add_argument("--scan-layers", action="store_true",
                 help="stack the blocks and run them with nnx.scan (each stacked kernel is "
                      "projected as n_layers matrices); the GaLore-sized presets always are")
  p.add_argument("--layerwise", action="store_true",
                 help="layer-wise updates (olr.layerwise): each block is updated inside the "
                      "backward pass, its gradient consumed at once (implies --scan-layers; "
                      "gradient-path methods only, 'all' selects those)")
  p.add_argument("--seq-len", type=_positive_int, default=None,
                 help="input length (default: the preset's max_seq_len)")
  p.add_argument("--eval-every", type=_positive_int, default=20, help="default: 20")
  p.add_argument("--eval-batches", type=_positive_int, default=4,
                 help="validation batches per evaluation (default: 4)")
  p.add_argument("--lr", type=_positive_float, default=None,
                 help="peak learning rate for every method (default: each method's own)")
  p.add_argument("--rank", type=_positive_int, default=None,
                 help="projection rank (default: a quarter of the model width)")
  p.add_argument("--refresh-every", type=_positive_int, default=50,
                 help="steps between new projection bases (default: 50)")
  p.add_argument("--seed", type=int, default=0, help="default: 0")
  p.add_argument("--data", default=None, metavar="PATH",
                 help="a text file or folder (default: the Python stdlib sources)")
  p.add_argument("--max-bytes", type=_positive_int, default=None,
                 help="read at most this many bytes of the corpus")
  p.add_argument("--out", default="runs", help="output folder (default: runs/)")
  p.add_argument("--ckpt-dir", default="checkpoints",
                 help="checkpoint root, one <ckpt-dir>/<method>/ per method (default: checkpoints)")
  p.add_argument("--save-every", type=_non_negative_int, default=0,
                 help="save a checkpoint every N steps and at the end (default: 0, never)")
  p.add_argument("--resume", action="store_true",
                 help="continue each run from its latest checkpoint in --ckpt-dir")
  p.add_argument("--stop-after", type=_positive_int, default=None,
                 help="stop each run after this many steps (resume later with --resume)")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
  return p


@dataclasses.dataclass
class _Job:
  methods: list[methods_lib.Method]
  model_config: LlamaConfig
  corpus: data_lib.Corpus
  settings: RunSettings
  out: Path
  ckpt_root: Path
  resumable: dict[str, bool]


def _prepare(args: argparse.Namespace) -> _Job:
  """Validates everything before anything is written.

  Raises:
    UsageError: with a one-line message.
  """
  registered = methods_lib.names()
  if args.methods.strip() == "all":
    names = registered
    if args.layerwise:  # the adapter methods train Λ, not the blocks' weights
      names = [n for n in registered if methods_lib.get(n).param_transform is None]
  else:
    names = list(dict.fromkeys(n.strip() for n in args.methods.split(",") if n.strip()))
    unknown = [n for n in names if n not in methods_lib.REGISTRY]
    if unknown or not names:
      raise UsageError(
          f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
          f"valid: {', '.join(registered)}, all"
      )
  if args.layerwise:
    adapters = [n for n in names if methods_lib.get(n).param_transform is not None]
    if adapters:
      raise UsageError(
          f"--layerwise: {', '.join(adapters)} train(s) an adapter's coefficients, not the "
          "blocks' weights, and has no layer-wise step; valid: "
          + ", ".join(n for n in registered if methods_lib.get(n).param_transform is None)
      )
  if args.size not in PRESETS:
    raise UsageError(f"unknown size {args.size!r}; valid: {', '.join(PRESETS)}")
  # Byte-level data: a 256-token vocabulary whatever the preset says (the
  # GaLore-sized presets carry the paper's 32000 for memory plans).
  model_config = LlamaConfig.preset(
      args.size, dtype=jnp.float32, param_dtype=jnp.float32, vocab_size=256,
      scan_layers=(args.scan_layers or args.layerwise
                   or PRESETS[args.size].get("scan_layers", False)),
  )
  seq_len = model_config.max_seq_len if args.seq_len is None else args.seq_len
  if seq_len > model_config.max_seq_len:
    raise UsageError(
        f"--seq-len {seq_len} exceeds the max_seq_len {model_config.max_seq_len} of size "
        f"{args.size!r}; valid: 1..{model_config.max_seq_len}"
    )
  if args.data is not None and not Path(args.data).exists():
    raise UsageError(f"--data path does not exist: {args.data}")
  try:
    corpus = data_lib.load_corpus(args.data, max_bytes=args.max_bytes)
  except ValueError as e:
    raise UsageError(f"--data: {e}") from None
  for split in ("train", "val"):
    n = getattr(corpus, split).size
    if n < seq_len + 1:
      raise UsageError(
          f"--data: the {split} split holds {n} bytes, fewer than --seq-len + 1 = {seq_len + 1}"
      )
  method_config = methods_lib.MethodConfig.for_model(
      model_config, refresh_every=args.refresh_every, seed=args.seed,
      **({} if args.rank is None else {"rank": args.rank}),
  )
  settings = RunSettings(
      steps=args.steps,
      batch_size=args.batch_size,
      seq_len=seq_len,
      seed=args.seed,
      eval_every=args.eval_every,
      eval_batches=args.eval_batches,
      learning_rate=args.lr,
      method_config=method_config,
      data=str(Path(corpus.root).resolve()),
      max_bytes=args.max_bytes,
      layerwise=args.layerwise,
  )
  methods = [methods_lib.get(n) for n in names]
  ckpt_root = Path(args.ckpt_dir)
  resumable = {}
  for method in methods:
    directory = ckpt_root / method.name
    with ckpt_lib.Checkpointer(directory) as checkpointer:
      latest = checkpointer.latest_step()
      if latest is not None and args.resume:
        try:
          checkpointer.check(expected_meta(method, model_config, settings))
        except ckpt_lib.ResumeMismatchError as e:
          raise UsageError(str(e)) from None
      elif latest is not None and args.save_every > 0:
        raise UsageError(
            f"{directory} already holds checkpoints (step {latest}); pass --resume to "
            "continue them or choose another --ckpt-dir"
        )
    resumable[method.name] = latest is not None
  if args.resume and not any(resumable.values()):
    raise UsageError(
        f"--resume: no checkpoint under {ckpt_root} for {', '.join(names)}"
    )
  return _Job(methods, model_config, corpus, settings, Path(args.out), ckpt_root, resumable)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the comparison job.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).

  Returns:
    The exit code: 0, or 2 for bad input (nothing written then).
  """
  job_start = time.perf_counter()
  try:
    args = build_parser().parse_args(argv)
    job = _prepare(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  settings = job.settings
  job.out.mkdir(parents=True, exist_ok=True)
  init = init_params(job.model_config, settings.seed)
  n_params = sum(x.size for x in jax.tree.leaves(init[1]))
  print(
      f"model {args.size}: {n_params:,} params | data {settings.data}: train "
      f"{job.corpus.train.size:,} B, val "
      f"{job.corpus.val.size:,} B | {settings.steps} steps x {settings.batch_size} x "
      f"{settings.seq_len} | rank {settings.method_config.rank}, refresh every "
      f"{settings.method_config.refresh_every}",
      flush=True,
  )
  results = []
  for method in job.methods:
    use_ckpt = args.save_every > 0 or (args.resume and job.resumable[method.name])
    try:
      result, _ = train_method(
          method, job.model_config, job.corpus, settings,
          init=init,
          ckpt_dir=job.ckpt_root / method.name if use_ckpt else None,
          save_every=args.save_every,
          resume=args.resume,
          stop_after=args.stop_after,
          progress=not args.no_progress,
      )
    except ckpt_lib.ResumeMismatchError as e:  # checked up front; kept as a safety net
      print(f"error: {e}", file=sys.stderr)
      return 2
    results.append(result)
  wall = time.perf_counter() - job_start

  table = format_table(results)
  print()
  print(table)
  print(TABLE_NOTE)
  print(
      f"job wall time {wall:.0f} s (compiling {sum(r['compile_s'] for r in results):.0f} s); "
      f"results in {job.out}/"
  )
  report = {
      "model": {"size": args.size, **model_config_json(job.model_config)},
      "settings": dataclasses.asdict(settings),
      "jax": {"version": jax.__version__, "backend": jax.default_backend(),
              "devices": jax.device_count()},
      "wall_s": wall,
      "note": TABLE_NOTE,
      "results": results,
  }
  (job.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
  (job.out / "results.md").write_text(table + "\n\n" + TABLE_NOTE + "\n")
  plot_curves(
      results, job.out / "val_loss.png",
      f"Llama {args.size}, {settings.steps} steps, batch {settings.batch_size}x{settings.seq_len}",
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
