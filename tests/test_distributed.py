"""olr.distributed: worker bases, DiLoCo rounds on a mesh, sharded low_rank.

Single-device checks run in this process.  Everything that needs several
devices runs in ONE subprocess started with 8 simulated host devices
(``XLA_FLAGS`` must be set before JAX starts, and this process's device count
must not change); it prints its measurements as JSON and the tests below
assert on them one by one.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import optax_lowrank as olr
from optax_lowrank import distributed as dist

# ----------------------------------------------------------------------------
# A small two-layer model shared by this process and the subprocess.

MODEL = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np

    def loss_fn(params, batch):
      x, y = batch
      h = jnp.tanh(x @ params["w1"])
      return jnp.mean((h @ params["w2"] + params["b"] - y) ** 2)

    def make_params(seed=0):
      rng = np.random.default_rng(seed)
      return {"w1": jnp.asarray(0.3 * rng.normal(size=(16, 12))),
              "w2": jnp.asarray(0.3 * rng.normal(size=(12, 16))),
              "b": jnp.zeros(16)}

    def make_batches(rounds, steps, batch, seed=1):
      rng = np.random.default_rng(seed)
      x = rng.normal(size=(rounds, steps, batch, 16))
      y = np.sin(x @ rng.normal(size=(16, 16)) / 4)
      return [(jnp.asarray(x[g]), jnp.asarray(y[g])) for g in range(rounds)]
    """
)
_model = {}
exec(MODEL, _model)  # noqa: S102 - the same source the subprocess runs
loss_fn, make_params, make_batches = (_model[k] for k in ("loss_fn", "make_params", "make_batches"))


# ----------------------------------------------------------------------------
# Worker keys and bases (no mesh needed).


@pytest.mark.parametrize("k", [2, 4, 8])
def test_disjoint_factors_are_orthonormal_and_mutually_orthogonal_in_float32(k):
  key = jax.random.PRNGKey(3)
  n, r = 64, 64 // k
  us = [dist.disjoint_factor(key, n, r, k, i, jnp.float32) for i in range(k)]
  assert all(u.dtype == jnp.float32 and u.shape == (n, r) for u in us)
  gram = np.asarray(jnp.concatenate(us, axis=1), np.float64)
  gram = gram.T @ gram  # blocks P_i P_jᵀ = U_iᵀ U_j
  # float32 QR of a 64-column matrix is orthonormal to a few 1e-7; 1e-6 is the brief's bound.
  np.testing.assert_allclose(gram, np.eye(k * r), atol=1e-6)


def test_disjoint_factor_takes_blocks_of_one_matrix_and_reduces_to_semi_orthogonal():
  key = jax.random.PRNGKey(0)
  whole = olr.projections.random_factor("semi_orthogonal", key, 20, 12, jnp.float64)
  for i in range(3):  # block i is exactly columns [4i, 4i+4) of the shared matrix
    np.testing.assert_array_equal(dist.disjoint_factor(key, 20, 4, 3, i, jnp.float64),
                                  whole[:, 4 * i:4 * i + 4])
  # one worker: the very factor semi_orthogonal makes from the same key
  np.testing.assert_array_equal(dist.disjoint_factor(key, 20, 12, 1, 0, jnp.float64), whole)
  # a traced index (as jax.lax.axis_index gives) selects the same block
  traced = jax.jit(lambda i: dist.disjoint_factor(key, 20, 4, 3, i, jnp.float64))(2)
  np.testing.assert_array_equal(traced, whole[:, 8:])


def test_worker_keys_follow_the_scheme():
  key = jax.random.PRNGKey(7)
  for scheme in ("identical", "disjoint"):
    assert all((dist.worker_key(key, i, scheme) == key).all() for i in range(4))
  keys = [tuple(np.asarray(dist.worker_key(key, i, "independent"))) for i in range(4)]
  assert len(set(keys)) == 4 and tuple(np.asarray(key)) not in keys
  with pytest.raises(ValueError, match="scheme"):
    dist.worker_key(key, 0, "shared")


