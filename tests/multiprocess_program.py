"""The program tests/test_multiprocess.py runs, as 2 processes × 2 devices and as 1 × 4.

``python tests/multiprocess_program.py PHASE OUTDIR``, started by
``olr.distributed.launch_local``.  Every process computes the same things and
writes what it sees, gathered to whole arrays (``process_allgather``), to
``OUTDIR/PHASE_p<i>.npz``, and facts about the layout to
``OUTDIR/PHASE_p<i>.json``.  The test compares the files of the runs.

Phase ``train``:
  * DiLoCo on a 4-worker mesh for each worker scheme, batches assembled from
    process-local rows (``jax.make_array_from_process_local_data``);
  * DiLoCo with one worker per process (the layout the docs recommend for
    hosts), "disjoint" bases, weights sharded over the devices of each
    worker, and the collectives of its compiled round;
  * ``olr.low_rank`` on weights sharded over all 4 devices (FSDP), with a
    random and an SVD basis; the optimizer states are saved with Orbax after
    4 steps (and the DiLoCo state after 1 round), then training goes on.
Phase ``restore`` (fresh processes): restore those checkpoints into freshly
built sharded targets and take the same further steps.

float64 throughout: the 2-process and 1-process runs differ only by the order
of floating-point sums (gloo versus in-process collectives), so any real
mistake (a wrong shard, key or worker index) is orders of magnitude above
round-off.
"""

import json
import os
import re
import sys

import optax_lowrank as olr

olr.distributed.initialize_local(timeout=60)  # before anything touches a device

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from optax_lowrank import distributed as dist  # noqa: E402

jax.config.update("jax_enable_x64", True)

PHASE, OUT = sys.argv[1], sys.argv[2]
PID, NPROC = jax.process_index(), jax.process_count()
assert jax.device_count() == 4, jax.devices()
RANK, L, ROUNDS, LR = 3, 2, 2, 0.05
COLLECTIVE = re.compile(
    r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|"
    r"collective-broadcast|send|recv)(?:-start)?\("
)
arrays, facts = {}, {"process_index": PID, "process_count": NPROC,
                     "local_positions": [jax.devices().index(d) for d in jax.local_devices()]}


def record(prefix, tree):
  """Every leaf of ``tree``, gathered to one NumPy array on every process."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    arrays[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def loss_fn(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w1"])
  return jnp.mean((h @ params["w2"] + params["b"] - y) ** 2)


def make_params():
  rng = np.random.default_rng(0)
  return {"w1": 0.3 * rng.normal(size=(16, 12)), "w2": 0.3 * rng.normal(size=(12, 16)),
          "b": np.zeros(16)}


BATCH = 8
_rng = np.random.default_rng(1)
_x = _rng.normal(size=(ROUNDS, L, BATCH, 16))
ROUND_DATA = [(_x[g], np.sin(_x[g] @ _rng.normal(size=(16, 16)) / 4)) for g in range(ROUNDS)]


def global_batches(mesh, g):
  """Round ``g``'s batches as global arrays built from this process's rows only.

  The worker axis runs over ``jax.devices()`` in order, so process ``i``'s
  workers hold rows ``[i·B/N, (i+1)·B/N)``.
  """
  rows = NamedSharding(mesh, P(None, "workers"))
  lo, hi = PID * BATCH // NPROC, (PID + 1) * BATCH // NPROC
  return tuple(jax.make_array_from_process_local_data(rows, a[:, lo:hi], a.shape)
               for a in ROUND_DATA[g])


def replicated(mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def collectives(hlo):
  """``[(op, [shapes])]`` of every collective in an HLO module's text."""
  return [(m.group(2), re.findall(r"[a-z]+\d*\[[\d,]*\]", m.group(1)))
          for m in COLLECTIVE.finditer(hlo)]


def checkpointer():
  return ocp.StandardCheckpointer()


# ----------------------------------------------------------------------------
# DiLoCo, every scheme, 4 workers over the 2 processes.

POLICY = {"identical": "keep", "independent": "reset", "disjoint": "transport"}
devices = np.array(jax.devices())
outer = optax.sgd(0.7, momentum=0.9, nesterov=True)

if PHASE == "train":
  mesh = Mesh(devices, ("workers",))
  for scheme in dist.SCHEMES:
    d = dist.make_diloco(loss_fn, optax.adam(LR), mesh, local_steps=L,
                         projection=olr.semi_orthogonal(RANK), scheme=scheme, outer=outer,
                         on_refresh=POLICY[scheme])
    state = d.init(replicated(mesh, make_params()))
    for g in range(ROUNDS):
      state, metrics = d.round(state, global_batches(mesh, g))
    record(f"diloco/{scheme}/params", state.params)
    record(f"diloco/{scheme}/bases", state.inner_states.bases)
    record(f"diloco/{scheme}/loss", metrics.worker_loss)
  facts["inner_state_addressable"] = state.inner_states.inner_state[0].mu["w1"].is_fully_addressable

