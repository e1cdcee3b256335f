"""Byte-level text data pipeline for the example language model.

By default the corpus is the Python standard library's own source code (every
``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, skipping
``site-packages``), which is available on every machine without a download.
Any text file or folder can be used instead.

Files are split into train and validation sets *by file*, using a stable hash
of each file's relative path, so the split never changes between runs or
machines. Each split is the concatenation of its files' UTF-8 bytes, with a
separator byte between files, stored as one ``uint8`` numpy array whose values
are directly the token ids of a 256-token vocabulary.

Example:
    >>> corpus = load_corpus(max_bytes=2_000_000)
    >>> batch = next(batches(corpus.train, batch_size=16, seq_len=128, seed=0))
    >>> batch.shape, batch.dtype
    ((16, 129), dtype('int32'))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

__all__ = [
  "SEPARATOR",
  "Corpus",
  "batches",
  "find_text_files",
  "load_corpus",
  "split_files",
  "stdlib_root",
  "val_batches",
]

SEPARATOR = 0
"""Byte placed between consecutive files (NUL never occurs in text files)."""

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A byte-level corpus split into train and validation token arrays.

  Attributes:
      root: The file or folder the corpus was read from.
      train: ``uint8`` token array of the training split.
      val: ``uint8`` token array of the validation split.
      train_files: Relative paths of the files read into ``train``.
      val_files: Relative paths of the files read into ``val``.
  """

  root: Path
  train: np.ndarray
  val: np.ndarray
  train_files: tuple[str, ...]
  val_files: tuple[str, ...]


def stdlib_root() -> Path:
  """Returns the folder holding the Python standard library's sources."""
  return Path(sysconfig.get_paths()["stdlib"])


def _is_skipped_dir(name: str) -> bool:
  """Tells whether a folder should not be descended into."""
  return name in _SKIPPED_DIRS or name.startswith(".")


def find_text_files(root: Path, pattern: str = "*") -> list[Path]:
  """Lists candidate files under a folder, sorted by relative path.

  Hidden folders, ``site-packages``, ``dist-packages`` and ``__pycache__`` are
  skipped and symbolic links to folders are not followed.

  Args:
      root: A folder, or a single file (returned as the only candidate).
      pattern: Glob pattern that file names must match, e.g. ``"*.py"``.

  Returns:
      The matching files, sorted by their POSIX path relative to ``root``.
  """
  if root.is_file():
    return [root]
  found: list[Path] = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if not _is_skipped_dir(d)]
    base = Path(folder)
    found.extend(
      base / f for f in files if not f.startswith(".") and fnmatch.fnmatchcase(f, pattern)
    )
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stable_fraction(name: str) -> float:
  """Maps a string to a number in ``[0, 1)`` that is identical on every run."""
  digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64


