"""Memory plans read from XLA's compiled output: buffer assignment, live ranges, LAPACK.

A plan compiles a function from shapes alone (``jax.ShapeDtypeStruct``; nothing
is allocated or run) and reads what XLA decided:

* :class:`StepMemory`: ``memory_analysis()``'s arguments, outputs,
  temporaries and aliased (donated) bytes; ``peak = arguments + outputs +
  temporaries − aliased``.
* :func:`plan_compiled` / :func:`plan_function`: a :class:`CompiledPlan`,
  that figure as compiled here and the one to carry to a device with native
  bf16 arithmetic.  XLA:CPU upcasts bf16 products to f32; :func:`cpu_only_buffers`
  parses the optimized HLO, the ``*-buffer-assignment.txt`` and
  ``*-live-range.txt`` dumps and recomputes the temporaries' peak (the most
  bytes covered at once along the live ranges) without the buffers only the
  upcasts make.  On the CPU a large program is compiled in a child process
  stopped once the buffer assignment is written (before code generation).
* :func:`lapack_workspace_bytes`: the ``work``/``iwork`` arrays LAPACK's
  ``?gesdd`` allocates outside XLA's buffers for ``jnp.linalg.svd`` (LAPACK's
  own workspace query; for the thin factors of a wide ``m×n`` float32 matrix
  ``4m² + 7m`` floats and ``8m`` int32).
* :func:`peak_buffers`: the temporaries live at that peak, largest first.

All figures are bytes.  Train steps are planned with
:func:`optax_lowrank.memory.plan_train_step`, which builds on these; every name
here is also importable from ``optax_lowrank.memory``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "StepMemory",
    "CompiledPlan",
    "plan_compiled",
    "plan_function",
    "backend_upcasts_low_precision",
    "lapack_workspace_bytes",
    "PeakBuffer",
    "peak_buffers",
    "CpuOnlyBuffers",
    "cpu_only_buffers",
]


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """XLA's memory figures for one compiled function (bytes).

  ``peak`` is ``arguments + outputs + temporaries − aliased``: the bytes live
  at once during the step, counting donated (aliased) inputs once.
  """

  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  peak: int


_LOW_FLOATS = (jnp.bfloat16, jnp.float16)
_PLAN_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _target_platform() -> str:
  """The platform ``jax.jit`` compiles for here (``jax.default_device`` first)."""
  device = jax.config.jax_default_device
  if device is not None and not isinstance(device, str):
    return device.platform
  return device or jax.default_backend()


def _memory_of(compiled) -> StepMemory:
  m = compiled.memory_analysis()
  arguments = int(m.argument_size_in_bytes)
  outputs = int(m.output_size_in_bytes)
  temporaries = int(m.temp_size_in_bytes)
  aliased = int(m.alias_size_in_bytes)
  return StepMemory(arguments, outputs, temporaries, aliased,
                    arguments + outputs + temporaries - aliased)


def backend_upcasts_low_precision() -> bool:
  """Whether this backend computes a bf16 matrix product in float32.

  Compiles a 16×16 bf16 product and looks at the optimized HLO: on XLA's CPU
  backend the product's operands are converted to f32 first.  Cached per
  backend.
  """
  return _upcasts(jax.default_backend())


@functools.cache
def _upcasts(backend: str) -> bool:
  del backend  # the cache key
  a = jax.ShapeDtypeStruct((16, 16), jnp.bfloat16)
  text = jax.jit(jnp.matmul).lower(a, a).compile().as_text()
  dots = [line for line in text.splitlines() if " dot(" in line]
  return any(line.split("=", 1)[1].lstrip().startswith("f32") for line in dots)


# ----------------------------------------------------------------------------
# Plans of one compiled function
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
  """The memory plan of one compiled function (any step: train, merge, refresh).

  Attributes:
    memory: XLA's figures as this backend compiles it.
    accelerator: the same figures for a device with native bf16 arithmetic:
      the temporaries less :attr:`cpu_only`'s saving (``memory`` itself when
      this backend does not upcast, the function holds no bf16/f16 array, or
      the analysis was not asked for).
    cpu_only: what the CPU's buffer assignment holds only because it upcasts
      bf16 (see :func:`cpu_only_buffers`), or ``None`` when not analysed.
    lapack_workspace: bytes LAPACK allocates inside the largest SVD custom
      call of the function (outside XLA's buffers; see
      :func:`lapack_workspace_bytes`); 0 without one.
    backend: ``jax.default_backend()`` at planning time.
  """

  memory: StepMemory
  accelerator: StepMemory
  cpu_only: CpuOnlyBuffers | None
  lapack_workspace: int
  backend: str

  @property
  def peak(self) -> int:
    """XLA's peak bytes as compiled here."""
    return self.memory.peak

  @property
  def accelerator_peak(self) -> int:
    """The peak to carry to a device with native bf16 products, solver workspace included."""
    return self.accelerator.peak + self.lapack_workspace


