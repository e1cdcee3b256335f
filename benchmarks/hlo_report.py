"""Full-size (m×n) buffers in the compiled optimizer step, read from the optimized HLO.

Usage::

    python -m benchmarks.hlo_report                      # olr.galore at the three Llama shapes
    python -m benchmarks.hlo_report --optimizer contrib --shape 1024x2816
    python -m benchmarks.hlo_report --dump /tmp/step.hlo  # also write the HLO text

For one leaf ``W ∈ R^{m×n}`` the script compiles
``jax.jit(tx.update, donate_argnums=1).lower(g, state, params).compile()`` and lists every
instruction of a *non-fused* computation (the entry computation and the branches of
the refresh ``conditional``) whose result has ``m·n`` elements: those are the
full-size buffers the step materializes.  Instructions inside fusions are not
buffers and are not listed, except that a ``transpose`` or ``copy`` of full size
inside a fusion is reported too (it means a strided pass over ``m·n`` values).
The update itself is one ``m×n`` output and the gradient one ``m×n`` input; any
other full-size result is a candidate for removal.

Optimizers: ``galore`` (``olr.galore``, exact SVD), ``randomized``
(``olr.galore``'s Adam with ``olr.randomized_svd``), ``contrib``
(``optax.contrib.galore``), ``lean`` (an experiment: ``olr.low_rank`` with
``α`` and ``−η`` folded into the inner transformation, so that the
back-projection GEMM writes the final update).
"""

from __future__ import annotations

import argparse
import math
import re
from collections import Counter

from benchmarks import common

