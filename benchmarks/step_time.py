"""Optimizer step time and state size: optax_lowrank next to its peers, in one process.

Usage::

    python -m benchmarks.step_time --shapes small            # seconds
    python -m benchmarks.step_time --shapes llama --repeats 5 # minutes

One jitted ``update`` per candidate is built once and called in cycles of
``--refresh-every`` calls; the first call of every cycle is a refresh step (a new
basis), the others are ordinary steps, and they are reported separately.
Candidates are interleaved cycle by cycle; the first cycle is warm-up.  The
optimizer state is donated to the jitted update, as in a training loop.

Rows: ``optax.adam``; ``optax.contrib.galore`` (whose rule puts the projector on
the *larger* dimension); ``olr.galore`` with the exact SVD (its ``"auto"`` side,
the projector on the smaller dimension, as galore-torch) and with
``contrib``'s sides, for a comparison at equal sides; ``olr.galore``'s Adam with
``olr.randomized_svd``; ``olr.flora``; ``natural_galore`` and ``adamem`` when the
package has them; galore-torch's ``GaLoreAdamW`` on the CPU (its ``step()`` also
writes the parameters, so ``olr.galore`` is also timed with
``optax.apply_updates`` for that comparison); and the physical floor of a
projected step: the two projection GEMMs ``G·Q`` and ``C·Qᵀ`` per leaf, jitted.

Sides: ``L`` = left (``C = P G``, ``P ∈ R^{r×m}``), ``R`` = right (``C = G Q``,
``Q ∈ R^{n×r}``), listed for the square, wide and tall leaf shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common

SHAPES: dict[str, tuple[list[tuple[str, tuple[int, int]]], int]] = {
    # One Llama block (hidden 1024, MLP 2816): wq wk wv wo, w_gate w_up, w_down.
    "llama": (
        [("wq", (1024, 1024)), ("wk", (1024, 1024)), ("wv", (1024, 1024)),
         ("wo", (1024, 1024)), ("w_gate", (1024, 2816)), ("w_up", (1024, 2816)),
         ("w_down", (2816, 1024))],
        128,
    ),
    # The same block scaled down by 8 (hidden 128, MLP 352), rank 16.
    "small": (
        [("wq", (128, 128)), ("wk", (128, 128)), ("wv", (128, 128)), ("wo", (128, 128)),
         ("w_gate", (128, 352)), ("w_up", (128, 352)), ("w_down", (352, 128))],
        16,
    ),
}

LR = 1e-3
SCALE = 0.25
REFERENCE = "olr.galore (svd)"


@dataclasses.dataclass
class Candidate:
  name: str
  step: Callable[[], Any]
  state_bytes: Callable[[], int | None]
  sides: str
  has_refresh: bool = True
  note: str = ""


def _side_of(shape: tuple[int, int], rule: str) -> str:
  m, n = shape
  if rule == "auto":  # olr / galore-torch: projector on the smaller dimension
    return "R" if m >= n else "L"
  if rule == "contrib":  # optax.contrib.galore: projector on the larger dimension
    return "L" if m >= n else "R"
  return "—"


def _sides(shapes: list[tuple[int, int]], rule: str) -> str:
  seen: dict[tuple[int, int], str] = {}
  for s in shapes:
    seen.setdefault(s, _side_of(s, rule))
  return " ".join(seen.values())


def _lookup(olr: Any, name: str) -> tuple[Callable[..., Any] | None, str]:
  """``olr.<name>``, or the function of that name in the submodule ``olr.<name>``."""
  obj = getattr(olr, name, None)
  if isinstance(obj, types.ModuleType):
    return getattr(obj, name, None), f"from optax_lowrank.{name} (not exported)"
  return obj, ""


def jax_candidates(leaves, rank: int, refresh_every: int, grads_np) -> list[Candidate]:
  import jax
  import jax.numpy as jnp
  import optax

  import optax_lowrank as olr

  names = [n for n, _ in leaves]
  shapes = [s for _, s in leaves]
  params = {n: jnp.asarray(0.02 * np.random.default_rng(1).standard_normal(s), jnp.float32)
            for n, s in leaves}
  grads = {n: jnp.asarray(g) for n, g in zip(names, grads_np)}
  T = refresh_every

  def make(tx, with_apply: bool = False):
    state0 = tx.init(params)
    holder = {"state": state0, "params": params}
    if with_apply:
      def full(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

      fn = jax.jit(full, donate_argnums=(0, 1))
      holder["params"] = jax.tree.map(jnp.copy, params)

      def step():
        p, s = fn(holder["params"], holder["state"], grads)
        holder["params"], holder["state"] = p, s
        jax.block_until_ready((p, s))
    else:
      fn = jax.jit(tx.update, donate_argnums=(1,))

      def step():
        u, s = fn(grads, holder["state"], params)
        holder["state"] = s
        jax.block_until_ready((u, s))

    return step, lambda: common.tree_bytes(holder["state"])

  out = []
  adam = make(optax.adam(LR))
  out.append(Candidate("optax.adam", *adam, sides="full", has_refresh=False))
  contrib = make(optax.contrib.galore(LR, rank=rank, update_proj_gap=T, scale=SCALE))
  out.append(Candidate("optax.contrib.galore", *contrib, sides=_sides(shapes, "contrib")))
  ref = make(olr.galore(LR, rank=rank, refresh_every=T, scale=SCALE))
  out.append(Candidate(REFERENCE, *ref, sides=_sides(shapes, "auto")))

  labels = {n: ("left" if _side_of(s, "contrib") == "L" else "right") for n, s in leaves}

  def one_side(side):  # olr.galore's chain (−η in the small space) at a fixed side
    inner = optax.chain(optax.scale_by_adam(eps=1e-6), optax.scale_by_learning_rate(LR))
    return olr.low_rank(inner, olr.svd(rank, side), T, scale=SCALE)

  matched = optax.partition({"left": one_side("left"), "right": one_side("right")}, labels)
  out.append(Candidate("olr.galore (svd, contrib's sides)", *make(matched),
                       sides=_sides(shapes, "contrib"),
                       note="optax.partition of two olr.low_rank, one per side"))
  rsvd = olr.adam_in_subspace(LR, olr.randomized_svd(rank), refresh_every=T, scale=SCALE)
  spec = olr.randomized_svd(rank)
  out.append(Candidate("olr.galore (randomized_svd)", *make(rsvd), sides=_sides(shapes, "auto"),
                       note=f"oversample={spec.oversample}, power_iters={spec.power_iters}"))
  flora = olr.flora(LR, rank=rank, refresh_every=T, scale=SCALE)
  out.append(Candidate("olr.flora", *make(flora), sides=_sides(shapes, "auto")))
  for name in ("natural_galore", "adamem"):
    fn, note = _lookup(olr, name)
    if fn is None:
      print(f"note: olr.{name} is not in the package; row skipped")
      continue
    out.append(Candidate(f"olr.{name}", *make(fn(LR, rank=rank, refresh_every=T)),
                         sides=_sides(shapes, "auto"), note=note))
    if name == "natural_galore":
      refined = fn(LR, rank=rank, refresh_every=T, refine=True)
      out.append(Candidate("olr.natural_galore (refine=True)", *make(refined),
                           sides=_sides(shapes, "auto"),
                           note="with the refinement step of woodbury_solve"))
  ref_apply = make(olr.galore(LR, rank=rank, refresh_every=T, scale=SCALE), with_apply=True)
  out.append(Candidate("olr.galore (svd) + apply_updates", *ref_apply,
                       sides=_sides(shapes, "auto"), note="params donated and written, as torch"))

  # The floor: the two projection GEMMs per leaf, at olr's and at contrib's sides.
  rng = np.random.default_rng(2)
  for rule, label in (("auto", "olr's sides"), ("contrib", "contrib's sides")):
    factors, coeffs = {}, {}
    for n, (m, k) in leaves:
      left = _side_of((m, k), rule) == "L"
      r = min(rank, m, k)
      q, _ = np.linalg.qr(rng.standard_normal((m if left else k, r)))
      factors[n] = jnp.asarray(q, jnp.float32)
      cshape = (r, k) if left else (m, r)
      coeffs[n] = jnp.asarray(rng.standard_normal(cshape), jnp.float32)
    lefts = {n: _side_of(s, rule) == "L" for n, s in leaves}

    def gemms(g, f, c, lefts=lefts):
      proj = {n: (f[n].T @ g[n]) if lefts[n] else (g[n] @ f[n]) for n in g}
      back = {n: (f[n] @ c[n]) if lefts[n] else (c[n] @ f[n].T) for n in g}
      return proj, back

    fn = jax.jit(gemms)

    def step(fn=fn, factors=factors, coeffs=coeffs):
      jax.block_until_ready(fn(grads, factors, coeffs))

    out.append(Candidate(f"two projection GEMMs only ({label})", step, lambda: None,
                         sides=_sides(shapes, rule), has_refresh=False))
  return out


def torch_candidate(leaves, rank: int, refresh_every: int, grads_np) -> Candidate | str:
  torch, galore_torch = common.import_galore_torch()
  if torch is None:
    return galore_torch
  rng = np.random.default_rng(1)
  params = []
  for (_, s), g in zip(leaves, grads_np):
    p = torch.nn.Parameter(torch.from_numpy((0.02 * rng.standard_normal(s)).astype(np.float32)))
    p.grad = torch.from_numpy(g.copy())
    params.append(p)
  opt = galore_torch.GaLoreAdamW(
      [{"params": params, "rank": rank, "update_proj_gap": refresh_every, "scale": SCALE,
        "proj_type": "std"}],
      lr=LR, weight_decay=0.0,
  )

  def state_bytes() -> int:
    total = 0
    for st in opt.state.values():
      for v in st.values():
        if torch.is_tensor(v):
          total += v.numel() * v.element_size()
      proj = st.get("projector")
      if proj is not None and proj.ortho_matrix is not None:
        total += proj.ortho_matrix.numel() * proj.ortho_matrix.element_size()
    return total

  return Candidate(f"galore-torch GaLoreAdamW (torch {torch.__version__})", opt.step,
                   state_bytes, sides=_sides([s for _, s in leaves], "auto"),
                   note="step() also updates the params in place")


def add_step_time_arguments(parser: argparse.ArgumentParser, threads_help: str) -> None:
  """The options every step-time benchmark takes: shapes, repeats, refresh, rank, threads."""
  parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
  parser.add_argument("--repeats", type=int, default=None,
                      help="measured cycles per candidate (default: 5 llama, 20 small)")
  parser.add_argument("--refresh-every", type=int, default=8)
  parser.add_argument("--rank", type=int, default=None)
  parser.add_argument("--threads", type=int, default=1, help=threads_help)
  parser.add_argument("--no-pin", action="store_true", help="do not pin the process to CPUs")
  parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                      help="which time the table reports (default: cpu for 1 thread, else wall)")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_step_time_arguments(parser, "threads for XLA, BLAS/LAPACK and torch (default 1)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--only", default=None,
                      help="comma-separated substrings: keep only rows whose name contains one "
                           f"(the reference row '{REFERENCE}' is always kept)")
  args = parser.parse_args(argv)
  common.configure_threads(args.threads, pin=not args.no_pin)
  clock = args.clock or common.default_clock(args.threads)
  other = "wall" if clock == "cpu" else "cpu"

  leaves, rank = SHAPES[args.shapes]
  rank = args.rank or rank
  repeats = args.repeats or (5 if args.shapes == "llama" else 20)
  rng = np.random.default_rng(0)
  grads_np = [rng.standard_normal(s).astype(np.float32) for _, s in leaves]

  cands = jax_candidates(leaves, rank, args.refresh_every, grads_np)
  if not args.no_torch:
    tc = torch_candidate(leaves, rank, args.refresh_every, grads_np)
    if isinstance(tc, str):
      print(f"note: galore-torch row skipped: {tc}")
    else:
      cands.append(tc)

  if args.only:
    keep = [k.strip() for k in args.only.split(",") if k.strip()]
    cands = [c for c in cands if c.name == REFERENCE or any(k in c.name for k in keep)]
  timings = common.interleaved(
      {c.name: c.step for c in cands}, args.refresh_every, repeats,
      has_refresh={c.name: c.has_refresh for c in cands},
  )
  ref_med = common.Timing.stats(timings[REFERENCE][clock].ordinary)[0]
  faults = {c.name: common.minor_faults_per_call(c.step, args.refresh_every) for c in cands}
  rows = []
  for c in cands:
    t, t2 = timings[c.name][clock], timings[c.name][other]
    o, r = common.Timing.stats(t.ordinary), common.Timing.stats(t.refresh)
    o2, r2 = common.Timing.stats(t2.ordinary), common.Timing.stats(t2.refresh)
    rows.append([
        c.name, c.sides,
        common.fmt_ms(o[0]), common.fmt_ms(o[1]), common.fmt_ms(o2[0]),
        common.fmt_ms(r[0] if r else None, 1), common.fmt_ms(r[1] if r else None, 1),
        common.fmt_ms(r2[0] if r2 else None, 1),
        common.fmt_bytes(c.state_bytes()),
        f"{faults[c.name]:,.0f}",
        f"{o[0] / ref_med:.2f}",
    ])
  shape_desc = ", ".join(f"{n} {m}×{k}" for n, (m, k) in leaves)
  print()
  print(f"## step time, shapes={args.shapes} (rank {rank}, refresh every {args.refresh_every}, "
        f"{repeats} measured cycles: {repeats * (args.refresh_every - 1)} ordinary and "
        f"{repeats} refresh calls per row; {clock} time, {other} time for comparison)")
  print()
  print(f"leaves: {shape_desc}; float32; sides listed for the distinct shapes in that order")
  print()
  print(common.markdown_table(
      ["optimizer", "sides", f"ordinary ms median ({clock})", f"ordinary ms max ({clock})",
       f"ordinary ms median ({other})", f"refresh ms median ({clock})",
       f"refresh ms max ({clock})", f"refresh ms median ({other})", "state bytes",
       "page faults / call", f"ordinary / {REFERENCE}"],
      rows,
  ))
  notes = [f"- {c.name}: {c.note}" for c in cands if c.note]
  if notes:
    print()
    print("\n".join(notes))

  def med(name, kind="ordinary"):
    xs = getattr(timings[name][clock], kind) if name in timings else []
    return common.Timing.stats(xs)[0] if xs else float("nan")

  matched = "olr.galore (svd, contrib's sides)"
  ratios = [
      ("olr.galore (svd) ordinary / its two GEMMs (olr's sides)",
       med(REFERENCE), med("two projection GEMMs only (olr's sides)")),
      ("olr.galore (svd, contrib's sides) ordinary / optax.contrib.galore ordinary",
       med(matched), med("optax.contrib.galore")),
      ("olr.galore (svd) ordinary / optax.contrib.galore ordinary",
       med(REFERENCE), med("optax.contrib.galore")),
      ("optax.contrib.galore ordinary / its two GEMMs (contrib's sides)",
       med("optax.contrib.galore"), med("two projection GEMMs only (contrib's sides)")),
      ("optax.contrib.galore refresh / olr.galore (randomized_svd) refresh",
       med("optax.contrib.galore", "refresh"), med("olr.galore (randomized_svd)", "refresh")),
  ]
  torch_rows = [c.name for c in cands if c.name.startswith("galore-torch")]
  if torch_rows:
    ratios += [
        ("olr.galore (svd) + apply_updates ordinary / galore-torch ordinary",
         med("olr.galore (svd) + apply_updates"), med(torch_rows[0])),
        ("olr.galore (svd) ordinary / galore-torch ordinary", med(REFERENCE), med(torch_rows[0])),
    ]
  for name in ("olr.natural_galore", "olr.natural_galore (refine=True)", "olr.adamem",
               "olr.flora"):
    if name in timings:
      ratios.append((f"{name} ordinary / olr.galore (svd) ordinary", med(name), med(REFERENCE)))
  print()
  print(f"ratios (of {clock}-time medians):")
  for label, a, b in ratios:
    if a == a and b == b:  # both rows measured (not NaN)
      print(f"- {label}: {a / b:.2f}")
  print()
  common.print_machine()


if __name__ == "__main__":
  main()