def plan_compiled(lowered: jax.stages.Lowered, accelerator: bool | None = None, *,
                  assignment_only: bool | None = None) -> CompiledPlan:
  """Compile ``lowered`` (``jax.jit(f).lower(...)``) and plan its memory.

  Args:
    lowered: the lowered function.
    accelerator: also read the buffer assignment and remove what only an
      upcasting backend holds (:func:`cpu_only_buffers`); ``None``: when this
      backend upcasts bf16 products and an argument or result is bf16/f16.
    assignment_only: on the CPU, compile in a child process that is stopped
      once XLA has written the buffer assignment (before code generation,
      about 70 % of an XLA:CPU compile, which a plan never uses); the
      figures are read from that assignment, byte-identical to the
      in-process compile's (``tests/test_plan.py``).  Falls back to an
      in-process compile when no child can run.  ``None``: on the CPU, for
      a program whose StableHLO text exceeds 256 KiB (a model's step: there
      the compile costs seconds, the child's start about one).
  """
  on_cpu = _target_platform() == "cpu"
  if accelerator is None:
    avals = jax.tree.leaves((lowered.args_info, lowered.out_info))
    accelerator = on_cpu and backend_upcasts_low_precision() and any(
        getattr(a, "dtype", None) in _LOW_FLOATS for a in avals)
  # A plan never runs: XLA:CPU may skip LLVM's optimizations (the buffer
  # assignment is made before code generation; the same bytes, half the time).
  options = dict(_PLAN_ONLY) if on_cpu else {}
  cpu_only = None
  dumps = None
  if on_cpu and assignment_only is not False:
    dumps = _assignment_in_child(lowered, options, None if assignment_only else _LARGE)
  if dumps is not None:
    text, assignment, live_ranges = dumps
    memory = _memory_from_assignment(assignment)
    if accelerator:
      cpu_only = cpu_only_buffers(text, assignment, live_ranges)
  elif accelerator and on_cpu:
    with tempfile.TemporaryDirectory(prefix="olr-plan-") as tmp:
      compiled = lowered.compile(compiler_options={**options, "xla_dump_to": tmp})
      text = compiled.as_text()
      cpu_only = cpu_only_buffers(
          text, _read_dump(tmp, "cpu_after_optimizations-buffer-assignment.txt"),
          _read_dump(tmp, "cpu_after_optimizations-live-range.txt"))
    memory = _memory_of(compiled)
  else:
    compiled = lowered.compile(compiler_options=options)
    text = compiled.as_text()
    memory = _memory_of(compiled)
  accel = memory
  if cpu_only is not None and cpu_only.saved:
    temporaries = memory.temporaries - cpu_only.saved
    accel = dataclasses.replace(memory, temporaries=temporaries,
                                peak=memory.peak - cpu_only.saved)
  return CompiledPlan(memory, accel, cpu_only, lapack_workspace_bytes(text),
                      jax.default_backend())