_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w-]+)\(")
_COMP = re.compile(r"^(ENTRY\s+)?%(\S+)\s*\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


def make_tx(name: str, rank: int, refresh_every: int):
  import optax

  import optax_lowrank as olr

  if name == "galore":
    return olr.galore(1e-3, rank=rank, refresh_every=refresh_every)
  if name == "randomized":
    return olr.adam_in_subspace(1e-3, olr.randomized_svd(rank), refresh_every=refresh_every)
  if name == "contrib":
    return optax.contrib.galore(1e-3, rank=rank, update_proj_gap=refresh_every, scale=0.25)
  if name == "lean":
    inner = optax.chain(optax.scale_by_adam(eps=1e-6), optax.scale(-1e-3 * 0.25))
    return olr.low_rank(inner, olr.svd(rank), refresh_every, scale=1.0)
  raise ValueError(f"unknown optimizer {name!r}")


def parse(hlo: str) -> tuple[dict[str, list], dict[str, str], set[str], set[str]]:
  """Parse an HLO module text.

  Returns ``(instructions, caller, fused, branches)``: the array-valued
  instructions ``(name, opcode, shape, line)`` of every computation, the
  computation that calls each called computation, the names of fusion bodies and
  those of ``conditional`` branches.
  """
  comps: dict[str, list] = {}
  caller: dict[str, str] = {}
  fused: set[str] = set()
  branches: set[str] = set()
  current = None
  for line in hlo.splitlines():
    c = _COMP.match(line)
    if c and line.rstrip().endswith("{"):
      current = ("ENTRY:" if c.group(1) else "") + c.group(2)
      comps[current] = []
      continue
    if current is None:
      continue
    for callee in _CALLS.findall(line):
      caller[callee] = current
      if " fusion(" in line:
        fused.add(callee)
    b = _BRANCHES.search(line)
    if b:
      for x in b.group(1).split(","):
        name = x.strip().lstrip("%")
        branches.add(name)
        caller[name] = current
    m = _INSTR.match(line)
    if m:
      dims = tuple(int(d) for d in m.group(4).split(",") if d)
      comps[current].append((m.group(2), m.group(5), dims, line.strip()))
    elif " custom-call(" in line and "=" in line:
      # Tuple-valued library calls (e.g. LAPACK's SVD): one entry per array result.
      name = line.split("=", 1)[0].strip().removeprefix("ROOT").strip().lstrip("%")
      result_type = line.split("=", 1)[1].split(" custom-call(", 1)[0]
      for i, d in enumerate(_ARRAY.findall(result_type)):
        dims = tuple(int(x) for x in d.split(",") if x)
        comps[current].append((f"{name}[{i}]", "custom-call", dims, line.strip()))
  return comps, caller, fused, branches


def _kind(comp: str, caller: dict[str, str], fused: set[str], branches: set[str]) -> str:
  """Where a computation runs: ``entry``, ``refresh branch`` or ``other``, ``/fused`` inside."""
  if comp.startswith("ENTRY:"):
    return "entry"
  if comp in branches:
    return "branch"
  if comp in fused and comp in caller:
    return _kind(caller[comp], caller, fused, branches) + "/fused"
  return "other"


def report(hlo: str, size: int) -> tuple[list[str], Counter]:
  """Lines describing the full-size results, and a count per (where, opcode)."""
  comps, caller, fused, branches = parse(hlo)
  lines, counts = [], Counter()
  for comp, instrs in comps.items():
    in_fusion = comp in fused
    kind = _kind(comp, caller, fused, branches)
    for name, op, dims, line in instrs:
      if not dims or math.prod(dims) != size:
        continue
      if in_fusion and op not in ("transpose", "copy"):
        continue
      if op in ("get-tuple-element", "tuple", "bitcast"):
        continue  # views, not new buffers
      detail = ""
      if op == "fusion":
        k = re.search(r"kind=(\w+)", line)
        called = _CALLS.search(line)
        detail = f" kind={k.group(1) if k else '?'} calls={called.group(1) if called else '?'}"
        if "__ynn_fusion" in line:
          detail += " (YNNPACK dot)"
      if op == "custom-call":
        t = re.search(r'custom_call_target="([^"]+)"', line)
        detail = f" target={t.group(1) if t else '?'}"
      meta = re.search(r'op_name="([^"]+)"', line)
      if meta:
        detail += f"  <- {meta.group(1)}"
      lines.append(f"  [{kind}] {comp.replace('ENTRY:', '')}: %{name} = {op} "
                   f"f32[{','.join(map(str, dims))}]{detail}")
      counts[(kind, op)] += 1
  return lines, counts


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--optimizer", choices=["galore", "randomized", "contrib", "lean"],
                      default="galore")
  parser.add_argument("--shape", action="append", default=None,
                      help="MxN, repeatable (default: 1024x1024, 1024x2816, 2816x1024)")
  parser.add_argument("--rank", type=int, default=128)
  parser.add_argument("--no-donate", action="store_true", help="do not donate the state")
  parser.add_argument("--dump", default=None, help="write the HLO text here ({shape} expands)")
  parser.add_argument("--threads", type=int, default=1)
  args = parser.parse_args(argv)
  common.configure_threads(args.threads)

  import jax
  import jax.numpy as jnp

  shapes = args.shape or ["1024x1024", "1024x2816", "2816x1024"]
  for spec in shapes:
    m, n = (int(x) for x in spec.lower().split("x"))
    tx = make_tx(args.optimizer, args.rank, refresh_every=200)
    params = {"w": jnp.zeros((m, n), jnp.float32)}
    grads = {"w": jnp.ones((m, n), jnp.float32)}
    state = tx.init(params)
    donate = () if args.no_donate else (1,)
    compiled = jax.jit(tx.update, donate_argnums=donate).lower(grads, state, params).compile()
    hlo = compiled.as_text()
    if args.dump:
      with open(args.dump.format(shape=spec), "w") as f:
        f.write(hlo)
    lines, counts = report(hlo, m * n)
    print(f"{args.optimizer} at {m}×{n}, rank {args.rank}"
          f"{'' if args.no_donate else ', state donated'}: {sum(counts.values())} full-size "
          "results")
    for line in lines:
      print(line)
    summary = ", ".join(f"{k[0]}/{k[1]}: {v}" for k, v in sorted(counts.items()))
    print(f"  by computation/opcode: {summary}")
    mem = compiled.memory_analysis()
    if mem is not None:
      full = m * n * 4
      print(f"  memory analysis: arguments {mem.argument_size_in_bytes:,} B, outputs "
            f"{mem.output_size_in_bytes:,} B, temporaries {mem.temp_size_in_bytes:,} B "
            f"({mem.temp_size_in_bytes / full:.2f} × m·n·4), aliased "
            f"{mem.alias_size_in_bytes:,} B")
    print()


if __name__ == "__main__":
  main()
