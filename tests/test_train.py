"""Tests of the comparison job: ``examples/train.py`` and ``examples/methods.py``.

Everything runs on the ``tiny`` preset with a small slice of the stdlib corpus.
The CLI is called in-process (``main(argv)``); its compiled steps are cached
per process, so the per-method step test, the end-to-end test and the resume
runs of ``test_checkpoint.py`` (same method, schedule and shapes: keep the
flags in step) compile each method once. ``--refresh-every 2`` puts a basis
refresh inside every 4-step run.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples import data as data_lib
from examples import methods as methods_lib
from examples import train
from examples.llama import LlamaConfig
from optax_lowrank.leaves import path_names

TINY = LlamaConfig.preset("tiny", dtype=jnp.float32, param_dtype=jnp.float32)
MAX_BYTES = 200_000
BATCH, SEQ, STEPS, REFRESH = 4, 32, 4, 2

# Flags shared by the in-process CLI runs (match ``_settings`` below).
COMMON = [
    "--size", "tiny", "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
    "--max-bytes", str(MAX_BYTES), "--eval-every", "2", "--eval-batches", "2",
    "--refresh-every", str(REFRESH), "--no-progress",
]


@pytest.fixture(scope="module")
def corpus() -> data_lib.Corpus:
  return data_lib.load_corpus(max_bytes=MAX_BYTES)


def _settings(corpus: data_lib.Corpus, **overrides) -> train.RunSettings:
  fields = dict(
      steps=STEPS,
      batch_size=BATCH,
      seq_len=SEQ,
      seed=0,
      eval_every=2,
      eval_batches=2,
      learning_rate=None,
      method_config=methods_lib.MethodConfig.for_model(TINY, refresh_every=REFRESH, seed=0),
      data=str(Path(corpus.root).resolve()),
      max_bytes=MAX_BYTES,
  )
  fields.update(overrides)
  return train.RunSettings(**fields)


def _fixed_batch(corpus: data_lib.Corpus) -> jax.Array:
  batch = next(data_lib.batches(corpus.train, BATCH, SEQ, seed=0))
  return jnp.asarray(batch, jnp.int32)


# ----------------------------------------------------------------------------
# methods.py


def test_registry_contents_and_lookup() -> None:
  names = methods_lib.names()
  assert names[:4] == ["adamw", "galore", "flora", "two_sided"]
  for name in names:
    method = methods_lib.get(name)
    assert method.name == name and method.learning_rate > 0 and method.description
  with pytest.raises(KeyError, match="valid: adamw"):
    methods_lib.get("sgd")
  with pytest.raises(ValueError, match="already registered"):
    methods_lib.register(methods_lib.get("adamw"))


def test_where_selects_block_kernels_only() -> None:
  _, params = train.init_params(TINY, 0)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = {
      "/".join(path_names(p)) for p, leaf in flat if methods_lib.is_projected(path_names(p), leaf)
  }
  assert "layers/0/attention/wq/kernel" in chosen
  assert "layers/1/ffn/w2/kernel" in chosen
  assert len(chosen) == 7 * TINY.n_layers
  assert not any(n.startswith(("embed", "output", "norm")) or "norm" in n for n in chosen)


def test_cosine_schedule_warms_up_and_decays() -> None:
  config = methods_lib.MethodConfig(warmup_fraction=0.1, final_lr_fraction=0.1)
  schedule = methods_lib.cosine_schedule(1.0, 100, config)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(5)) == pytest.approx(0.5)


def test_galore_state_is_smaller_than_adamw() -> None:
  _, params = train.init_params(TINY, 0)
  config = methods_lib.MethodConfig.for_model(TINY)
  sizes = {
      name: train.tree_nbytes(methods_lib.get(name).make_tx(1e-3, 10, config).init(params))
      for name in ("adamw", "galore", "flora", "two_sided")
  }
  assert sizes["flora"] < sizes["galore"] < sizes["adamw"]
  assert sizes["two_sided"] < sizes["flora"]


# ----------------------------------------------------------------------------
# One jitted step per method.


@pytest.mark.parametrize("name", methods_lib.names())
def test_jitted_step_decreases_loss(name: str, corpus: data_lib.Corpus) -> None:
  method = methods_lib.get(name)
  settings = _settings(corpus)
  graphdef, params = train.init_params(TINY, 0)
  tx = method.make_tx(settings.lr_for(method), settings.steps, settings.method_config)
  state = train.init_state(method, tx, params, settings.method_config)
  batch = _fixed_batch(corpus)
  step, memory, _ = train.cached_train_step(method, TINY, settings, graphdef, tx, state, batch)
  eval_step = train.cached_eval_step(method, TINY, graphdef)
  before = float(eval_step(state.trainable, state.frozen, batch))
  structure = jax.tree.structure(state)
  for _ in range(STEPS):
    state, loss = step(state, batch)
    assert np.isfinite(float(loss))
  after = float(eval_step(state.trainable, state.frozen, batch))
  assert after < before - 0.05, (before, after)
  assert int(state.step) == STEPS
  assert jax.tree.structure(state) == structure
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
  assert memory["peak"] > 0 and memory["argument"] >= train.tree_nbytes(state.opt_state)


def test_param_transform_hooks_follow_the_plain_trajectory(corpus: data_lib.Corpus) -> None:
  """An additive full-size 'adapter' W0 + Δ, merged before steps 2, 4, ..., matches plain Adam."""

  def make_tx(learning_rate, steps, config):
    return optax.adam(methods_lib.cosine_schedule(learning_rate, steps, config))

  def init(params, config):
    del config
    return jax.tree.map(jnp.zeros_like, params), params

  def materialize(delta, base):
    return jax.tree.map(jnp.add, base, delta)

  def before_update(delta, base, opt_state, step, full_grad):
    def merge(operand):
      d, b = operand
      merged = materialize(d, b)
      # The hook may use the full gradient of this batch at the merged weights.
      _ = jax.tree.map(lambda g, w: g.shape == w.shape, full_grad(merged), merged)
      return jax.tree.map(jnp.zeros_like, d), merged

    is_refresh = (step > 0) & (step % 2 == 0)
    delta, base = jax.lax.cond(is_refresh, merge, lambda o: o, (delta, base))
    return delta, base, opt_state

  plain = methods_lib.Method("plain_adam", make_tx, 3e-3, "Adam")
  adapter = methods_lib.Method(
      "additive", make_tx, 3e-3, "W0 + delta",
      param_transform=methods_lib.ParamTransform(init, materialize, before_update),
  )
  settings = _settings(corpus)
  model = LlamaConfig.preset("tiny", n_layers=1)  # one block: cheaper to compile
  runs = {}
  for method in (plain, adapter):
    result, state = train.train_method(method, model, corpus, settings, progress=False)
    runs[method.name] = (result, state)
  (plain_result, plain_state), (adapter_result, adapter_state) = runs.values()
  # Merged before step 3 (count 2): since then Δ holds the last two updates only.
  assert int(adapter_state.step) == STEPS and np.any(jax.tree.leaves(adapter_state.trainable)[0])
  _, initial = train.init_params(model, 0)
  assert not any(  # the base moved: merges happened
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(adapter_state.frozen), strict=True)
  )
  effective = materialize(adapter_state.trainable, adapter_state.frozen)
  for a, b in zip(jax.tree.leaves(plain_state.trainable), jax.tree.leaves(effective), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain_result["train_loss"], adapter_result["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(
      plain_result["val_history"]["val_loss"], adapter_result["val_history"]["val_loss"],
      rtol=1e-5,
  )


# ----------------------------------------------------------------------------
# The CLI.


def test_cli_end_to_end_writes_table_json_png(tmp_path: Path, capsys) -> None:
  out = tmp_path / "out"
  assert train.main([*COMMON, "--out", str(out), "--ckpt-dir", str(tmp_path / "ck")]) == 0
  stdout = capsys.readouterr().out
  names = methods_lib.names()
  assert "| method" in stdout and "val loss" in stdout and "opt-state MiB" in stdout
  for name in names:
    assert f"| {name}" in stdout
  report = json.loads((out / "results.json").read_text())
  assert [r["method"] for r in report["results"]] == names
  for r in report["results"]:
    assert r["steps"] == STEPS
    assert np.isfinite(r["final_val_loss"]) and r["perplexity"] == pytest.approx(
        np.exp(r["final_val_loss"])
    )
    assert r["opt_state_mib"] > 0 and r["step_peak_mib"] > 0 and r["ms_per_step"] is not None
    assert r["val_history"]["step"] == [0, 2, 4]
    assert len(r["train_loss"]) == STEPS
  by_name = {r["method"]: r for r in report["results"]}
  assert by_name["galore"]["opt_state_bytes"] < by_name["adamw"]["opt_state_bytes"]
  assert (out / "results.md").read_text().startswith("| method")
  assert (out / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not (tmp_path / "ck").exists()  # no --save-every: no checkpoints


def _binary_dir(tmp_path: Path) -> Path:
  folder = tmp_path / "binary"
  folder.mkdir()
  (folder / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
  return folder


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--data", "/no/such/path"], "does not exist"),
        (["--data", "<binary>"], "no text"),
        (["--methods", "adamw,sgd"], "valid: adamw"),
        (["--seq-len", "64"], "valid: 1..32"),
        (["--size", "huge"], "valid: tiny"),
        (["--steps", "0"], "positive integer"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    extra: list[str], expect: str, tmp_path: Path, capsys
) -> None:
  extra = [str(_binary_dir(tmp_path)) if a == "<binary>" else a for a in extra]
  out, ck = tmp_path / "out", tmp_path / "ck"
  code = train.main([*COMMON, "--out", str(out), "--ckpt-dir", str(ck), *extra])
  err = capsys.readouterr().err
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
  assert not out.exists() and not ck.exists()


def test_cli_trains_the_scanned_model(tmp_path: Path, capsys) -> None:
  """--scan-layers: stacked blocks under nnx.scan, kernels projected per layer."""
  runs = {}
  for flag, methods in (([], "galore"), (["--scan-layers"], "galore,adapter")):
    out = tmp_path / ("scan" if flag else "unrolled")
    argv = [*COMMON, "--methods", methods, "--out", str(out),
            "--ckpt-dir", str(tmp_path / "ck"), *flag]
    assert train.main(argv) == 0
    runs[bool(flag)] = {r["method"]: r for r in
                        json.loads((out / "results.json").read_text())["results"]}
  capsys.readouterr()
  scanned, unrolled = runs[True], runs[False]
  assert np.isfinite(scanned["adapter"]["final_val_loss"])
  # The same matrices with the same per-matrix state: equal bytes; SVD bases
  # are deterministic, so the same trajectory up to float32 round-off.
  assert scanned["galore"]["opt_state_bytes"] == unrolled["galore"]["opt_state_bytes"]
  np.testing.assert_allclose(scanned["galore"]["train_loss"], unrolled["galore"]["train_loss"],
                             rtol=1e-4)
