"""Shared helpers of the benchmarks: threads, machine description, timing, tables.

Every benchmark script calls :func:`configure_threads` first, before any JAX
computation: XLA reads ``XLA_FLAGS`` when its CPU client is created (at the first
computation, not at ``import jax``), so setting the flags there is early enough.

Timing rules used everywhere:

* one process measures every candidate, with the same thread settings;
* candidates are interleaved (round robin, one cycle of calls each per round),
  so a stall of the machine hits all of them rather than one;
* the first round is warm-up (compilation, first refresh) and is dropped;
* every call is timed on its own and waits for its results
  (``jax.block_until_ready``); reported are the median and the maximum;
* both wall-clock time and the process's CPU time are recorded; with one
  thread the CPU time is the default measure, since on a shared machine the
  wall time also contains the waits for a CPU that other processes cause.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Timing",
    "configure_threads",
    "default_clock",
    "fmt_bytes",
    "fmt_ms",
    "import_galore_torch",
    "interleaved",
    "low_rank_plus_noise",
    "machine_info",
    "markdown_table",
    "power_law",
    "thread_report",
    "timed_once",
    "tree_bytes",
]

_THREADS: dict[str, Any] = {}


def configure_threads(threads: int, pin: bool = True) -> dict[str, Any]:
  """Limit XLA, the BLAS/LAPACK libraries and torch to ``threads`` threads.

  * XLA: ``--xla_cpu_multi_thread_eigen`` (off for one thread) and
    ``intra_op_parallelism_threads`` in ``XLA_FLAGS``; must run before the first
    JAX computation of the process.
  * OpenBLAS of numpy and scipy (JAX's CPU LAPACK kernels, e.g. the SVD and QR,
    run through scipy's LAPACK): ``threadpoolctl.threadpool_limits``.
  * torch: ``torch.set_num_threads`` (when torch is importable).
  * with ``pin`` and fewer threads than CPUs, the process is also pinned to the
    first ``threads`` CPUs (``os.sched_setaffinity``), which bounds every pool,
    including ones the flags above do not reach.

  Returns a description of what was set (also kept for :func:`thread_report`).
  """
  if threads < 1:
    raise ValueError(f"`threads` must be >= 1, got {threads}")
  flags = os.environ.get("XLA_FLAGS", "")
  multi = "true" if threads > 1 else "false"
  flags += f" --xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={threads}"
  os.environ["XLA_FLAGS"] = flags.strip()
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(threads)
  info: dict[str, Any] = {"threads": threads, "XLA_FLAGS": os.environ["XLA_FLAGS"]}
  ncpu = os.cpu_count() or 1
  if pin and threads < ncpu and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, set(range(threads)))
  if hasattr(os, "sched_getaffinity"):
    info["affinity"] = sorted(os.sched_getaffinity(0))
  try:
    import threadpoolctl

    info["_limiter"] = threadpoolctl.threadpool_limits(limits=threads)
  except ImportError:  # pragma: no cover - threadpoolctl is part of the bench set-up
    info["_limiter"] = None
  try:
    import torch

    torch.set_num_threads(threads)
    info["torch"] = torch.get_num_threads()
  except ImportError:
    info["torch"] = None
  _THREADS.clear()
  _THREADS.update(info)
  return info


def _xla_pool_threads() -> int:
  """Threads of XLA's CPU thread pool alive in this process (by thread name)."""
  count = 0
  try:
    for tid in os.listdir("/proc/self/task"):
      with open(f"/proc/self/task/{tid}/comm") as f:
        if "XLA" in f.read():
          count += 1
  except OSError:  # pragma: no cover - not Linux
    return -1
  return count


def thread_report() -> list[str]:
  """Lines describing the thread settings actually in force (call after a JAX run)."""
  lines = [f"requested threads: {_THREADS.get('threads')}"]
  lines.append(f"XLA_FLAGS: {_THREADS.get('XLA_FLAGS', os.environ.get('XLA_FLAGS', ''))}")
  lines.append(f"XLA CPU pool threads alive: {_xla_pool_threads()}")
  if "affinity" in _THREADS:
    lines.append(f"CPU affinity: {_THREADS['affinity']}")
  try:
    import threadpoolctl

    for pool in threadpoolctl.threadpool_info():
      lines.append(
          f"{pool.get('internal_api')} ({os.path.basename(pool.get('filepath', ''))}): "
          f"{pool.get('num_threads')} threads"
      )
  except ImportError:  # pragma: no cover
    pass
  if _THREADS.get("torch") is not None:
    lines.append(f"torch intra-op threads: {_THREADS['torch']}")
  return lines


def print_machine() -> None:
  """Prints the machine and thread report that ends every benchmark's output."""
  print("machine:")
  for line in machine_info() + thread_report():
    print(f"- {line}")


def machine_info() -> list[str]:
  """Lines describing the machine and software versions."""
  import jax
  import jaxlib
  import optax

  model = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:  # pragma: no cover
    pass
  mem = "unknown"
  try:
    with open("/proc/meminfo") as f:
      kb = int(f.readline().split()[1])
      mem = f"{kb / 2**20:.1f} GiB"
  except (OSError, ValueError, IndexError):  # pragma: no cover
    pass
  load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  lines = [
      f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
      f"CPU: {model}, nproc {os.cpu_count()}, memory {mem}, load average (1/5/15 min) {load}",
      f"python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"optax {optax.__version__}, backend {jax.default_backend()}",
  ]
  torch = sys.modules.get("torch")
  if torch is not None:
    lines.append(f"torch {torch.__version__}")
  return lines


# ----------------------------------------------------------------------------
# galore-torch without transformers / bitsandbytes.


def _shim(name: str, **attrs: Any) -> None:
  parts = name.split(".")
  for i in range(1, len(parts) + 1):
    mod_name = ".".join(parts[:i])
    if mod_name not in sys.modules:
      sys.modules[mod_name] = types.ModuleType(mod_name)
    if i > 1:
      setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[mod_name])
  for k, v in attrs.items():
    setattr(sys.modules[name], k, v)


