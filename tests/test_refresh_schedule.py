"""Staggered and lazy per-matrix refresh schedules, and SVD-free subspace tracking.

What is asserted: exactly which matrices refresh on which step (the schedule
itself, from the bases in the state), that the matrices not due keep their
bases and statistics, the lazy interval rule, one compilation over several
periods, the duality with the adapter path under every schedule and policy
(float64: the paths differ by round-off only, ``1e-10`` over a dozen steps),
and that tracking converges to the exact top-``r`` subspace on a fixed gradient.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_lowrank as olr
from optax_lowrank import adapters, leaves
from optax_lowrank import refresh_schedule as rs

L, M, N = 3, 12, 8
RULE = ((0,), (1,), (2,))


def _params(dtype=jnp.float64):
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"stack": jax.random.normal(k[0], (L, M, N), dtype),
          "a": jax.random.normal(k[1], (M, N), dtype),
          "b": jax.random.normal(k[2], (N, M), dtype),
          "bias": jnp.zeros((N,), dtype)}


def _reshape(path, leaf):
  return RULE if leaf.ndim == 3 else None


def _grads(t, dtype=jnp.float64):
  p = _params(dtype)
  keys = jax.random.split(jax.random.PRNGKey(100 + t), len(p))
  return {name: jax.random.normal(k, x.shape, dtype) for k, (name, x) in zip(keys, p.items())}


def _factor(basis):
  return basis.factors[0] if basis.factors[0] is not None else basis.factors[1]


def _changed(before, after):
  """Per matrix (batch_shape, or a scalar): did its factor change?"""
  out = {}
  for name in before:
    if before[name] is None:
      continue
    fa, fb = _factor(before[name]), _factor(after[name])
    out[name] = np.asarray(jnp.any(fa != fb, axis=(-2, -1)))
  return out


def _run(tx, steps):
  params = _params()
  update = jax.jit(tx.update)
  state = tx.init(params)
  states = [state]
  for t in range(steps):
    _, state = update(_grads(t), state, params)
    states.append(state)
  return states


@pytest.mark.parametrize("spec", [olr.svd(3), olr.subspace_iteration(3)], ids=["svd", "tracking"])
def test_staggered_refreshes_each_matrix_on_its_own_offset(spec):
  T = 4
  tx = olr.low_rank(optax.adam(1e-2), spec, refresh_every=T, reshape=_reshape,
                    refresh_schedule="staggered")
  states = _run(tx, 3 * T)
  plans = leaves.plan(_params(), spec, None, _reshape)
  offs = rs.offsets(plans, T)
  flat = np.concatenate([np.ravel(offs[k]) for k in ("a", "b", "stack")])
  assert sorted(set(flat.tolist())) == list(range(T))        # 5 matrices spread over 4 offsets
  for t in range(1, 3 * T):
    changed = _changed(states[t].bases, states[t + 1].bases)
    for name in ("a", "b", "stack"):
      want = (t + offs[name]) % T == 0
      np.testing.assert_array_equal(changed[name], want, err_msg=f"step {t}, {name}")
  # Every matrix has its first basis after step 0 whatever its offset.
  for name in ("a", "b", "stack"):
    assert bool(jnp.all(jnp.any(_factor(states[1].bases[name]) != 0, axis=(-2, -1))))
  assert int(states[-1].schedule.refreshes) == 3 * T   # some matrix refreshed on every step


def test_offsets_balance_the_refresh_work():
  params = {f"w{i}": jax.ShapeDtypeStruct(shape, jnp.float32)
            for i, shape in enumerate([(64, 64)] * 4 + [(64, 176)] * 2 + [(176, 64)])}
  params["stack"] = jax.ShapeDtypeStruct((8, 64, 64), jnp.float32)
  spec = olr.svd(16)
  plans = leaves.plan(params, spec, None, _reshape)
  T = 4
  offs = rs.offsets(plans, T)
  load = np.zeros(T)
  for p in jax.tree.leaves(plans, is_leaf=leaves.is_plan):
    for o in np.ravel(offs[p.path]):
      load[o] += spec.refresh_flops(p.view_shape)
  cost = spec.refresh_flops((64, 176))
  assert load.max() - load.min() <= cost        # LPT: within one (largest) matrix
  np.testing.assert_array_equal(offs["w0"], rs.offsets(plans, T)["w0"])   # deterministic


def test_a_matrix_not_due_keeps_its_statistics_under_reset():
  T = 3
  tx = olr.low_rank(optax.scale_by_adam(), olr.svd(3), refresh_every=T, reshape=_reshape,
                    refresh_schedule="staggered", on_refresh="reset")
  states = _run(tx, 2 * T)
  plans = leaves.plan(_params(), olr.svd(3), None, _reshape)
  offs = rs.offsets(plans, T)["stack"]
  mu = lambda s: optax.tree.get(s, "mu")["stack"]
  for t in range(1, 2 * T):
    before, after = mu(states[t]), mu(states[t + 1])
    for i in range(L):
      if (t + offs[i]) % T == 0:    # reset, then one step: (1 - b1)·c
        c = olr.project(states[t + 1].bases["stack"], _grads(t)["stack"])[i]
        np.testing.assert_allclose(after[i], 0.1 * c, atol=1e-12)
      else:                         # kept: b1·μ + (1 - b1)·c
        c = olr.project(states[t + 1].bases["stack"], _grads(t)["stack"])[i]
        np.testing.assert_allclose(after[i], 0.9 * before[i] + 0.1 * c, atol=1e-12)


def test_lazy_intervals_double_while_stable_and_halve_when_moving():
  T = 2
  sched = rs.lazy(max_every=8, grow_above=0.99, shrink_below=0.5, smoothing=0.0)
  tx = olr.low_rank(optax.sgd(1e-2), olr.svd(2), refresh_every=T, refresh_schedule=sched)
  params = {"w": jnp.zeros((10, 6), jnp.float64)}
  g = jax.random.normal(jax.random.PRNGKey(0), (10, 6), jnp.float64)
  update = jax.jit(tx.update)
  intervals = []
  state = tx.init(params)
  for _ in range(24):
    _, state = update({"w": g}, state)
    intervals.append(int(state.schedule.interval["w"]))
  # Offset 0 (one matrix): refreshes at 0, 2 (→4), 4 (→8), 8, 16, ...; capped at 8.
  assert intervals[:3] == [2, 2, 4]
  assert intervals[4] == 8 and max(intervals) == 8
  # Now the subspace moves at every refresh: the interval halves back to T.
  for t in range(24, 48):
    _, state = update({"w": jax.random.normal(jax.random.PRNGKey(t), (10, 6), jnp.float64)},
                      state)
  assert int(state.schedule.interval["w"]) == T
  assert float(state.schedule.overlap["w"]) < 0.5


def _noisy_planted(key, u, m, n, noise):
  """A minibatch-like gradient: a fixed rank-``r`` signal in ``span(u)`` plus fresh noise."""
  k1, k2 = jax.random.split(key)
  r = u.shape[1]
  signal = (u * jnp.geomspace(4.0, 2.0, r)) @ jax.random.normal(k1, (r, n), jnp.float64)
  return signal / np.sqrt(n) + noise * jax.random.normal(k2, (m, n), jnp.float64) / np.sqrt(n)


@pytest.mark.parametrize("spec", [olr.svd(4), olr.subspace_iteration(4)], ids=["svd", "tracking"])
def test_lazy_defaults_grow_on_a_noisy_stable_subspace_and_shrink_when_it_moves(spec):
  """The default rule on gradients like training's: ``ρ`` well below 1 yet far above chance."""
  T, m, n = 2, 24, 40
  tx = olr.low_rank(optax.sgd(1e-2), spec, refresh_every=T, refresh_schedule="lazy")
  params = {"w": jnp.zeros((m, n), jnp.float64)}
  update = jax.jit(tx.update, donate_argnums=1)  # as a training loop does: no buffer twice
  state = tx.init(params)
  u = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (m, 4), jnp.float64))[0]
  raw = []
  for t in range(80):
    _, state = update({"w": _noisy_planted(jax.random.PRNGKey(t), u, m, n, 1.0)}, state)
    raw.append(float(state.schedule.overlap["w"]))
  assert int(state.schedule.interval["w"]) == 8 * T  # the default cap
  assert 0.3 < np.median(raw[T:]) < 0.95  # noisy: the old rule (ρ >= 0.9) would not grow
  # A new subspace at every step.  Low noise: one warm-started tracking step from the
  # old basis barely moves under strong isotropic noise (its overlap then stays high
  # whatever the signal does); a clean jump moves it as far as the SVD's.
  for t in range(80, 200):
    u = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(10_000 + t), (m, 4), jnp.float64))[0]
    _, state = update({"w": _noisy_planted(jax.random.PRNGKey(t), u, m, n, 0.1)}, state)
  assert int(state.schedule.interval["w"]) == T
  assert float(state.schedule.score["w"]) < rs.lazy().shrink_below