# The child of ``_assignment_in_child``: XLA:CPU compiles the lowered module
# with the options ``jax.jit`` uses for one device (public ``jax.extend``).
_CHILD = """
import json, sys
import numpy as np
from jax.extend import backend
client = backend.get_backend("cpu")
device = client.local_devices()[0]
options = backend.get_compile_options(1, 1, device_assignment=np.array([[device]]),
                                      env_options_overrides=json.loads(sys.argv[2]),
                                      backend=client)
options.parameter_is_tupled_arguments = False
options.executable_build_options.allow_spmd_sharding_propagation_to_parameters = [False]
options.executable_build_options.allow_spmd_sharding_propagation_to_output = [False]
with open(sys.argv[1]) as f:
  client.compile_and_load(f.read(), [device], options)
"""
_DUMPS = ("cpu_after_optimizations.txt", "cpu_after_optimizations-buffer-assignment.txt",
          "cpu_after_optimizations-live-range.txt")
_DUMPED = "cpu_after_optimizations-memory-usage-report.txt"  # written after the live ranges


_LARGE = 256 * 1024  # characters of StableHLO text


def _assignment_in_child(lowered: jax.stages.Lowered, options: Mapping[str, Any],
                         min_size: int | None = None) -> tuple[str, str, str] | None:
  """``(optimized HLO, buffer assignment, live ranges)`` of ``lowered`` on XLA:CPU, or ``None``.

  A child process compiles the module with ``xla_dump_to`` and is killed as
  soon as the dumps of the buffer assignment are written, before XLA:CPU
  generates code.  ``None`` when the child cannot run or fails, or the
  module's text is shorter than ``min_size``.
  """
  import json
  import subprocess
  import sys
  import time

  try:
    module = lowered.as_text(debug_info=True)
  except Exception:  # noqa: BLE001 - a lowering this path cannot serialize: compile here
    return None
  if min_size is not None and len(module) < min_size:
    return None
  head = re.search(r"^module @\S+ attributes \{([^}]*)\}", module, re.M)
  sizes = re.findall(r"mhlo\.num_(?:partitions|replicas) = (\d+)", head.group(1) if head else "")
  if len(sizes) != 2 or sizes != ["1", "1"]:
    return None  # a program over several devices: compiled by jax itself
  with tempfile.TemporaryDirectory(prefix="olr-plan-") as tmp:
    path = os.path.join(tmp, "module.mlir")
    with open(path, "w") as f:
      f.write(module)
    dump = os.path.join(tmp, "dump")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
      child = subprocess.Popen(
          [sys.executable, "-c", _CHILD, path, json.dumps({**options, "xla_dump_to": dump})],
          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
      return None
    try:
      delay = 0.005
      while True:
        if os.path.isdir(dump) and any(n.endswith(_DUMPED) for n in os.listdir(dump)):
          break
        if child.poll() is not None:
          return None
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
    finally:
      child.kill()
      child.wait()
    try:
      return tuple(_read_dump(dump, suffix) for suffix in _DUMPS)
    except RuntimeError:
      return None


def _memory_from_assignment(assignment: str) -> StepMemory:
  """:class:`StepMemory` from a ``*-buffer-assignment.txt`` dump (as ``memory_analysis``)."""
  arguments = outputs = temporaries = aliased = 0
  for line in assignment.splitlines():
    m = _ALLOC.match(line)
    if not m:
      continue
    size, flags = int(m.group(1)), m.group(2)
    parameter = re.match(r"parameter \d+", flags) is not None
    live_out = "maybe-live-out" in flags
    arguments += size if parameter else 0
    outputs += size if live_out else 0
    aliased += size if parameter and live_out else 0
    temporaries += size if "preallocated-temp" in flags else 0
  return StepMemory(arguments, outputs, temporaries, aliased,
                    arguments + outputs + temporaries - aliased)


def plan_function(fn: Callable[..., Any], *args: Any, donate_argnums: int | Sequence[int] = (),
                  accelerator: bool | None = None) -> CompiledPlan:
  """:func:`plan_compiled` of ``jax.jit(fn, donate_argnums=..., keep_unused=True).lower(*args)``.

  ``args`` may be ``jax.ShapeDtypeStruct`` trees: nothing is allocated.  Every
  argument counts, used or not (``keep_unused``): a device holds the whole
  state, e.g. a quantized base's merge residual that only the merge reads.
  """
  return plan_compiled(jax.jit(fn, donate_argnums=donate_argnums, keep_unused=True).lower(*args),
                       accelerator)


_GESDD = re.compile(r"%([\w.\-]+) = \S.*? custom-call\(%([\w.\-]+)\).*custom_call_target="
                    r"\"lapack_([sdcz])gesdd\w*\"")


def lapack_workspace_bytes(hlo_text: str) -> int:
  """Bytes of the largest LAPACK ``gesdd`` workspace among the SVD calls of a program.

  XLA:CPU runs ``jnp.linalg.svd`` as a custom call into LAPACK's ``?gesdd``,
  which allocates its ``work`` and ``iwork`` arrays itself, outside XLA's
  buffer assignment (the calls run one after another, so the largest counts).
  ``lwork`` is LAPACK's own answer to a workspace query (``lwork = -1``) for
  the matrix's shape, asked through SciPy's LAPACK (the library jaxlib's
  kernels call); ``iwork`` is ``8·min(m, n)`` int32.  For a 4096×11008 float32
  matrix with the thin factors: ``4·4096² + 7·4096`` floats, 256 MiB.
  """
  shapes = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if m:
      shapes[m.group(1)] = _split_shape(line[m.end():])[0]
  best = 0
  for line in hlo_text.splitlines():
    m = _GESDD.search(line)
    if not m:
      continue
    dims = [int(d) for d in re.findall(r"\[([\d,]*)\]", shapes.get(m.group(2), "[]"))[0]
            .split(",") if d]
    if len(dims) < 2:
      continue
    rows, cols = dims[-2:]
    mode = re.search(r"mode = (\d+)", line)  # LAPACK's JOBZ as a byte: 'S', 'A' or 'N'
    jobz = chr(int(mode.group(1))) if mode else "S"
    best = max(best, _gesdd_workspace(m.group(3), rows, cols, jobz))
  return best


@functools.cache
def _gesdd_workspace(kind: str, m: int, n: int, jobz: str) -> int:
  itemsize = {"s": 4, "d": 8, "c": 8, "z": 16}[kind]
  try:
    from scipy.linalg import lapack
    lwork = getattr(lapack, f"{kind}gesdd_lwork")(m, n, compute_uv=int(jobz != "N"),
                                                  full_matrices=int(jobz == "A"))[0]
  except ImportError:  # LAPACK's documented minimum (real types)
    mn, mx = min(m, n), max(m, n)
    lwork = {"N": 3 * mn + max(mx, 7 * mn), "S": 4 * mn * mn + 7 * mn,
             "A": 4 * mn * mn + 6 * mn + mx}[jobz]
  real = int(lwork.real if isinstance(lwork, complex) else lwork)
  return real * itemsize + 8 * min(m, n) * 4


@dataclasses.dataclass(frozen=True)
class PeakBuffer:
  """One temporary live at the temporaries' peak (see :func:`peak_buffers`).

  Attributes:
    name: the HLO value (instruction and tuple index).
    bytes: its bytes there (on the accelerator figure: a CPU-only buffer is
      0 and an f32 carrier of a bf16 value half).
    shape: its HLO shape, e.g. ``f32[32,4096,11008]``.
    op: its opcode (``fusion``, ``dot``, ``custom-call``...).
    source: the program's ``op_name`` metadata (which jax operation made it),
      or ``""`` for a value a compiler pass inserted.
  """

  name: str
  bytes: int
  shape: str
  op: str
  source: str


def peak_buffers(lowered: jax.stages.Lowered, top: int = 20,
                 accelerator: bool = True) -> list[PeakBuffer]:
  """The largest temporaries live at once at the peak of an XLA:CPU compile, largest first.

  Reads the buffer assignment and live ranges (as :func:`cpu_only_buffers`),
  finds the moment the temporaries cover the most bytes (``accelerator``:
  without the CPU-only buffers) and lists the values live then — what a
  plan's temporaries are made of.  Values sharing an offset (aliases) are
  listed once.  CPU only.
  """
  dumps = _assignment_in_child(lowered, dict(_PLAN_ONLY))
  if dumps is None:
    with tempfile.TemporaryDirectory(prefix="olr-plan-") as tmp:
      compiled = lowered.compile(compiler_options={**_PLAN_ONLY, "xla_dump_to": tmp})
      dumps = (compiled.as_text(), *(_read_dump(tmp, suffix) for suffix in _DUMPS[1:]))
  text, assignment, live_ranges = dumps
  values, share = _values_and_shares(text, assignment, live_ranges)
  if not accelerator:
    share = {}
  kept = [(k, start, end, off, int(size * share.get(k, 1.0)))
          for k, _, size, off, start, end in values if share.get(k, 1.0) > 0]
  import numpy as np

  r = np.asarray([(s0, e0, off, off + n) for _, s0, e0, off, n in kept] or [(0, 0, 0, 0)],
                 dtype=np.int64)
  best_t, best = 0, -1
  for t in np.unique(r[:, 0]):
    live = r[(r[:, 0] <= t) & (r[:, 1] >= t)]
    covered = _union_length(live[:, 2], live[:, 3])
    if covered > best:
      best_t, best = int(t), covered
  info = {}
  for line in text.splitlines():
    m = _INSTR.match(line)
    if m:
      shape, tail = _split_shape(line[m.end():])
      src = re.search(r'op_name="([^"]*)"', tail)
      info[m.group(1)] = (shape, tail.partition("(")[0].strip(), src.group(1) if src else "")
  live, seen = [], set()
  for k, start, end, off, n in sorted(kept, key=lambda v: -v[4]):
    if start <= best_t <= end and (off, n) not in seen:
      seen.add((off, n))
      shape, op, src = info.get(k.split("{", 1)[0], ("", "", ""))
      live.append(PeakBuffer(k, n, shape, op, src))
  return live[:top]


# ----------------------------------------------------------------------------
# The accelerator figure: XLA:CPU's buffer assignment without its bf16 upcasts
# ----------------------------------------------------------------------------


_LOW = ("bf16", "f16")
_RELAYOUT = frozenset({"bitcast", "reshape", "transpose", "copy"})
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(")
_ALLOC = re.compile(r"^allocation \d+: size (\d+), (.*)$")
_VALUE = re.compile(r"value: <\d+ ([\w.\-]+)(\{[\d,]*\})?( \(phi\))? @\d+> "
                    r"\(size=(\d+),offset=(\d+)\)")
_RANGE = re.compile(r"^\s+([\w.\-]+)(\{[\d,]*\}):(\d+)-(\d+)\s*$")


@dataclasses.dataclass
class _Instr:
  name: str
  dtype: str  # element type of an array result ("" for a tuple)
  opcode: str
  operands: list[str]
  calls: str | None
  inserted: bool  # no op_name metadata: made by a compiler pass, not by the program
  number: int | None  # parameter(number)


def _split_shape(rest: str) -> tuple[str, str]:
  """``"f32[4]{0} add(...)"`` -> ``("f32[4]{0}", "add(...)")`` (tuples balanced)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        return rest[: i + 1], rest[i + 1:].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


def _parse_hlo(text: str) -> tuple[dict[str, dict[str, _Instr]], dict[str, str]]:
  """Optimized HLO text -> ``({computation: {name: instr}}, {computation: root})``."""
  comps: dict[str, dict[str, _Instr]] = {}
  roots: dict[str, str] = {}
  current = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and line.rstrip().endswith("{"):
      current = m.group(1)
      comps[current] = {}
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    shape, tail = _split_shape(line[m.end():])
    opcode, _, args = tail.partition("(")
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
      depth += (ch == "(") - (ch == ")")
      if depth == 0:
        end = i
        break
    inner, attrs = args[:end], args[end:]
    calls = re.search(r"calls=%([\w.\-]+)", attrs)
    number = int(inner) if opcode == "parameter" and inner.strip().isdigit() else None
    comps[current][m.group(1)] = _Instr(
        m.group(1), "" if shape.startswith("(") else shape.split("[", 1)[0], opcode.strip(),
        re.findall(r"%([\w.\-]+)", inner), calls.group(1) if calls else None,
        "op_name=" not in attrs, number)
    if line.lstrip().startswith("ROOT"):
      roots[current] = m.group(1)
  return comps, roots


def _through_relayout(node: _Instr | None, body: Mapping[str, _Instr]) -> _Instr | None:
  while node is not None and node.opcode in _RELAYOUT and node.operands:
    node = body.get(node.operands[0])
  return node


def _upcast_share(instr: _Instr, comps, roots) -> float | None:
  """The share of ``instr``'s f32 result that a device with bf16 arithmetic holds.

  ``0.0``: a bare upcast (by the CPU's float normalization, a ``convert``
  without the program's metadata) of a bf16/f16 operand that a bf16 consumer
  reads directly; ``0.5``: a computed value the CPU carries as the f32 upcast
  of its bf16 rounding (the device holds it in bf16); ``None``: not an upcast.
  """
  if instr.dtype != "f32":
    return None
  if instr.opcode == "fusion" and instr.calls in comps:
    body = comps[instr.calls]
    node = _through_relayout(body.get(roots.get(instr.calls, "")), body)
  else:
    body, node = {}, instr
  if node is None or node.opcode != "convert" or not node.inserted or not node.operands:
    return None
  src = body.get(node.operands[0])
  if not body:  # an unfused convert: its operand is an instruction of the caller
    return 0.0
  if src is None or src.dtype not in _LOW:
    return None
  src = _through_relayout(src, body)
  return 0.0 if src is not None and src.opcode == "parameter" else 0.5


def _downcast_only(name: str, users: list[_Instr], comps) -> bool:
  """Every use of ``name`` is the CPU's rounding of it back to bf16/f16."""
  rounds = lambda i: i.opcode == "convert" and i.inserted and i.dtype in _LOW
  if not users:
    return False
  for u in users:
    if rounds(u):
      continue
    if u.opcode != "fusion" or u.calls not in comps:
      return False
    body = comps[u.calls]
    numbers = {k for k, op in enumerate(u.operands) if op == name}
    params = {i.name for i in body.values() if i.opcode == "parameter" and i.number in numbers}
    uses = [i for i in body.values() if params & set(i.operands)]
    if not uses or not all(map(rounds, uses)):
      return False
  return True


def _cpu_only_shares(comps, roots) -> dict[str, float]:
  """Instruction -> the share of its result a bf16-native device would hold (<1)."""
  out: dict[str, float] = {}
  for body in comps.values():
    users: dict[str, list[_Instr]] = {}
    for i in body.values():
      for op in i.operands:
        users.setdefault(op, []).append(i)
    for i in body.values():
      share = _upcast_share(i, comps, roots)
      if share is None and i.dtype == "f32" and i.opcode not in ("parameter", "constant") \
          and _downcast_only(i.name, users.get(i.name, []), comps):
        share = 0.0  # e.g. a dot's f32 result, rounded to bf16 by its only users
      if share is not None:
        out[i.name] = share
  return out


def _read_dump(directory: str, suffix: str) -> str:
  names = sorted(f for f in os.listdir(directory) if f.endswith(suffix))
  if not names:
    raise RuntimeError(f"XLA wrote no '*{suffix}' to {directory}")
  with open(os.path.join(directory, names[-1])) as f:
    return f.read()


def _temp_values(assignment: str) -> list[tuple[str, bool, int, int]]:
  """``(value key, is_phi, size, offset)`` of the preallocated-temp allocations.

  Offsets are made unique across allocations (each gets its own range).
  """
  out, base, size, in_temp = [], 0, 0, False
  for line in assignment.splitlines():
    m = _ALLOC.match(line)
    if m:
      base += size if in_temp else 0
      size, in_temp = int(m.group(1)), "preallocated-temp" in m.group(2)
      continue
    if line.startswith("Total bytes") or line.startswith("Used values"):
      in_temp = False
    if in_temp:
      v = _VALUE.search(line)
      if v:
        out.append((v.group(1) + (v.group(2) or "{}"), bool(v.group(3)), int(v.group(4)),
                    base + int(v.group(5))))
  return out


def _peak_of_union(rects) -> int:
  """Max over time of the bytes covered by ``(start, end, lo, hi)`` rectangles."""
  import numpy as np

  if not rects:
    return 0
  r = np.asarray(rects, dtype=np.int64)
  best = 0
  for t in np.unique(r[:, 0]):
    live = r[(r[:, 0] <= t) & (r[:, 1] >= t)]
    best = max(best, _union_length(live[:, 2], live[:, 3]))
  return best


def _union_length(lo, hi) -> int:
  """Length of the union of the intervals ``[lo, hi)`` (NumPy arrays, one or more)."""
  import numpy as np

  order = np.argsort(lo)
  lo, hi = lo[order], np.maximum.accumulate(hi[order])
  # covered length: the span less the gaps where lo exceeds the running max
  prev = np.concatenate([[lo[0]], hi[:-1]])
  return int(hi[-1] - lo[0] - np.maximum(lo - prev, 0).sum())


@dataclasses.dataclass(frozen=True)
class CpuOnlyBuffers:
  """What XLA:CPU's buffer assignment holds only because the CPU upcasts bf16.

  Attributes:
    temporaries: the temporaries' peak along the live ranges as assigned
      (bytes covered at once, XLA's packing gaps excluded).
    without: the same peak with every CPU-only buffer removed (a bare upcast
      of a bf16/f16 operand, or a dot's f32 result rounded back by its only
      users) and every f32 carrier of a bf16-rounded value at half its size.
    buffers: how many temporaries were changed.
  """

  temporaries: int
  without: int
  buffers: int

  @property
  def saved(self) -> int:
    """Bytes of the temporaries' peak a bf16-native device does not hold."""
    return self.temporaries - self.without


def cpu_only_buffers(hlo_text: str, assignment: str, live_ranges: str) -> CpuOnlyBuffers:
  """Read XLA:CPU's dumps and recompute the temporaries' peak without its upcasts.

  Args:
    hlo_text: the optimized HLO (``compiled.as_text()``).
    assignment: the ``*-buffer-assignment.txt`` dump of the same compile.
    live_ranges: the ``*-live-range.txt`` dump of the same compile.

  Values that alias a CPU-only buffer (loop-carried copies at the same offset
  and size whose live range touches it) are CPU-only too.
  """
  values, share = _values_and_shares(hlo_text, assignment, live_ranges)
  full = [(start, end, off, off + size) for _, _, size, off, start, end in values]
  kept = [(start, end, off, off + int(size * share.get(k, 1.0)))
          for k, _, size, off, start, end in values if share.get(k, 1.0) > 0]
  return CpuOnlyBuffers(_peak_of_union(full), _peak_of_union(kept), len(share))


def _values_and_shares(hlo_text: str, assignment: str, live_ranges: str):
  """The temporaries ``(key, is_phi, size, offset, start, end)`` and their CPU-only shares."""
  comps, roots = _parse_hlo(hlo_text)
  shares = _cpu_only_shares(comps, roots)
  ranges = {}
  for line in live_ranges.splitlines():
    m = _RANGE.match(line)
    if m:
      ranges[m.group(1) + m.group(2)] = (int(m.group(3)), int(m.group(4)))
  values = [(k, phi, size, off, *ranges[k]) for k, phi, size, off in _temp_values(assignment)
            if k in ranges]
  share = {}
  for k, *_ in values:
    name, index = k.split("{", 1)
    if index == "}" and name in shares:
      share[k] = shares[name]
  changed = True
  while changed:  # loop-carried aliases of CPU-only buffers
    changed = False
    spans = {(off, size): [] for _, _, size, off, _, _ in values}
    for k, _, size, off, start, end in values:
      if k in share:
        spans[(off, size)].append((start, end, share[k]))
    for k, phi, size, off, start, end in values:
      if k in share or not phi:
        continue
      for s0, e0, sh in spans[(off, size)]:
        if start <= e0 + 1 and s0 <= end + 1:
          share[k] = sh
          changed = True
          break
  return values, share
