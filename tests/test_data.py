"""Tests for the byte-level data pipeline in ``examples/data.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from examples.data import (
  SEPARATOR,
  Corpus,
  batches,
  find_text_files,
  load_corpus,
  split_files,
  stdlib_root,
  val_batches,
)

MAX_BYTES = 400_000


@pytest.fixture(scope="module")
def corpus() -> Corpus:
  """A capped corpus over the standard library sources."""
  return load_corpus(max_bytes=MAX_BYTES)


def test_stdlib_files_are_sorted_python_sources() -> None:
  root = stdlib_root()
  files = find_text_files(root, "*.py")
  names = [f.relative_to(root).as_posix() for f in files]
  assert len(names) > 100
  assert names == sorted(names)
  assert all(n.endswith(".py") for n in names)
  assert not any("site-packages" in n or "__pycache__" in n for n in names)


def test_split_is_deterministic_disjoint_and_non_empty(corpus: Corpus) -> None:
  again = load_corpus(max_bytes=MAX_BYTES)
  assert again.train_files == corpus.train_files
  assert again.val_files == corpus.val_files
  np.testing.assert_array_equal(again.train, corpus.train)
  np.testing.assert_array_equal(again.val, corpus.val)
  assert corpus.train.size > 0 and corpus.val.size > 0
  assert corpus.train_files and corpus.val_files
  assert not set(corpus.train_files) & set(corpus.val_files)
  assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8
  assert corpus.train.size + corpus.val.size <= MAX_BYTES


def test_split_files_is_a_stable_partition() -> None:
  names = [f"pkg/module_{i}.py" for i in range(400)]
  train, val = split_files(names, 0.05)
  assert split_files(names, 0.05) == (train, val)
  assert sorted(train + val) == sorted(names)
  assert not set(train) & set(val)
  assert 5 <= len(val) <= 40
  # Membership depends on the name only, not on the other names.
  sub_train, sub_val = split_files(names[:200], 0.05)
  assert set(sub_val) == set(val) & set(names[:200])


@pytest.mark.parametrize("names", [["a.txt", "b.txt"], ["only_two/x", "only_two/y"]])
def test_split_files_forces_both_sides_non_empty(names: list[str]) -> None:
  for fraction in (1e-9, 1 - 1e-9):
    train, val = split_files(names, fraction)
    assert train and val


def test_full_stdlib_loads_quickly() -> None:
  import time

  start = time.perf_counter()
  full = load_corpus()
  assert time.perf_counter() - start < 10.0
  assert full.train.size > 1_000_000
  assert len(full.val_files) >= 10


def test_folder_and_file_corpus(tmp_path: Path) -> None:
  for i in range(30):
    (tmp_path / f"doc_{i:02d}.txt").write_text(f"document number {i}\n" * 20)
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 50)
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  folder = load_corpus(tmp_path)
  assert folder.train.size > 0 and folder.val.size > 0
  assert "blob.bin" not in folder.train_files + folder.val_files
  assert not set(folder.train_files) & set(folder.val_files)
  joined = bytes(folder.train) + bytes(folder.val)
  joined.decode("utf-8")  # invalid bytes were replaced
  assert joined.count(bytes([SEPARATOR])) == len(folder.train_files) + len(folder.val_files) - 2

  single = load_corpus(tmp_path / "doc_03.txt")
  assert single.train.size > 0 and single.val.size > 0
  text = (tmp_path / "doc_03.txt").read_bytes()
  assert bytes(single.train) + bytes(single.val) == text


def test_bad_paths_raise(tmp_path: Path) -> None:
  missing = tmp_path / "missing"
  with pytest.raises(ValueError, match="does not exist") as info:
    load_corpus(missing)
  assert str(missing) in str(info.value)

  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  (empty_dir / "zero.txt").write_bytes(b"")
  (empty_dir / "blob.bin").write_bytes(b"\x00\xff" * 10)
  with pytest.raises(ValueError, match="no text") as info:
    load_corpus(empty_dir)
  assert str(empty_dir) in str(info.value)

  empty_file = tmp_path / "empty.txt"
  empty_file.write_bytes(b"")
  with pytest.raises(ValueError, match="no text") as info:
    load_corpus(empty_file)
  assert str(empty_file) in str(info.value)
  assert "\n" not in str(info.value)


def test_batches_shape_dtype_range_and_determinism(corpus: Corpus) -> None:
  first = list(batches(corpus.train, batch_size=4, seq_len=32, seed=7, num_batches=3))
  second = list(batches(corpus.train, batch_size=4, seq_len=32, seed=7, num_batches=3))
  other = next(batches(corpus.train, batch_size=4, seq_len=32, seed=8))
  assert len(first) == 3
  for a, b in zip(first, second, strict=True):
    assert a.shape == (4, 33) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], other)
  assert not np.array_equal(first[0], first[1])


def test_batches_are_contiguous_windows() -> None:
  tokens = np.arange(100, dtype=np.uint8)
  batch = next(batches(tokens, batch_size=8, seq_len=5, seed=0))
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
  assert batch.max() <= 99


def test_val_batches_walk_the_split(corpus: Corpus) -> None:
  walk = list(val_batches(corpus.val, batch_size=4, seq_len=32, num_batches=5))
  assert len(walk) == 5
  for b in walk:
    assert b.shape == (4, 33) and b.dtype == np.int32
  again = list(val_batches(corpus.val, batch_size=4, seq_len=32, num_batches=5))
  np.testing.assert_array_equal(np.stack(walk), np.stack(again))
  np.testing.assert_array_equal(walk[0][0], corpus.val[:33])
  np.testing.assert_array_equal(walk[-1][-1], corpus.val[-33:])


def test_batch_argument_errors() -> None:
  tokens = np.zeros(10, dtype=np.uint8)
  with pytest.raises(ValueError, match="seq_len"):
    next(batches(tokens, batch_size=2, seq_len=10, seed=0))
  with pytest.raises(ValueError, match="positive"):
    next(batches(tokens, batch_size=0, seq_len=4, seed=0))
  with pytest.raises(ValueError, match="num_batches"):
    next(val_batches(tokens, batch_size=2, seq_len=4, num_batches=0))