@given(m=st.integers(4, 30), n=st.integers(4, 30), rank=st.integers(1, 3),
       side=st.sampled_from(["left", "right"]))
def test_chance_overlap_is_the_overlap_of_random_subspaces(m, n, rank, side):
  plans = leaves.plan({"w": jax.ShapeDtypeStruct((m, n), jnp.float32)},
                      olr.svd(rank, side=side), where=True)
  p = plans["w"]
  dim = m if side == "left" else n
  r = min(rank, dim)
  if r >= dim:
    assert rs.chance_overlap(p) == 1.0
    return
  assert rs.chance_overlap(p) == pytest.approx(r / dim)
  rng = np.random.default_rng(m * 100 + n)
  draws = [np.sum((np.linalg.qr(rng.normal(size=(dim, r)))[0].T
                   @ np.linalg.qr(rng.normal(size=(dim, r)))[0]) ** 2) / r for _ in range(400)]
  assert np.mean(draws) == pytest.approx(r / dim, abs=4 * np.std(draws) / 20 + 1e-9)
  kappa = rs.stability(p, jnp.asarray([r / dim, 1.0]))
  np.testing.assert_allclose(kappa, [0.0, 1.0], atol=1e-6)


@given(T=st.sampled_from([1, 2, 4]), cap=st.integers(1, 40),
       beta=st.sampled_from([0.0, 0.5, 0.8]),
       rho=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
       due=st.lists(st.booleans(), min_size=12, max_size=12))