# ----------------------------------------------------------------------------
# One worker per process, its weights sharded over the process's 2 devices.

host_mesh = Mesh(devices.reshape(2, 2), ("workers", "fsdp"))
d = dist.make_diloco(loss_fn, optax.adam(LR), host_mesh, local_steps=L,
                     projection=olr.semi_orthogonal(RANK), scheme="disjoint", outer=outer)
w1_rows = NamedSharding(host_mesh, P("fsdp", None))


def host_params():
  p = replicated(host_mesh, make_params())
  return dict(p, w1=jax.device_put(p["w1"], w1_rows))


if PHASE == "train":
  state = d.init(host_params())
  batches = global_batches(host_mesh, 0)
  compiled = d.round.lower(state, batches).compile()
  facts["host_round_collectives"] = collectives(compiled.as_text())
  state, _ = compiled(state, batches)  # the program inspected is the one that ran
  record("hosts/saved", state)
  ckpt = checkpointer()
  ckpt.save(os.path.join(OUT, "ckpt_hosts"), state)
  ckpt.wait_until_finished()
  facts["w1_spec"] = [str(a) for a in state.params["w1"].sharding.spec]
else:
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, d.init(host_params()))
  state = checkpointer().restore(os.path.join(OUT, "ckpt_hosts"), target)
  record("hosts/restored", state)
  facts["restored_w1_spec"] = [str(a) for a in state.params["w1"].sharding.spec]
state, _ = d.round(state, global_batches(host_mesh, 1))
record("hosts/final", state)

# ----------------------------------------------------------------------------
# FSDP: low_rank on weights sharded over the 4 devices of both processes.

fsdp = Mesh(devices, ("fsdp",))
rng = np.random.default_rng(2)
big = {"w1": rng.normal(size=(64, 16)) * 0.2, "w2": rng.normal(size=(16, 64)) * 0.2,
       "b": np.zeros(64)}
specs = {"w1": P("fsdp", None), "w2": P(None, "fsdp"), "b": P()}
shardings = {k: NamedSharding(fsdp, s) for k, s in specs.items()}
x = jax.device_put(np.random.default_rng(4).normal(size=(8, 64)), NamedSharding(fsdp, P()))


def big_loss(p, x):
  return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]) ** 2)


for name, spec in {"semi_orthogonal": olr.semi_orthogonal(4), "svd": olr.svd(4)}.items():
  tx = olr.low_rank(optax.adam(1e-2), spec, refresh_every=3)
  params = jax.device_put(big, shardings)
  state_sh = dist.state_shardings(tx, params)
  init = jax.jit(tx.init, out_shardings=state_sh)

  def step(p, s, x, tx=tx):
    u, s = tx.update(jax.grad(big_loss)(p, x), s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, out_shardings=(shardings, state_sh))
  path = os.path.join(OUT, f"ckpt_fsdp_{name}")
  if PHASE == "train":
    opt_state = init(params)
    for _ in range(4):  # refreshes at steps 0 and 3
      params, opt_state = step(params, opt_state, x)
    record(f"fsdp/{name}/saved", (params, opt_state))
    ckpt = checkpointer()
    ckpt.save(path, {"params": params, "opt_state": opt_state})
    ckpt.wait_until_finished()
    mu = opt_state.inner_state[0].mu
    facts[f"fsdp/{name}/mu_specs"] = {k: [str(a) for a in mu[k].sharding.spec] for k in mu}
    facts[f"fsdp/{name}/mu_addressable"] = mu["w1"].is_fully_addressable
  else:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "opt_state": init(params)})
    restored = checkpointer().restore(path, target)
    params, opt_state = restored["params"], restored["opt_state"]
    record(f"fsdp/{name}/restored", (params, opt_state))
  for _ in range(3):  # through the refresh at step 6
    params, opt_state = step(params, opt_state, x)
  record(f"fsdp/{name}/final", (params, opt_state))

np.savez(os.path.join(OUT, f"{PHASE}_p{PID}.npz"), **arrays)
with open(os.path.join(OUT, f"{PHASE}_p{PID}.json"), "w") as f:
  json.dump(facts, f)
print(f"process {PID}/{NPROC}: {len(arrays)} arrays written", flush=True)