def test_assign_worker_rekeys_every_low_rank_state_in_a_chain():
  params = make_params()
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      olr.low_rank(optax.adam(1e-2), olr.gaussian(2), seed=1),
      olr.low_rank(optax.sgd(1e-2), olr.gaussian(2), seed=2),
  )
  state = tx.init(params)
  new = dist.assign_worker(state, 3, "independent")
  for old_s, new_s in ((state[1], new[1]), (state[2], new[2])):
    np.testing.assert_array_equal(new_s.key, jax.random.fold_in(old_s.key, 3))
    unchanged = jax.tree.map(np.array_equal, old_s.inner_state, new_s.inner_state)
    assert all(jax.tree.leaves(unchanged))
  np.testing.assert_array_equal(new[0], state[0])  # other states untouched
  np.testing.assert_array_equal(dist.assign_worker(state, 3, "identical")[1].key, state[1].key)


def test_worker_projection():
  semi = olr.semi_orthogonal(4, side="left")
  assert dist.worker_projection(semi, "identical", 4) is semi
  assert dist.worker_projection(olr.svd(4), "independent", 4) == olr.svd(4)
  spec = dist.worker_projection(semi, "disjoint", 4, axis_name="w")
  assert spec == dist.disjoint(4, 4, "left", axis_name="w")
  assert spec.stored and spec.rank == 4 and spec.side == "left"
  with pytest.raises(ValueError, match="semi_orthogonal"):
    dist.worker_projection(olr.gaussian(4), "disjoint", 4)
  with pytest.raises(ValueError, match="worker"):
    dist.disjoint(4, 2, worker=2)
  with pytest.raises(ValueError, match="num_workers"):
    dist.disjoint(4, 0)


def test_disjoint_rank_times_workers_above_the_projected_dimension_names_the_leaf():
  params = make_params()  # w1 16×12 projects its 12 columns, w2 12×16 its 12 rows
  tx = olr.low_rank(optax.adam(1e-2), dist.disjoint(4, 4, worker=0))
  with pytest.raises(ValueError, match=r"leaf 'w1' of shape \(16, 12\).*4 × 4 = 16 > 12"):
    tx.init(params)
  olr.low_rank(optax.adam(1e-2), dist.disjoint(3, 4, worker=0)).init(params)  # 3 × 4 = 12 fits


# ----------------------------------------------------------------------------
# DiLoCo on a one-device mesh (this process).


def _plain_training(tx, params, rounds):
  state = tx.init(params)
  step = jax.jit(lambda p, s, b: optax.apply_updates(
      p, tx.update(jax.grad(loss_fn)(p, b), s, p)[0]))
  update = jax.jit(lambda p, s, b: tx.update(jax.grad(loss_fn)(p, b), s, p)[1])
  for batches in rounds:
    for t in range(batches[0].shape[0]):
      b = jax.tree.map(lambda x, t=t: x[t], batches)
      params, state = step(params, state, b), update(params, state, b)
  return params


@pytest.mark.parametrize("projection,scheme", [
    pytest.param(olr.semi_orthogonal(3), "identical", id="low_rank"),
    pytest.param(None, "identical", id="full_rank"),
])
def test_one_worker_with_outer_sgd_1_is_plain_training(projection, scheme):
  mesh = Mesh(np.array(jax.devices()[:1]), ("workers",))
  steps, params, rounds = 3, make_params(), make_batches(3, 3, 8)
  diloco = dist.make_diloco(loss_fn, optax.adam(0.05), mesh, local_steps=steps,
                            projection=projection, scheme=scheme, outer=optax.sgd(1.0), seed=4)
  state = diloco.init(params)
  for batches in rounds:
    state, metrics = diloco.round(state, batches)
  plain = (optax.adam(0.05) if projection is None else
           olr.low_rank(optax.adam(0.05), olr.semi_orthogonal(3), refresh_every=steps, seed=4))
  expected = _plain_training(plain, params, rounds)
  # θ ← θ − (θ − W) is W up to one rounding per round (float64): 1e-12 is far below
  # the 1e-2 changes each round makes, and far above 3 roundings.
  for k in params:
    np.testing.assert_allclose(state.params[k], expected[k], atol=1e-12, rtol=0)
  assert int(state.rounds) == 3 and metrics.worker_loss.shape == (1,)
  assert float(metrics.pseudo_grad_norm) > 1e-3  # the round did move the weights


