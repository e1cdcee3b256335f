"""Tests of ``examples/checkpoint.py`` and of resuming the training job.

The resume test runs the CLI in-process three times on the ``tiny`` preset for
``galore`` (SVD bases stored in the state), ``flora`` (random bases rebuilt
from keys), ``natural_galore`` (gradient histories and their Gram matrices)
and ``adapter`` (the dual path: frozen base, stored bases and ``Λ``): 4 steps
straight, versus 2 steps + checkpoint, then ``--resume``
for the last 2. With ``--refresh-every 2`` a new basis is made right at the
resume point. Both must end with exactly the same params and optimizer state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import checkpoint as ckpt_lib
from examples import methods as methods_lib
from examples import train
from examples.llama import LlamaConfig

TINY = LlamaConfig.preset("tiny", dtype=jnp.float32, param_dtype=jnp.float32)
MAX_BYTES = 200_000
STEPS = 4
REFRESH = 2
RESUMED = ("galore", "flora", "natural_galore", "adapter")
COMMON = [
    "--size", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32",
    "--max-bytes", str(MAX_BYTES), "--eval-every", "2", "--eval-batches", "2",
    "--refresh-every", str(REFRESH), "--no-progress",
]


def _fresh_state(name: str) -> train.TrainState:
  """A freshly initialised train state of the resume runs (the restore target)."""
  method = methods_lib.get(name)
  config = methods_lib.MethodConfig.for_model(TINY, refresh_every=REFRESH, seed=0)
  _, params = train.init_params(TINY, 0)
  tx = method.make_tx(method.learning_rate, STEPS, config)
  return train.init_state(method, tx, params, config)


def _restore(directory: Path, name: str) -> tuple[train.TrainState, dict]:
  with ckpt_lib.Checkpointer(directory) as checkpointer:
    state, meta = checkpointer.restore(ckpt_lib.abstract_like(_fresh_state(name)))
  return state, meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
  """Checkpoint roots of the straight run and of the interrupted + resumed run."""
  root = tmp_path_factory.mktemp("resume")
  methods = ["--methods", ",".join(RESUMED)]
  straight, split = root / "straight", root / "split"
  assert train.main([
      *COMMON, *methods, "--out", str(root / "out_straight"), "--ckpt-dir", str(straight),
      "--save-every", str(STEPS),
  ]) == 0
  assert train.main([
      *COMMON, *methods, "--out", str(root / "out_first"), "--ckpt-dir", str(split),
      "--save-every", "2", "--stop-after", str(STEPS // 2),
  ]) == 0
  assert train.main([
      *COMMON, *methods, "--out", str(root / "out_resumed"), "--ckpt-dir", str(split),
      "--save-every", "2", "--resume",
  ]) == 0
  return {
      "root": root, "straight": straight, "split": split,
      "out_straight": root / "out_straight", "out_resumed": root / "out_resumed",
  }


@pytest.mark.parametrize("name", RESUMED)
def test_resume_is_bit_identical(name: str, runs: dict[str, Path]) -> None:
  a, meta_a = _restore(runs["straight"] / name, name)
  b, meta_b = _restore(runs["split"] / name, name)
  assert isinstance(a, train.TrainState) and int(a.step) == int(b.step) == STEPS
  assert jax.tree.structure(a) == jax.tree.structure(b) == jax.tree.structure(_fresh_state(name))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  assert meta_a["history"] == meta_b["history"]
  assert meta_a["train_loss"] == meta_b["train_loss"]
  # The reported results agree too; the resumed report knows where it started.
  ra = json.loads((runs["out_straight"] / "results.json").read_text())["results"]
  rb = json.loads((runs["out_resumed"] / "results.json").read_text())["results"]
  ra, rb = ({r["method"]: r for r in rs}[name] for rs in (ra, rb))
  assert ra["final_val_loss"] == rb["final_val_loss"] and rb["resumed_from"] == STEPS // 2


def test_galore_checkpoint_holds_svd_bases(runs: dict[str, Path]) -> None:
  state, _ = _restore(runs["straight"] / "galore", "galore")
  low_rank_state = state.opt_state[0]
  wq = low_rank_state.bases["layers"][0]["attention"]["wq"]["kernel"]
  factors = [f for f in wq.factors if f is not None]
  assert len(factors) == 1 and np.any(factors[0])
  # Flora stores no basis: its bases are rebuilt from the key.
  flora, _ = _restore(runs["straight"] / "flora", "flora")
  bases = jax.tree.leaves(flora.opt_state[0].bases, is_leaf=lambda x: x is None)
  assert bases and all(b is None for b in bases)


def test_refuses_to_resume_another_method(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
  moved = tmp_path / "ck"
  shutil.copytree(runs["split"] / "galore", moved / "flora")
  out = tmp_path / "out"
  code = train.main([
      *COMMON, "--methods", "flora", "--out", str(out), "--ckpt-dir", str(moved), "--resume",
  ])
  err = capsys.readouterr().err
  assert code == 2 and "method" in err and "galore" in err and err.count("\n") == 1, err
  assert not out.exists()


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--size", "small", "--seq-len", "32"], "model."),
        (["--lr", "0.5"], "run.learning_rate"),
        (["--batch-size", "2"], "run.batch_size"),
    ],
)
def test_refuses_to_resume_another_model_or_run(
    extra: list[str], expect: str, runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
  out = tmp_path / "out"
  code = train.main([
      *COMMON, "--methods", "galore", "--out", str(out), "--ckpt-dir", str(runs["split"]),
      "--resume", *extra,
  ])
  err = capsys.readouterr().err
  assert code == 2 and expect in err, err
  assert not out.exists()


def test_refuses_to_overwrite_checkpoints_without_resume(
    runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
  out = tmp_path / "out"
  code = train.main([
      *COMMON, "--methods", "galore", "--out", str(out), "--ckpt-dir", str(runs["split"]),
      "--save-every", "2",
  ])
  assert code == 2 and "--resume" in capsys.readouterr().err
  assert not out.exists()


def test_checkpointer_roundtrip_keeps_custom_nodes(tmp_path: Path) -> None:
  state = _fresh_state("galore")
  # Make every float leaf distinct from a fresh state.
  state = jax.tree.map(
      lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state
  )
  meta = {"method": "galore", "model": {"dim": 32}, "run": {"steps": [1, 2]}}
  with ckpt_lib.Checkpointer(tmp_path / "c") as checkpointer:
    assert checkpointer.latest_step() is None
    checkpointer.save(7, state, meta)
    assert checkpointer.latest_step() == 7
    restored, read = checkpointer.restore(ckpt_lib.abstract_like(_fresh_state("galore")))
    assert read["format"] == ckpt_lib.FORMAT_VERSION and read["run"] == {"steps": [1, 2]}
    assert checkpointer.check({"method": "galore", "run": {"steps": (1, 2)}})["method"] == "galore"
    with pytest.raises(ckpt_lib.ResumeMismatchError, match="method: checkpoint has 'galore'"):
      checkpointer.check({"method": "flora"})
    with pytest.raises(ckpt_lib.ResumeMismatchError, match=r"model\.dim"):
      checkpointer.check({"method": "galore", "model": {"dim": 64}})
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(x, y)


def test_checkpointer_on_missing_directory_writes_nothing(tmp_path: Path) -> None:
  with ckpt_lib.Checkpointer(tmp_path / "none") as checkpointer:
    assert checkpointer.latest_step() is None
    with pytest.raises(FileNotFoundError):
      checkpointer.read_meta()
  assert not (tmp_path / "none").exists()