def test_lazy_score_and_interval_follow_the_rule(T, cap, beta, rho, due):
  """``advance`` against a NumPy transcription of the rule, for any overlaps."""
  params = {"stack": jax.ShapeDtypeStruct((2, 12, 8), jnp.float32)}
  plans = leaves.plan(params, olr.svd(2), None, _reshape)
  sched = rs.lazy(max_every=cap, smoothing=beta)
  longest = sched.longest(T)
  c = rs.chance_overlap(plans["stack"])
  state = rs.init(sched, plans, T)
  s_ref, every_ref = np.zeros(2), np.full(2, T)
  for t, (o, d) in enumerate(zip(rho, due), start=1):
    d_tree = {"stack": jnp.asarray([d, True])}
    state = rs.advance(sched, plans, T, state, t, d_tree,
                       {"stack": jnp.asarray([o, 1.0 - o], jnp.float32)})
    for j, (oj, dj) in enumerate(zip([o, 1.0 - o], [d, True])):
      if not dj:
        continue
      s_ref[j] = beta * s_ref[j] + (1 - beta) * (oj - c) / (1 - c)
      if s_ref[j] >= sched.grow_above:
        every_ref[j] = min(2 * every_ref[j], longest)
      elif s_ref[j] < sched.shrink_below:
        every_ref[j] = max(every_ref[j] // 2, T)
    np.testing.assert_allclose(state.score["stack"], s_ref, rtol=1e-5, atol=1e-5)
    got = np.asarray(state.interval["stack"])
    np.testing.assert_array_equal(got, every_ref)
    assert np.all((T <= got) & (got <= max(longest, T)))
    assert np.all(np.log2(got / T) % 1 == 0)  # a power-of-two multiple of T


@given(T=st.sampled_from([1, 2, 4, 8]), k=st.lists(st.integers(0, 3), min_size=5, max_size=5),
       count=st.integers(0, 200))
def test_lazy_due_matrices_are_a_subset_of_the_staggered_ones(T, k, count):
  """So the worst lazy step is never worse than the worst staggered one."""
  params = {"stack": jax.ShapeDtypeStruct((5, 6, 4), jnp.float32)}
  plans = leaves.plan(params, olr.svd(2), None, _reshape)
  state = rs.init(rs.lazy(), plans, T)
  state = state._replace(interval={"stack": jnp.asarray([T * 2**x for x in k], jnp.int32)})
  lazy = rs.due(rs.lazy(), plans, T, count, state)["stack"]
  stag = rs.due(rs.staggered(), plans, T, count, rs.init(rs.staggered(), plans, T))["stack"]
  assert bool(jnp.all(~lazy | stag))
  if count == 0:
    assert bool(jnp.all(lazy))


@pytest.mark.parametrize("schedule", ["fixed", "staggered", "lazy"])
def test_one_compilation_over_several_periods(schedule):
  T = 2
  tx = olr.low_rank(optax.adam(1e-2), olr.subspace_iteration(3), refresh_every=T,
                    reshape=_reshape, refresh_schedule=schedule)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, s):
    return tx.update(g, s)

  state = tx.init(_params())
  for t in range(3 * T):
    _, state = step(_grads(t), state)