def split_files(names: Sequence[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
  """Deterministically splits file names into train and validation sets.

  A name goes to validation when its stable hash falls below
  ``val_fraction``. If that leaves a side empty and there are at least two
  names, the name with the lowest (resp. highest) hash is moved over, so both
  sides are non-empty.

  Args:
      names: Distinct file names (relative paths).
      val_fraction: Expected fraction of names in the validation set.

  Returns:
      ``(train_names, val_names)``, each in the order of ``names``.
  """
  scores = {name: _stable_fraction(name) for name in names}
  val = {name for name, score in scores.items() if score < val_fraction}
  if len(scores) >= 2:
    if not val:
      val = {min(scores, key=scores.__getitem__)}
    elif len(val) == len(scores):
      val.discard(max(scores, key=scores.__getitem__))
  return [n for n in names if n not in val], [n for n in names if n in val]


def _read_text_bytes(path: Path) -> bytes | None:
  """Reads a file as valid UTF-8 bytes, or ``None`` if unreadable or binary."""
  try:
    raw = path.read_bytes()
  except OSError:
    return None
  if b"\x00" in raw:
    return None
  return raw.decode("utf-8", errors="replace").encode("utf-8")


def _read_split(
  root: Path, names: Sequence[str], cap: int | None
) -> tuple[np.ndarray, tuple[str, ...]]:
  """Concatenates the text files of one split, stopping once ``cap`` bytes are read.

  Args:
      root: Folder the names are relative to.
      names: Relative names of the split's files, in reading order.
      cap: Maximum number of bytes to keep, or ``None`` for no limit.

  Returns:
      The ``uint8`` token array and the names of the files actually used
      (binary, empty and unreadable files are left out).
  """
  chunks: list[bytes] = []
  used: list[str] = []
  total = 0
  for name in names:
    if cap is not None and total >= cap:
      break
    text = _read_text_bytes(root / name)
    if text:
      chunks.append(text)
      used.append(name)
      total += len(text) + 1
  data = bytes([SEPARATOR]).join(chunks)
  if cap is not None:
    data = data[:cap]
  return np.frombuffer(data, dtype=np.uint8).copy(), tuple(used)


def _split_caps(max_bytes: int | None, val_fraction: float) -> tuple[int | None, int | None]:
  """Shares a total byte budget between the train and validation splits."""
  if max_bytes is None:
    return None, None
  val_cap = max(1, math.ceil(max_bytes * val_fraction))
  return max(1, max_bytes - val_cap), val_cap


def _split_by_position(root: Path, name: str, val_fraction: float, max_bytes: int | None) -> Corpus:
  """Splits one text file by position: its tail becomes validation.

  Args:
      root: The corpus root: the file itself, or the folder holding it.
      name: The file's name relative to ``root`` (ignored if ``root`` is a file).
      val_fraction: Fraction of the bytes held out for validation.
      max_bytes: Optional cap on the bytes read.

  Returns:
      The corpus; both splits hold at least one byte.

  Raises:
      ValueError: If the file holds fewer than two bytes of text.
  """
  folder, name = (root.parent, root.name) if root.is_file() else (root, name)
  tokens, used = _read_split(folder, [name], max_bytes)
  if tokens.size < 2:
    raise ValueError(f"corpus path contains no text: {root}")
  n_val = min(max(1, math.ceil(tokens.size * val_fraction)), tokens.size - 1)
  cut = tokens.size - n_val
  return Corpus(root, tokens[:cut].copy(), tokens[cut:].copy(), used, used)


def _split_folder(
  root: Path, names: Sequence[str], val_fraction: float, max_bytes: int | None
) -> Corpus:
  """Splits the files of a folder by file and reads both splits."""
  train_cap, val_cap = _split_caps(max_bytes, val_fraction)
  train_names, val_names = split_files(names, val_fraction)
  train, train_used = _read_split(root, train_names, train_cap)
  val, val_used = _read_split(root, val_names, val_cap)
  if train.size and val.size:
    return Corpus(root, train, val, train_used, val_used)
  # One side held only binary or empty files: split again over the text files.
  text_names = sorted(train_used + val_used)
  if not text_names:
    raise ValueError(f"corpus path contains no text: {root}")
  if len(text_names) == 1:
    return _split_by_position(root, text_names[0], val_fraction, max_bytes)
  return _split_folder(root, text_names, val_fraction, max_bytes)


def load_corpus(
  path: str | os.PathLike[str] | None = None,
  *,
  pattern: str | None = None,
  val_fraction: float = 0.05,
  max_bytes: int | None = None,
) -> Corpus:
  """Reads a text corpus and splits it into train and validation token arrays.

  Args:
      path: A text file or a folder of text files. ``None`` means the Python
          standard library's sources.
      pattern: Glob pattern for file names inside a folder. Defaults to
          ``"*.py"`` for the standard library and ``"*"`` otherwise; files
          that contain NUL bytes (binary files) are ignored.
      val_fraction: Expected fraction of files held out for validation.
      max_bytes: Optional budget on the total bytes kept, shared between the
          splits in proportion ``1 - val_fraction`` : ``val_fraction``. Each
          split reads its files in sorted order until its share is filled.

  Returns:
      The loaded :class:`Corpus`; both splits are non-empty. When only one
      text file is available the split is by position instead: the last
      ``val_fraction`` of its bytes form the validation split.

  Raises:
      ValueError: If ``path`` does not exist or holds no text, or an argument
          is out of range.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
  if max_bytes is not None and max_bytes < 2:
    raise ValueError(f"max_bytes must be at least 2, got {max_bytes!r}")
  root = stdlib_root() if path is None else Path(path)
  if not root.exists():
    raise ValueError(f"corpus path does not exist: {root}")
  if root.is_file():
    return _split_by_position(root, root.name, val_fraction, max_bytes)
  if pattern is None:
    pattern = "*.py" if path is None else "*"
  names = [f.relative_to(root).as_posix() for f in find_text_files(root, pattern)]
  return _split_folder(root, names, val_fraction, max_bytes)


def _check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
  """Validates batch arguments against the length of a token array."""
  if batch_size <= 0 or seq_len <= 0:
    raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
  if len(tokens) < seq_len + 1:
    raise ValueError(f"token array of length {len(tokens)} is shorter than seq_len + 1")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  """Cuts windows of ``seq_len + 1`` tokens at the given starts, as int32."""
  index = starts[:, None] + np.arange(seq_len + 1)[None, :]
  return tokens[index].astype(np.int32)


def batches(
  tokens: np.ndarray,
  batch_size: int,
  seq_len: int,
  seed: int,
  num_batches: int | None = None,
) -> Iterator[np.ndarray]:
  """Yields training batches of windows taken at random offsets.

  Args:
      tokens: 1-D token array (for example ``Corpus.train``).
      batch_size: Number of windows per batch.
      seq_len: Model input length; each window holds ``seq_len + 1`` tokens
          so that inputs are ``[:, :-1]`` and targets ``[:, 1:]``.
      seed: Seed of the offset sampler; equal seeds give equal batches.
      num_batches: Number of batches to yield, or ``None`` for no end.

  Yields:
      ``int32`` arrays of shape ``(batch_size, seq_len + 1)``.

  Raises:
      ValueError: If the arguments are not positive or ``tokens`` is too short.
  """
  _check_window(tokens, batch_size, seq_len)
  rng = np.random.default_rng(seed)
  n_starts = len(tokens) - seq_len
  produced = 0
  while num_batches is None or produced < num_batches:
    yield _gather(tokens, rng.integers(0, n_starts, size=batch_size), seq_len)
    produced += 1


def val_batches(
  tokens: np.ndarray, batch_size: int, seq_len: int, num_batches: int = 8
) -> Iterator[np.ndarray]:
  """Yields a fixed set of evaluation batches that walk the whole split.

  The ``batch_size * num_batches`` window starts are spaced evenly from the
  beginning to the end of ``tokens``, so the result depends only on the
  arguments and covers the split uniformly whatever its size.

  Args:
      tokens: 1-D token array (for example ``Corpus.val``).
      batch_size: Number of windows per batch.
      seq_len: Model input length; windows hold ``seq_len + 1`` tokens.
      num_batches: Number of batches to yield.

  Yields:
      ``int32`` arrays of shape ``(batch_size, seq_len + 1)``.

  Raises:
      ValueError: If the arguments are not positive or ``tokens`` is too short.
  """
  _check_window(tokens, batch_size, seq_len)
  if num_batches <= 0:
    raise ValueError(f"num_batches must be positive, got {num_batches}")
  last_start = len(tokens) - seq_len - 1
  starts = np.linspace(0, last_start, batch_size * num_batches).round().astype(np.int64)
  for chunk in starts.reshape(num_batches, batch_size):
    yield _gather(tokens, chunk, seq_len)


def _main() -> None:
  """Prints a short summary of the default corpus."""
  import time

  start = time.perf_counter()
  corpus = load_corpus()
  elapsed = time.perf_counter() - start
  print(f"root: {corpus.root}")
  print(f"train: {len(corpus.train_files)} files, {corpus.train.size:,} bytes")
  print(f"val:   {len(corpus.val_files)} files, {corpus.val.size:,} bytes")
  print(f"loaded in {elapsed:.2f}s")


if __name__ == "__main__":
  _main()