@pytest.mark.parametrize("params_spec", ["replicated", "per_worker"])
def test_diloco_round_runs_under_shard_map_with_replication_checks(params_spec):
  # make_diloco maps with check_vma=False; a user's own shard_map may keep the checks,
  # where the scan carry must start per-worker whether θ arrives replicated or not.
  mesh = Mesh(np.array(jax.devices()[:1]), ("workers",))
  inner, outer = optax.sgd(0.05), optax.sgd(1.0)
  params, (batches,) = make_params(), make_batches(1, 3, 8)
  state = dist.DiLoCoState(jnp.zeros([], jnp.int32), params, outer.init(params),
                           inner.init(params))
  spec = P() if params_spec == "replicated" else P("workers")
  specs = dist.DiLoCoState(P(), spec, P(), P())
  round_fn = functools.partial(dist.diloco_round, loss_fn=loss_fn, inner=inner, outer=outer)
  mapped = jax.jit(jax.shard_map(
      round_fn, mesh=mesh, in_specs=(specs, P()), check_vma=True,
      out_specs=(specs._replace(params=P("workers"), inner_states=P("workers")),
                 dist.RoundMetrics(P(), P("workers"), P()))))
  new_state, _ = mapped(state, batches)
  expected = _plain_training(inner, params, [batches])
  for k in params:  # one worker, outer SGD(1): W after 3 steps, up to a rounding (float64)
    np.testing.assert_allclose(new_state.params[k], expected[k], atol=1e-12, rtol=0)


def test_mesh_without_the_worker_axis_is_rejected():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match=r"no worker axis 'workers'"):
    dist.make_diloco(loss_fn, optax.adam(1e-2), mesh, local_steps=2)
  with pytest.raises(ValueError, match="scheme"):
    dist.make_diloco(loss_fn, optax.adam(1e-2), mesh, local_steps=2, axis_name="data",
                     scheme="orthogonal")
  with pytest.raises(ValueError, match="local_steps"):
    dist.make_diloco(loss_fn, optax.adam(1e-2), mesh, local_steps=0, axis_name="data")
  with pytest.raises(ValueError, match="semi_orthogonal"):
    dist.make_diloco(loss_fn, optax.adam(1e-2), mesh, local_steps=2, axis_name="data",
                     projection=olr.svd(2), scheme="disjoint")


# ----------------------------------------------------------------------------
# Several devices: one subprocess with 8 simulated host devices.