def _adapter_run(loss, params, inner, spec, steps, T, schedule, on_refresh, reshape, batches):
  """The adapter path with the same schedule: merge the due matrices on their steps."""
  schedule = rs.as_schedule(schedule)
  grad_fn = jax.grad(loss)
  adapter = adapters.init(params, spec, grads=grad_fn(params, batches[0]), reshape=reshape)
  plans = adapter.plans
  lam = adapters.zeros(adapter)
  tx = adapters.optimizer(inner, adapter)
  opt = tx.init(lam)
  sched = rs.init(schedule, plans, T)

  @jax.jit
  def merge(adapter, lam, opt, sched, t, d, batch):
    full = grad_fn(adapters.materialize(adapter, lam), batch)
    new, lam = adapters.merge(adapter, lam, full, due=d)
    opt = adapters.refresh_state(on_refresh, tx, opt, adapter, new, due=d)
    sched = rs.advance(schedule, plans, T, sched, t, d,
                       rs.overlaps(plans, adapters.bases(adapter), adapters.bases(new)))
    return new, lam, opt, sched

  @jax.jit
  def step(adapter, lam, opt, batch):
    glam = jax.grad(lambda lm: loss(adapters.materialize(adapter, lm), batch))(lam)
    u, opt = tx.update(glam, opt, lam)
    lam = optax.apply_updates(lam, u)
    return lam, opt, adapters.materialize(adapter, lam)

  due = jax.jit(lambda t, sched: rs.due(schedule, plans, T, t, sched))
  out = []
  for t in range(steps):
    batch = batches[t]
    d = due(t, sched)
    if t == 0:
      sched = rs.advance(schedule, plans, T, sched, t, d, None)
    elif bool(rs.any_due(d)):
      adapter, lam, opt, sched = merge(adapter, lam, opt, sched, t, d, batch)
    lam, opt, eff = step(adapter, lam, opt, batch)
    out.append(eff)
  return out, sched