def import_galore_torch() -> tuple[Any, Any] | tuple[None, str]:
  """``(torch, galore_torch)`` or ``(None, reason)``.

  galore-torch's package ``__init__`` imports ``transformers`` (only for a
  version check) and ``bitsandbytes`` (only for its 8-bit optimizer, unused
  here).  When they are not installed, minimal stand-in modules are registered
  first so that ``GaLoreAdamW`` can be imported; the benchmark never depends on
  either library.
  """
  try:
    import torch
  except ImportError as e:
    return None, f"torch not importable ({e})"
  try:
    import transformers.utils.versions  # noqa: F401
  except ImportError:
    _shim("transformers.utils.versions", require_version=lambda *a, **k: None)
  try:
    import bitsandbytes.optim.optimizer  # noqa: F401
  except ImportError:
    _shim("bitsandbytes.optim.optimizer", Optimizer2State=object)
  try:
    import galore_torch
  except Exception as e:  # noqa: BLE001 - any import failure means "skip"
    return None, f"galore_torch not importable ({type(e).__name__}: {e})"
  return torch, galore_torch


# ----------------------------------------------------------------------------
# Test matrices.


def low_rank_plus_noise(rng, m: int, n: int, rank: int, gap: float = 1.5, top: float = 10.0):
  """A float32 ``m × n`` matrix: a rank-``rank`` signal plus i.i.d. Gaussian noise.

  The signal's singular values are log-spaced from ``top`` down to 1; the noise
  is scaled so that its largest singular value (≈ ``σ(√m + √n)``) is ``1/gap``.
  Signal and noise add, so the measured ``σ_rank/σ_(rank+1)`` comes out somewhat
  larger than ``gap`` (1.74 for ``gap=1.5`` at 1024×2816, rank 128).
  """
  import numpy as np

  k = min(rank, m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = np.geomspace(top, 1.0, k)
  sigma = 1.0 / (gap * (math.sqrt(m) + math.sqrt(n)))
  g = (u * s) @ v.T + sigma * rng.standard_normal((m, n))
  return g.astype(np.float32)


def power_law(rng, m: int, n: int, alpha: float = 1.0):
  """A float32 ``m × n`` matrix with singular values ``i^(-alpha)`` (no gap anywhere)."""
  import numpy as np

  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = np.arange(1, k + 1, dtype=np.float64) ** (-alpha)
  return ((u * s) @ v.T).astype(np.float32)


# ----------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
  """Per-call wall times (seconds) of one candidate, split by call kind."""

  ordinary: list[float] = dataclasses.field(default_factory=list)
  refresh: list[float] = dataclasses.field(default_factory=list)

  @staticmethod
  def stats(xs: Sequence[float]) -> tuple[float, float] | None:
    return (statistics.median(xs), max(xs)) if xs else None


def interleaved(
    steps: dict[str, Callable[[], Any]],
    refresh_every: int,
    rounds: int,
    warmup_rounds: int = 1,
    has_refresh: dict[str, bool] | None = None,
) -> dict[str, dict[str, Timing]]:
  """Time ``rounds`` cycles of ``refresh_every`` calls of every step function.

  ``steps[name]()`` runs one optimizer step and returns only when its results
  are ready.  A candidate's ``i``-th call (from 0, warm-up included) counts as a
  refresh step when ``i % refresh_every == 0`` and ``has_refresh[name]`` (default
  True); all other calls are ordinary steps.  Round ``j`` runs one cycle of every
  candidate in turn, so candidates are interleaved.

  Returns ``{name: {"wall": Timing, "cpu": Timing}}``: wall-clock time and the
  CPU time of the whole process (``time.process_time``) of every call.  With
  one thread the CPU time is what the call costs without the waits for a CPU
  that other processes of a shared machine cause.
  """
  has_refresh = has_refresh or {}
  out = {name: {"wall": Timing(), "cpu": Timing()} for name in steps}
  calls = dict.fromkeys(steps, 0)
  for j in range(warmup_rounds + rounds):
    for name, step in steps.items():
      for _ in range(refresh_every):
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        i = calls[name]
        calls[name] += 1
        if j < warmup_rounds:
          continue
        kind = "refresh" if has_refresh.get(name, True) and i % refresh_every == 0 else "ordinary"
        getattr(out[name]["wall"], kind).append(dt)
        getattr(out[name]["cpu"], kind).append(dc)
  return out


def minor_faults_per_call(step: Callable[[], Any], calls: int) -> float:
  """Minor page faults of the process per call, averaged over ``calls`` calls.

  Each first touch of memory the OS has not yet mapped costs a fault; buffers
  freshly allocated on every call (and returned to the OS after it, as glibc
  does for allocations above its mmap threshold) fault on every call.  Unix
  only; ``nan`` elsewhere.
  """
  try:
    import resource
  except ImportError:
    return float("nan")
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    step()
  return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def timed_once(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, list[float]]]:
  """Interleaved timing of argument-less calls (the first call of each is warm-up).

  Returns ``{name: {"wall": [...], "cpu": [...]}}`` in seconds; ``fns`` must block
  until their results are ready.
  """
  for f in fns.values():
    f()
  out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      c0, t0 = time.process_time(), time.perf_counter()
      f()
      out[k]["wall"].append(time.perf_counter() - t0)
      out[k]["cpu"].append(time.process_time() - c0)
  return out


def default_clock(threads: int) -> str:
  """``"cpu"`` for one thread (robust to a busy machine), ``"wall"`` otherwise."""
  return "cpu" if threads == 1 else "wall"


def tree_bytes(tree: Any) -> int:
  """Exact bytes of the arrays in a pytree (``size × itemsize`` of every leaf)."""
  import jax

  return sum(
      math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")
  )


# ----------------------------------------------------------------------------
# Formatting.


def fmt_ms(x: float | None, digits: int = 2) -> str:
  return "—" if x is None else f"{x * 1e3:.{digits}f}"


def fmt_bytes(n: int | None) -> str:
  if n is None:
    return "—"
  return f"{n:,}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured markdown table (columns after the first right-aligned)."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

  def line(r):
    parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
    return "| " + " | ".join(parts) + " |"

  sep = "|" + "|".join(
      ("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
  ) + "|"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