SCRIPT = MODEL + textwrap.dedent(
    """
    import json, re
    import optax
    import optax_lowrank as olr
    from optax_lowrank import distributed as dist
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    out = {}
    K, L, R, RANK, LR = 4, 3, 2, 2, 0.05
    devices = np.array(jax.devices())
    params, rounds = make_params(), make_batches(R, L, 8)
    outer = optax.sgd(0.7, momentum=0.9, nesterov=True)
    # "reset" builds fresh zeros inside low_rank's lax.cond: it must work under shard_map too
    POLICY = {"identical": "keep", "independent": "reset", "disjoint": "transport"}

    def spec_of(x):
      return [a for a in x.sharding.spec]

    def max_diff(a, b):
      return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))

    def simulate(scheme):
      # the K workers one after the other, with a fixed worker index per worker
      specs = [dist.worker_projection(olr.semi_orthogonal(RANK), scheme, K, worker=i)
               for i in range(K)]
      compiled = {}  # one compiled step per distinct spec (one for identical/independent)
      for spec in specs:
        if spec not in compiled:
          tx = olr.low_rank(optax.adam(LR), spec, refresh_every=L, on_refresh=POLICY[scheme])
          compiled[spec] = tx, jax.jit(
              lambda w, s, b, tx=tx: tx.update(jax.grad(loss_fn)(w, b), s, w))
      txs = [compiled[spec][0] for spec in specs]
      steps = [compiled[spec][1] for spec in specs]
      states = [dist.assign_worker(tx.init(params), i, scheme) for i, tx in enumerate(txs)]
      theta, outer_state = params, outer.init(params)
      for batches in rounds:
        ends = []
        for i in range(K):
          w = theta
          for t in range(L):
            b = jax.tree.map(lambda x: x[t, i * 2:(i + 1) * 2], batches)
            u, states[i] = steps[i](w, states[i], b)
            w = optax.apply_updates(w, u)
          ends.append(w)
        delta = jax.tree.map(lambda th, *ws: sum(th - w for w in ws) / K, theta, *ends)
        u, outer_state = outer.update(delta, outer_state, theta)
        theta = optax.apply_updates(theta, u)
      return theta

    def overlaps(factors):  # factors: (K, n, r); max |P_i P_jᵀ| per pair, and ‖P_i P_iᵀ − I‖
      f = np.asarray(factors)
      gram = np.einsum("inr,jns->ijrs", f, f)
      eye = np.eye(f.shape[2])
      off = max(float(np.abs(gram[i, j]).max()) for i in range(K) for j in range(K) if i != j)
      ortho = max(float(np.abs(gram[i, i] - eye).max()) for i in range(K))
      same = [bool(np.array_equal(f[0], f[i])) for i in range(1, K)]
      return {"off": off, "ortho": ortho, "same_as_worker0": same}

    # identical and independent on a 4-device worker mesh; disjoint on a 4×2 mesh whose
    # second axis shards the weights inside each worker (left to the compiler).
    meshes = {"identical": Mesh(devices[:4], ("workers",)),
              "independent": Mesh(devices[:4], ("workers",)),
              "disjoint": Mesh(devices.reshape(4, 2), ("workers", "fsdp"))}
    for scheme, mesh in meshes.items():
      d = dist.make_diloco(loss_fn, optax.adam(LR), mesh, local_steps=L,
                           projection=olr.semi_orthogonal(RANK), scheme=scheme, outer=outer,
                           on_refresh=POLICY[scheme])
      p0 = params
      if scheme == "disjoint":
        p0 = dict(params, w1=jax.device_put(params["w1"], NamedSharding(mesh, P("fsdp", None))))
      state = d.init(p0)
      for batches in rounds:
        state, metrics = d.round(state, batches)
      out[scheme] = {
          "vs_simulation": max_diff(state.params, simulate(scheme)),
          "w1": overlaps(state.inner_states.bases["w1"].factors[1]),
          "w2": overlaps(state.inner_states.bases["w2"].factors[0]),
          "inner_sharding": spec_of(state.inner_states.inner_state[0].mu["w1"]),
          "w1_sharding": spec_of(state.params["w1"]),
          "worker_loss_shape": list(metrics.worker_loss.shape),
          "rounds": int(state.rounds),
      }

    # bad input, before tracing
    mesh = meshes["identical"]
    d = dist.make_diloco(loss_fn, optax.adam(LR), mesh, local_steps=L,
                         projection=olr.semi_orthogonal(4), scheme="disjoint")
    errors = {}
    try:
      d.init(params)
    except ValueError as e:
      errors["rank"] = str(e)
    d = dist.make_diloco(loss_fn, optax.adam(LR), mesh, local_steps=L)
    for name, batch in {"divide": make_batches(1, L, 6)[0],
                        "steps": make_batches(1, L + 1, 8)[0]}.items():
      try:
        d.round(None, batch)  # the batch is checked before the state is even looked at
      except ValueError as e:
        errors[name] = str(e)
    out["errors"] = errors

    # FSDP: low_rank on weights sharded over 8 devices along their unprojected axis
    mesh = Mesh(devices, ("fsdp",))
    big = {"w1": jnp.asarray(np.random.default_rng(2).normal(size=(64, 16)) * 0.2),
           "w2": jnp.asarray(np.random.default_rng(3).normal(size=(16, 64)) * 0.2),
           "b": jnp.zeros(64)}
    specs = {"w1": P("fsdp", None), "w2": P(None, "fsdp"), "b": P()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 64)))

    def big_loss(p):
      return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"]) ** 2)

    def train_step(tx):
      def step(p, s):
        u, s = tx.update(jax.grad(big_loss)(p), s, p)
        return optax.apply_updates(p, u), s
      return step

    fsdp = {}
    tx = olr.low_rank(optax.adam(1e-2), olr.semi_orthogonal(4), refresh_every=3)
    sharded = jax.device_put(big, shardings)
    state_sh = dist.state_shardings(tx, sharded)
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
    fsdp["init_specs"] = {k: spec_of(opt_state.inner_state[0].mu[k]) for k in big}
    step = jax.jit(train_step(tx), out_shardings=(shardings, state_sh))
    ref_p, ref_s = big, tx.init(big)
    ref_step = jax.jit(train_step(tx))
    for _ in range(7):  # two refreshes
      sharded, opt_state = step(sharded, opt_state)
      ref_p, ref_s = ref_step(ref_p, ref_s)
    fsdp["diff"] = max_diff(sharded, ref_p)
    fsdp["specs"] = {k: spec_of(opt_state.inner_state[0].mu[k]) for k in big}
    fsdp["nu_specs"] = {k: spec_of(opt_state.inner_state[0].nu[k]) for k in big}
    fsdp["basis_spec"] = spec_of(opt_state.bases["w1"].factors[1])
    fsdp["param_specs"] = {k: spec_of(sharded[k]) for k in big}
    fsdp["cache_size"] = step._cache_size()
    # what a refresh gathers: the full matrix for an SVD, nothing for a random basis
    gathers = {}
    for name, spec in {"svd": olr.svd(4), "semi_orthogonal": olr.semi_orthogonal(4),
                       "randomized_svd": olr.randomized_svd(4, oversample=2)}.items():
      t = olr.low_rank(optax.adam(1e-2), spec, refresh_every=3)
      hlo = jax.jit(train_step(t)).lower(sharded, jax.eval_shape(t.init, big)).compile().as_text()
      gathers[name] = re.findall(r"= (\\w+\\[[\\d,]*\\])\\S* all-gather\\(", hlo)
    fsdp["gathers"] = gathers
    out["fsdp"] = fsdp
    print("RESULTS " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def multi():
  # One OpenBLAS thread: on a busy 2-core machine its thread pool can make a small QR 100× slower.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                        timeout=600)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULTS "):])


def _strip(spec):
  """A partition spec as a list without trailing ``None`` (``P('a', None) == P('a')``)."""
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return spec


@pytest.mark.parametrize("scheme", ["identical", "independent", "disjoint"])
def test_shard_map_equals_a_sequential_simulation_of_the_workers(multi, scheme):
  # The same float64 arithmetic in another order (pmean vs a Python sum, other fusions),
  # through 6 Adam steps and 2 Nesterov steps: round-off stays below 1e-10 while a
  # single wrong basis, key or batch slice changes the weights by > 1e-3.
  r = multi[scheme]
  assert r["vs_simulation"] < 1e-10, r
  assert r["rounds"] == 2 and r["worker_loss_shape"] == [4]
  assert r["inner_sharding"][0] == "workers"  # each worker's state on its own devices


def test_disjoint_bases_are_orthonormal_and_mutually_orthogonal(multi):
  for leaf in ("w1", "w2"):
    r = multi["disjoint"][leaf]
    assert r["off"] < 1e-6 and r["ortho"] < 1e-6, r  # float64 here: in fact ~1e-16
    assert not any(r["same_as_worker0"])


def test_independent_bases_differ_and_identical_bases_are_equal(multi):
  for leaf in ("w1", "w2"):
    ind, same = multi["independent"][leaf], multi["identical"][leaf]
    assert not any(ind["same_as_worker0"]) and ind["ortho"] < 1e-12
    # independent random 2-D subspaces of R^12 overlap, but not completely
    assert 1e-3 < ind["off"] < 1 - 1e-3, ind
    assert all(same["same_as_worker0"]) and abs(same["off"] - 1) < 1e-12


def test_other_mesh_axes_keep_the_weights_sharded_inside_each_worker(multi):
  assert multi["disjoint"]["w1_sharding"][:1] == ["fsdp"]
  assert multi["identical"]["w1_sharding"] == []  # replicated without such an axis


def test_bad_input_on_a_multi_worker_mesh_fails_before_tracing(multi):
  errors = multi["errors"]
  assert "leaf 'w1' of shape (16, 12)" in errors["rank"] and "4 × 4 = 16 > 12" in errors["rank"]
  assert "batch size 6 is not divisible by the 4 workers" in errors["divide"]
  assert "local_steps=3" in errors["steps"]


def test_sharded_low_rank_matches_unsharded_and_state_is_sharded_like_coefficients(multi):
  f = multi["fsdp"]
  # 7 float64 steps (two refreshes); the only difference is the order of sharded sums.
  assert f["diff"] < 1e-12, f["diff"]
  # w1 (64×16) is right-projected: coefficients G Q are 64×r, row-sharded like w1;
  # w2 (16×64) is left-projected: P G is r×64, column-sharded like w2.
  expected = {"w1": ["fsdp"], "w2": [None, "fsdp"], "b": []}
  for got in (f["init_specs"], f["specs"], f["nu_specs"]):
    assert {k: _strip(v) for k, v in got.items()} == expected, got
  assert _strip(f["basis_spec"]) == []  # the 16×r basis is small and replicated
  assert {k: _strip(v) for k, v in f["param_specs"].items()} == expected
  assert f["cache_size"] == 1


def test_what_a_refresh_gathers_from_a_sharded_gradient(multi):
  gathers = multi["fsdp"]["gathers"]
  assert "f64[64,16]" in gathers["svd"] and "f64[16,64]" in gathers["svd"], gathers
  assert gathers["semi_orthogonal"] == [], gathers
  # the randomized range finder gathers only thin 64×k panels (k = rank + oversample = 6)
  assert gathers["randomized_svd"] and all(",6]" in g for g in gathers["randomized_svd"]), gathers


# ----------------------------------------------------------------------------
# examples/diloco.py, in this process on one device (its 4-worker run is the docs' job).


@pytest.fixture
def one_device_env(monkeypatch):
  jax.devices()  # the backend is up: the example's configure_host can no longer change it
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def test_example_rejects_bad_input_with_exit_code_2(one_device_env, capsys):
  from examples import diloco as example

  assert example.main(["--rank", "32", "--runs", "disjoint"]) == 2
  assert "--rank 32 × --workers 4 exceeds the model width 64" in capsys.readouterr().err
  assert example.main(["--runs", "disjoint,sideways"]) == 2
  assert example.main(["--workers", "4", "--runs", "identical"]) == 2  # one device here
  assert "4 workers need 4 devices" in capsys.readouterr().err
  assert example.main(["--workers", "1", "--dim", "30", "--runs", "diloco"]) == 2
  assert "dim (30) must be divisible by n_heads (4)" in capsys.readouterr().err


def test_example_runs_end_to_end_on_one_worker(one_device_env, tmp_path):
  from examples import diloco as example

  argv = ["--workers", "1", "--runs", "disjoint", "--rounds", "2", "--local-steps", "2",
          "--dim", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "2",
          "--eval-batches", "1", "--max-bytes", "200000", "--seeds", "0,1",
          "--plot", str(tmp_path / "d.png"), "--json", str(tmp_path / "d.json")]
  assert example.main(argv) == 0
  (result,) = json.loads((tmp_path / "d.json").read_text())["results"]
  assert result["run"] == "disjoint" and len(result["histories"]) == 2
  assert all(len(h["val_loss"]) == 3 and np.isfinite(h["val_loss"]).all()
             for h in result["histories"])
  assert np.isfinite(result["std"]) and (tmp_path / "d.png").stat().st_size > 0