def _gradient_run(loss, params, inner, spec, steps, T, schedule, on_refresh, reshape, batches):
  tx = olr.low_rank(inner, spec, refresh_every=T, on_refresh=on_refresh, reshape=reshape,
                    refresh_schedule=schedule)
  state = tx.init(params)
  grad_fn = jax.grad(loss)

  @jax.jit
  def step(w, state, batch):
    u, state = tx.update(grad_fn(w, batch), state, w)
    return optax.apply_updates(w, u), state

  out, w = [], params
  for t in range(steps):
    w, state = step(w, state, batches[t])
    out.append(w)
  return out, state.schedule


def _loss(p, batch):
  x, y = batch
  pred = jnp.einsum("lbm,lmn->lbn", x, p["stack"]) + (x[0] @ p["a"])[None] + p["bias"]
  return jnp.mean((pred - y) ** 2) + jnp.mean(jnp.tanh(x[1] @ p["a"] @ p["b"]) ** 2)


def _batches(steps):
  keys = jax.random.split(jax.random.PRNGKey(7), steps)
  return [(jax.random.normal(k, (L, 5, M), jnp.float64),
           jax.random.normal(jax.random.fold_in(k, 1), (L, 5, N), jnp.float64)) for k in keys]


@pytest.mark.parametrize("schedule, policy, spec", [
    ("staggered", "keep", olr.svd(3)),
    ("staggered", "reset", olr.subspace_iteration(3)),
    ("staggered", "transport", olr.randomized_svd(3, oversample=1)),
    ("lazy", "transport", olr.subspace_iteration(3)),
    ("fixed", "transport", olr.subspace_iteration(3, iters=2)),
], ids=["staggered-keep-svd", "staggered-reset-tracking", "staggered-transport-rsvd",
        "lazy-transport-tracking", "fixed-transport-tracking"])
def test_duality_with_the_adapter_path_under_every_schedule(schedule, policy, spec):
  steps, T = 12, 3
  batches = _batches(steps)
  params = _params()
  args = (_loss, params, optax.adam(1e-2), spec, steps, T, schedule, policy, _reshape, batches)
  got, g_sched = _gradient_run(*args)
  want, a_sched = _adapter_run(*args)
  for t, (x, y) in enumerate(zip(got, want)):
    for name in x:
      np.testing.assert_allclose(x[name], y[name], atol=1e-10, err_msg=f"step {t} {name}")
  if g_sched is not None:
    assert int(g_sched.refreshes) == int(a_sched.refreshes)
    chex.assert_trees_all_equal(g_sched.interval, a_sched.interval)


def _planted(rng, m, n, r, gap):
  u = np.linalg.qr(rng.normal(size=(m, r)))[0]
  v = np.linalg.qr(rng.normal(size=(n, r)))[0]
  sigma = 2.0 / (gap * (np.sqrt(m) + np.sqrt(n)))
  return (u * np.geomspace(10.0, 2.0, r)) @ v.T + sigma * rng.normal(size=(m, n))


@given(m=st.integers(12, 40), n=st.integers(12, 40), rank=st.integers(1, 5),
       side=st.sampled_from(["auto", "left", "right"]), stack=st.sampled_from([0, 2]),
       seed=st.integers(0, 2**16))
def test_tracking_converges_to_the_top_subspace_of_a_fixed_gradient(m, n, rank, side, stack,
                                                                      seed):
  rng = np.random.default_rng(seed)
  gs = [_planted(rng, m, n, rank, gap=2.0) for _ in range(max(stack, 1))]
  g = jnp.asarray(np.stack(gs) if stack else gs[0])
  # A poor first basis (a bare sketch), then one subspace-iteration step per refresh,
  # through the code the refresh runs (Projection.refreshed: lax.map over a stack).
  spec = olr.subspace_iteration(rank, side, init="randomized", oversample=0, power_iters=0)
  (p,) = jax.tree.leaves(leaves.plan({"w": g}, spec, None, RULE if stack else None),
                         is_leaf=leaves.is_plan)
  key = jax.random.PRNGKey(seed)
  first = jax.jit(lambda g: p.make_basis(key, 0, g))
  step = jax.jit(lambda g, b: p.spec.refreshed(p.shape, p.view_shape, p.perm, key, g,
                                               p.basis_dtype, p.batch_shape, previous=b)[0])
  basis = first(g)
  resolved = side if side != "auto" else ("right" if m >= n else "left")
  exact = []
  for gi in gs:
    u, _, vt = np.linalg.svd(gi, full_matrices=False)
    exact.append(u[:, :rank] if resolved == "left" else vt[:rank].T)
  worst = []
  for _ in range(12):
    basis = step(g, basis)
    f = np.asarray(_factor(basis)).reshape((-1,) + _factor(basis).shape[-2:])
    cos = []
    for fi, ei in zip(f, exact):
      np.testing.assert_allclose(fi.T @ fi, np.eye(rank), atol=1e-10)   # orthonormal
      cos.append(np.linalg.svd(ei.T @ fi, compute_uv=False).min() ** 2)
    worst.append(1.0 - min(cos))       # sin² of the largest principal angle
  assert worst[-1] < 1e-8
  assert worst[-1] <= worst[2] + 1e-12


