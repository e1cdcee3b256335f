"""Checkpoints of the training job with orbax-checkpoint, and a guarded resume.

A checkpoint holds two items, written together under one step directory:

* ``state``: the train state pytree — trainable params, frozen tree (adapter
  methods; ``None`` otherwise), optimizer state and the step counter — saved
  with ``ocp.args.StandardSave``;
* ``meta``: a JSON document (``ocp.args.JsonSave``) with the method name, the
  model config, the run settings that determine the trajectory (learning rate,
  steps, batch shape, seed, data, method config), the data-iterator position
  (training batches consumed so far) and the evaluation history.

The state is restored with ``ocp.args.StandardRestore`` against the *abstract*
state of a freshly initialised run (``jax.ShapeDtypeStruct`` leaves with their
sharding). That target carries the pytree structure, so custom nodes — the
``LowRankState`` NamedTuple, the ``Basis`` nodes of stored projections, the
``None`` entries of random projections — come back exactly as they were.
Together with the iterator position this makes a resumed run bit-identical to
an uninterrupted one.

Saves are synchronous: the train step donates its input buffers, so a save
must be complete before the next step runs.

Before restoring anything, :meth:`Checkpointer.check` compares the
checkpoint's method, model config and run settings with the requested ones
and raises :class:`ResumeMismatchError` naming what differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["FORMAT_VERSION", "Checkpointer", "ResumeMismatchError", "abstract_like"]

FORMAT_VERSION = 1
"""Version of the ``meta`` layout; a checkpoint of another version is refused."""

_STATE = "state"
_META = "meta"


class ResumeMismatchError(ValueError):
  """The checkpoint was written by a different method, model or run."""


def abstract_like(tree: Any) -> Any:
  """The restore target of ``tree``: ``ShapeDtypeStruct`` leaves, sharding included."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _canonical(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
  return json.loads(json.dumps(value))


def _first_difference(saved: Any, wanted: Any, prefix: str = "") -> str | None:
  """A short description of the first place where two JSON values differ."""
  if isinstance(saved, dict) and isinstance(wanted, dict):
    for key in sorted(set(saved) | set(wanted)):
      where = f"{prefix}.{key}" if prefix else key
      if key not in saved:
        return f"{where}: missing in the checkpoint (wanted {wanted[key]!r})"
      if key not in wanted:
        return f"{where}: {saved[key]!r} in the checkpoint, not set now"
      found = _first_difference(saved[key], wanted[key], where)
      if found:
        return found
    return None
  if saved != wanted:
    return f"{prefix or 'value'}: checkpoint has {saved!r}, this run has {wanted!r}"
  return None


class Checkpointer:
  """Saves and restores the train state of one run in one directory.

  Args:
    directory: the run's checkpoint directory (created on the first save).
    max_to_keep: how many of the most recent checkpoints to keep.

  Example:
    >>> ckpt = Checkpointer("checkpoints/galore")
    >>> ckpt.save(100, state, {"method": "galore", ...})
    >>> meta = ckpt.check(expected)          # raises ResumeMismatchError
    >>> state, meta = ckpt.restore(abstract_like(fresh_state))
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2) -> None:
    self.directory = os.path.abspath(os.fspath(directory))
    self._max_to_keep = max_to_keep
    self._manager_instance: ocp.CheckpointManager | None = None

  @property
  def _manager(self) -> ocp.CheckpointManager:
    """The orbax manager, made on first use (so that a mere check writes nothing)."""
    if self._manager_instance is None:
      self._manager_instance = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=self._max_to_keep,
              enable_async_checkpointing=False,
              create=False,
          ),
          item_names=(_STATE, _META),
      )
    return self._manager_instance

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def close(self) -> None:
    """Releases the manager's resources."""
    if self._manager_instance is not None:
      self._manager_instance.close()
      self._manager_instance = None

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or ``None`` if there is none."""
    if not os.path.isdir(self.directory):
      return None
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Writes ``state`` and ``meta`` as the checkpoint of ``step`` (blocking).

    Args:
      step: the number of updates done; names the checkpoint.
      state: the train-state pytree (arrays, ``None``, NamedTuples, custom nodes).
      meta: JSON-serialisable metadata; ``format`` is added.
    """
    document = {"format": FORMAT_VERSION, **_canonical(dict(meta))}
    os.makedirs(self.directory, exist_ok=True)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(document)}
        ),
        force=True,
    )
    self._manager.wait_until_finished()

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` document of ``step`` (default: the latest checkpoint).

    Raises:
      FileNotFoundError: if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    )
    return dict(restored[_META])

  def check(self, expected: Mapping[str, Any], step: int | None = None) -> dict[str, Any]:
    """Reads the ``meta`` of a checkpoint and compares it with ``expected``.

    Every key of ``expected`` (e.g. ``method``, ``model``, ``run``) must be equal
    in the checkpoint; other keys of the checkpoint (history, positions) are
    not compared.

    Args:
      expected: the JSON values this run would write.
      step: which checkpoint (default: the latest).

    Returns:
      The checkpoint's ``meta``.

    Raises:
      FileNotFoundError: if there is no checkpoint.
      ResumeMismatchError: naming the first difference, e.g. the method.
    """
    meta = self.read_meta(step)
    if meta.get("format") != FORMAT_VERSION:
      raise ResumeMismatchError(
          f"checkpoint in {self.directory} has format {meta.get('format')!r}, "
          f"this code reads format {FORMAT_VERSION}"
      )
    wanted = _canonical(dict(expected))
    for key in ("method", *sorted(k for k in wanted if k != "method")):
      if key not in wanted:
        continue
      diff = _first_difference(meta.get(key), wanted[key], key)
      if diff:
        raise ResumeMismatchError(f"cannot resume from {self.directory}: {diff}")
    return meta

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint into the structure of ``abstract_state``.

    Args:
      abstract_state: the target, normally :func:`abstract_like` of a freshly
        initialised train state of the same method and model.
      step: which checkpoint (default: the latest).

    Returns:
      ``(state, meta)``.

    Raises:
      FileNotFoundError: if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardRestore(abstract_state),
                _META: ocp.args.JsonRestore(),
            }
        ),
    )
    return restored[_STATE], dict(restored[_META])