def test_tracking_keeps_coordinates_when_the_subspace_does_not_move():
  """On a fixed gradient a converged basis is a fixed point: "keep" statistics stay meaningful.

  By default the columns converge to the singular vectors in order (the QR
  algorithm; the QR's signs keep each column next to its previous value); with
  ``align`` any basis of the span is kept, here a rotated one.
  """
  rng = np.random.default_rng(0)
  g = jnp.asarray(_planted(rng, 30, 20, 4, gap=3.0))
  u_top = np.linalg.svd(np.asarray(g))[0][:, :4]
  rotated = u_top @ np.linalg.qr(rng.normal(size=(4, 4)))[0]   # the top span, other axes

  def refreshed(align, steps):
    tx = olr.low_rank(optax.sgd(0.0), olr.subspace_iteration(4, "left", align=align),
                      refresh_every=1)
    state = tx.init({"w": g})
    leaves, treedef = jax.tree.flatten(state.bases["w"])
    assert leaves[0].shape == rotated.shape          # the left factor, all zeros until made
    state = state._replace(bases={"w": jax.tree.unflatten(
        treedef, [jnp.asarray(rotated), *leaves[1:]])})
    update = jax.jit(tx.update)
    out = []
    for _ in range(steps):
      _, state = update({"w": g}, state)
      out.append(np.asarray(state.bases["w"].factors[0]))
    return out

  default = refreshed(False, 60)
  np.testing.assert_allclose(np.abs(np.sum(default[-1] * u_top, axis=0)), 1.0, atol=1e-8)
  np.testing.assert_allclose(default[-1], default[-2], atol=1e-10)
  aligned = refreshed(True, 3)
  np.testing.assert_allclose(aligned[-1], rotated, atol=1e-9)
  # Unaligned, the rotated start is not kept: its columns turn towards the axes.
  assert not np.allclose(default[0], rotated, atol=1e-3)


def test_tracking_costs_a_fraction_of_an_svd():
  for shape in [(512, 512), (512, 1376), (1376, 512), (1024, 2816)]:
    track = olr.subspace_iteration(128).refresh_flops(shape)
    full = olr.svd(128).refresh_flops(shape)
    assert track < 0.2 * full, shape


@pytest.mark.parametrize("make, match", [
    (lambda: olr.low_rank(optax.sgd(1.0), olr.gaussian(2), refresh_schedule="staggered"),
     "stored basis"),
    (lambda: olr.low_rank(optax.sgd(1.0), olr.svd(2), refresh_schedule="sometimes"),
     "`refresh_schedule` must be one of"),
    (lambda: rs.lazy(grow_above=0.2, shrink_below=0.5), "shrink_below <= grow_above"),
    (lambda: rs.lazy(max_every=0), "`max_every`"),
    (lambda: rs.lazy(smoothing=1.0), "smoothing"),
    (lambda: olr.subspace_iteration(4, iters=0), "`iters`"),
    (lambda: olr.subspace_iteration(4, init="qr"), "`init`"),
])
def test_bad_schedules_and_specs_fail_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()
