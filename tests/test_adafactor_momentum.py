"""AdaMeM (paper 004): Claim 3.1, the algorithm against a NumPy reference, state, jit, wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.extend.core import jaxprs_in_params

from optax_lowrank import adafactor_momentum as am
from optax_lowrank import bases as bases_lib
from optax_lowrank import leaves
from optax_lowrank import projections as proj
from optax_lowrank.bases import Basis

PARAMS = {
    "wide": jnp.zeros((6, 10)),     # side "auto" -> left projector (6, r), momentum (r, 10)
    "tall": jnp.zeros((12, 8)),     # side "auto" -> right projector (8, r), momentum (12, r)
    "bias": jnp.zeros((10,)),       # not projected: Adafactor, full second moment
    "conv": jnp.zeros((3, 4, 5)),   # not projected (no reshape rule): factored Adafactor
}


def grad_stream(params, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
          for _ in range(steps)]


def run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(tx.update)
  outs, states = [], []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(u)
    states.append(state)
  return outs, states, step


def projector(state, name):
  (factor,) = [f for f in state.bases[name].factors if f is not None]
  return np.asarray(factor)


jitted_parts = jax.jit(am.adamem_parts, static_argnames=("statistics", "clip_threshold"))


# ----------------------------------------------------------------------------
# Claim 3.1: the preconditioned low-rank part and the preconditioned residual
# are orthogonal, for any projector, any momentum (even one built in older
# bases) and any statistics.


@given(
    m=st.integers(2, 9),
    n=st.integers(2, 9),
    rank=st.integers(1, 9),
    side=st.sampled_from(["auto", "left", "right"]),
    count=st.integers(0, 50),
    permuted=st.booleans(),
    statistics=st.sampled_from(["gradient", "momentum"]),
    clip_threshold=st.sampled_from([1.0, 0.1, None]),
    seed=st.integers(0, 2**16),
)
def test_claim_3_1_parts_are_orthogonal(
    m, n, rank, side, count, permuted, statistics, clip_threshold, seed
):
  rng = np.random.default_rng(seed)
  if permuted:  # a 3-D leaf viewed through a permutation: rows = axis 1, cols = axes (0, 2)
    shape, rule = (2, m, n), ((1,), (0, 2))
  else:
    shape, rule = (m, n), None
  # where=True: projected even where the clamped rank saves nothing (not the default)
  plan = leaves.plan({"w": jnp.zeros(shape)}, proj.svd(rank, side), reshape=rule,
                     where=True)["w"]
  assert plan.projected
  # Any orthonormal P will do for the claim; NumPy's SVD of a random matrix
  # spares an XLA compilation per drawn shape (make_basis is tested below).
  axis = 0 if plan.spec.axis_ranks(plan.view_shape)[0] is not None else 1
  p_dim, q = plan.view_shape[axis], plan.view_shape[1 - axis]
  r = min(rank, p_dim, q)
  p_mat = np.linalg.svd(rng.normal(size=(p_dim, q)))[0][:, :r]
  factors = [None, None]
  factors[axis] = jnp.asarray(p_mat)
  basis = Basis(factors, plan.shape, plan.view_shape, plan.perm)
  a, b = plan.coefficient_shape
  parts = jitted_parts(
      basis,
      jnp.asarray(rng.normal(size=shape)),
      jnp.asarray(rng.normal(size=(a, b))),
      jnp.asarray(rng.uniform(0.0, 2.0, size=a)),
      jnp.asarray(rng.uniform(0.0, 2.0, size=b)),
      jnp.asarray(rng.uniform(0.0, 2.0, size=q)),
      count,
      statistics=statistics,
      clip_threshold=clip_threshold,
  )
  low = np.asarray(bases_lib.to_view(basis, parts.low_rank))
  res = np.asarray(bases_lib.to_view(basis, parts.residual))
  # Frobenius inner product relative to the norms; float64 round-off of these
  # O(10)-sized products is ~1e-15, so 1e-10 leaves a wide margin.
  inner = float(np.sum(low * res))
  assert abs(inner) <= 1e-10 * (np.linalg.norm(low) * np.linalg.norm(res) + 1e-300)
  # The stronger statement behind it: N_1 lies in span(P), N_2 in its complement.
  on = (lambda x: p_mat.T @ x) if axis == 0 else (lambda x: x @ p_mat)
  scale = np.linalg.norm(res) + np.linalg.norm(low)
  np.testing.assert_allclose(on(res), 0.0, atol=1e-12 * scale)
  back = p_mat @ p_mat.T @ low if axis == 0 else low @ p_mat @ p_mat.T
  np.testing.assert_allclose(back, low, atol=1e-12 * scale)
  if r < p_dim:  # the check is not vacuous: both parts are non-zero
    assert np.linalg.norm(res) > 1e-3 and np.linalg.norm(low) > 1e-3
  else:  # full rank: I − PPᵀ = 0 and the residual is exactly zero
    assert not np.any(res)


def test_row_scaled_residual_would_break_orthogonality():
  # Why Alg. 4's statistic lives on the non-projected axis: scaling the residual
  # along the projected axis (the printed Alg. 4 row sums) mixes it into span(P).
  rng = np.random.default_rng(3)
  plan = leaves.plan({"w": jnp.zeros((6, 10))}, proj.svd(3))["w"]
  basis = plan.make_basis(jax.random.PRNGKey(0), 0, jnp.asarray(rng.normal(size=(6, 10))))
  g = jnp.asarray(rng.normal(size=(6, 10)))
  parts = jitted_parts(basis, g, jnp.zeros((3, 10)), jnp.zeros(3), jnp.zeros(10),
                       jnp.zeros(10), jnp.zeros([], jnp.int32))
  low, res = np.asarray(parts.low_rank), np.asarray(parts.residual)
  rows = np.diag(rng.uniform(0.2, 3.0, size=6))
  assert abs(np.sum(low * res)) < 1e-12 * np.linalg.norm(low) * np.linalg.norm(res)
  assert abs(np.sum(low * (rows @ res))) > 1e-2 * np.linalg.norm(low) * np.linalg.norm(res)


def test_update_is_low_rank_part_plus_delta_times_residual():
  delta = 0.7
  tx = am.scale_by_adamem(rank=3, refresh_every=2, delta=delta)
  grads = grad_stream(PARAMS, 5, seed=4)
  _, states, step = run(tx, PARAMS, grads[:4])
  # count 3: the next step keeps the projector; count 4: it makes a new one.
  for state_before in states[-2:]:
    g = grads[4]
    u, after = step(g, state_before, PARAMS)
    for name in ("wide", "tall"):
      parts = jitted_parts(
          after.bases[name], g[name], state_before.mu[name], state_before.nu_row[name],
          state_before.nu_col[name], state_before.nu_res[name], state_before.count,
      )
      np.testing.assert_allclose(u[name], parts.low_rank + delta * parts.residual,
                                 rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(after.mu[name], parts.mu, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(after.nu_res[name], parts.nu_res, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------
# The algorithm against a NumPy transcription of Alg. 1-4.


def factored(x, a, b, c2, eps):
  v = np.outer(a, b) / a.sum() / c2
  return x / (np.sqrt(v) + eps)


def clip(x, d, size=None):
  """Adafactor's update clipping; returns the clipped array and whether it acted."""
  if d is None:
    return x, False
  rms = np.sqrt(np.sum(x**2) / (x.size if size is None else size))
  return x / max(1.0, rms / d), rms > d


@pytest.mark.parametrize(
    "delta,statistics,clip_threshold",
    [
        (0.0, "momentum", None),   # Alg. 1-4 read literally, residual off
        (0.5, "momentum", None),   # ... with the residual
        (0.5, "gradient", 0.5),    # the default statistics, clipping that acts
    ],
)
def test_matches_numpy_reference_of_algorithms_1_to_4(delta, statistics, clip_threshold):
  b1, b2, eps, rank, period = 0.9, 0.95, 1e-8, 3, 3
  tx = am.scale_by_adamem(rank, period, b1, b2, delta, eps, statistics=statistics,
                          clip_threshold=clip_threshold)
  grads = grad_stream(PARAMS, 8, seed=1)
  outs, states, _ = run(tx, PARAMS, grads)
  ref = {}
  clipped = set()
  for t, (g, u, s) in enumerate(zip(grads, outs, states, strict=True), start=1):
    c1, c2 = 1 - b1**t, 1 - b2**t
    for name, left in (("wide", True), ("tall", False)):
      x = np.asarray(g[name]) if left else np.asarray(g[name]).T   # the paper's m <= n form
      if t == 1:
        ref[name] = dict(M=np.zeros((rank, x.shape[1])), a=np.zeros(rank),
                         b=np.zeros(x.shape[1]), c=np.zeros(x.shape[1]))
      st_ = ref[name]
      if (t - 1) % period == 0:  # Alg. 2: new projector from this step's gradient
        uu = np.linalg.svd(x)[0][:, :rank]
        mine = projector(s, name)
        overlap = uu.T @ mine
        np.testing.assert_allclose(np.abs(overlap), np.eye(rank), atol=1e-8)
        st_["P"] = uu * np.sign(np.diag(overlap))   # same vectors, the state's signs
      p = st_["P"]
      np.testing.assert_allclose(projector(s, name), p, atol=1e-8)
      r_t = p.T @ x
      res = x - p @ r_t
      st_["M"] = b1 * st_["M"] + (1 - b1) * r_t          # kept across refreshes
      mh = st_["M"] / c1
      src = r_t if statistics == "gradient" else mh
      st_["a"] = b2 * st_["a"] + (1 - b2) * (src**2).sum(1)
      st_["b"] = b2 * st_["b"] + (1 - b2) * (src**2).sum(0)
      st_["c"] = b2 * st_["c"] + (1 - b2) * (res**2).sum(0)
      x1, hit1 = clip(factored(mh, st_["a"], st_["b"], c2, eps), clip_threshold)
      n2, hit2 = clip(res / (np.sqrt(st_["c"] / x.shape[0] / c2) + eps), clip_threshold)
      clipped |= {"low rank"} if hit1 else set()
      clipped |= {"residual"} if hit2 else set()
      want = p @ x1 + delta * n2
      np.testing.assert_allclose(u[name], want if left else want.T, rtol=1e-9, atol=1e-11)
    # Leaves that are not projected: Adafactor without momentum, clipped.
    if t == 1:
      ref["bias"] = np.zeros(10)
      ref["conv"] = (np.zeros((3, 4)), np.zeros((3, 5)))
    gb = np.asarray(g["bias"])
    ref["bias"] = b2 * ref["bias"] + (1 - b2) * gb**2
    want, hit = clip(gb / (np.sqrt(ref["bias"] / c2) + eps), clip_threshold)
    clipped |= {"bias"} if hit else set()
    np.testing.assert_allclose(u["bias"], want, rtol=1e-10)
    gc = np.asarray(g["conv"])
    a, b = ref["conv"]
    a = b2 * a + (1 - b2) * (gc**2).sum(-1)
    b = b2 * b + (1 - b2) * (gc**2).sum(-2)
    ref["conv"] = (a, b)
    want, hit = clip(np.stack([factored(gc[i], a[i], b[i], c2, eps) for i in range(3)]),
                     clip_threshold)
    clipped |= {"conv"} if hit else set()
    np.testing.assert_allclose(u["conv"], want, rtol=1e-10)
  # The clipping case is not vacuous: every kind of part was clipped at least once.
  assert clipped == (set() if clip_threshold is None else {"low rank", "residual", "bias", "conv"})
  # Tolerances: float64 throughout; NumPy's and XLA's singular vectors agree to
  # ~1e-13 and the updates are O(1), observed differences ≤ 3e-14 absolute.


def test_gradient_statistics_step_like_adam_under_noise_where_momentum_statistics_do_not():
  # Why statistics="gradient" is the default: with the squared momentum as its
  # own second moment, AF(M̂) has RMS ~1 whatever the noise; with the projected
  # gradient's statistics the step shrinks as the noise grows, as Adam's does.
  rng = np.random.default_rng(11)
  signal = rng.normal(size=(16, 2)) @ rng.normal(size=(2, 24))
  params = {"w": jnp.zeros((16, 24))}

  def mean_coefficient_rms(statistics, sigma):
    tx = am.scale_by_adamem(2, 1000, delta=0.0, statistics=statistics, clip_threshold=None)
    grads = [{"w": jnp.asarray(signal + sigma * rng.normal(size=(16, 24)))} for _ in range(60)]
    outs, states, _ = run(tx, params, grads)
    p_mat = projector(states[-1], "w")
    return np.mean([np.sqrt(np.mean((p_mat.T @ np.asarray(u["w"]))**2)) for u in outs[30:]])

  # Measured: momentum statistics 0.91 / 0.82 at sigma 3 / 10 (a rank-1 fit of
  # M̂², so near 1 but not exactly); gradient statistics 0.54 / 0.24.
  lit = {s: mean_coefficient_rms("momentum", s) for s in (3.0, 10.0)}
  grad = {s: mean_coefficient_rms("gradient", s) for s in (3.0, 10.0)}
  assert min(lit.values()) > 0.7, lit            # ~1 per coefficient regardless of the noise
  assert grad[10.0] < 0.6 * grad[3.0], grad       # shrinks as the noise grows ...
  assert grad[10.0] < 0.5 * lit[10.0], (grad, lit)  # ... and is well below the literal reading


# ----------------------------------------------------------------------------
# State layout and memory.


@pytest.mark.parametrize(
    "dtype,mu_dtype", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float64, None),
                       (jnp.float32, jnp.bfloat16)]
)
def test_state_bytes_match_the_formula_and_hold_one_projector_per_leaf(dtype, mu_dtype):
  params = {
      "w": jnp.zeros((64, 32), dtype),
      "v": jnp.zeros((16, 48), dtype),
      "k": jnp.zeros((8, 8, 6), dtype),      # projected through reshape=1: view (8, 48)
      "b": jnp.zeros((32,), dtype),
      "s": jnp.zeros((), dtype),
  }
  tx = am.scale_by_adamem(rank=4, reshape=1, mu_dtype=mu_dtype)
  state = tx.init(params)
  got = sum(x.nbytes for x in jax.tree.leaves(state))
  assert got == am.adamem_state_bytes(params, 4, reshape=1, mu_dtype=mu_dtype)
  # The per-leaf formula by hand, float32 statistics, for w (p=32 projected, q=64):
  # p·r + q·r (momentum) + r + q (Alg. 3) + q (Alg. 4) floats.
  if dtype == jnp.float32 and mu_dtype is None:
    w_only = am.adamem_state_bytes({"w": params["w"]}, 4)
    assert w_only == 4 + 4 * (32 * 4 + 64 * 4 + 4 + 64 + 64)
  bases = jax.tree.leaves(state.bases, is_leaf=lambda x: isinstance(x, Basis))
  assert len(bases) == 3  # w, v, k; the vector and the scalar have none
  for basis in bases:
    (factor,) = [f for f in basis.factors if f is not None]
    assert factor.shape == (min(basis.view_shape), 4)
    assert factor.dtype == jnp.promote_types(dtype, jnp.float32)
  assert state.bases["b"] is None and state.mu["b"] is None and state.nu_res["s"] is None
  assert state.mu["w"].shape == (64, 4) and state.mu["v"].shape == (4, 48)


def test_memory_is_about_m_plus_n_times_r():
  # For a 1024 x 4096 leaf at rank 128 AdaMeM holds (m + n)·r + r + 2n floats:
  # ~0.16 of Adam's 2·m·n and only 2n + r more than GaLore-Adafactor's count.
  params = {"w": jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}
  got = am.adamem_state_bytes(params, 128)
  assert got == 4 + 4 * ((1024 + 4096) * 128 + 128 + 2 * 4096)
  assert got / (2 * 1024 * 4096 * 4) < 0.17


# ----------------------------------------------------------------------------
# Compilation, the refresh cond, wrappers, dtypes, errors.


def svd_sites(jaxpr, inside_cond=False, out=None):
  """For every svd primitive in a jaxpr (recursively): whether it sits inside a cond."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "svd":
      out.append(inside_cond)
    for sub in jaxprs_in_params(eqn.params):
      svd_sites(sub, inside_cond or eqn.primitive.name == "cond", out)
  return out


def test_jit_compiles_once_and_svd_runs_only_inside_the_refresh_cond():
  tx = am.adamem(0.01, rank=3, refresh_every=3)
  grads = grad_stream(PARAMS, 8, seed=5)
  outs, states, step = run(tx, PARAMS, grads)
  assert step._cache_size() == 1  # 8 steps, 3 refreshes, one compilation
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outs))
  state = tx.init(PARAMS)
  sites = svd_sites(jax.make_jaxpr(tx.update)(PARAMS, state, PARAMS).jaxpr)
  assert len(sites) == 2  # one per projected leaf ("wide", "tall")
  assert all(sites), "an SVD runs outside lax.cond"
  # The projector changes only at refresh steps (count 0, 3, 6).
  wides = [projector(s, "wide") for s in [x[0] for x in states]]
  for t in range(1, 8):
    same = np.array_equal(wides[t], wides[t - 1])
    assert same == (t % 3 != 0)


def loss_fn(w, x, y):
  return jnp.mean(jnp.square(x @ w["w"] + w["b"] - y))


def test_decreases_a_least_squares_loss_inside_a_chain():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(64, 10)))
  y = x @ jnp.asarray(rng.normal(size=(10, 6))) + 0.5
  params = {"w": jnp.zeros((10, 6)), "b": jnp.zeros((6,))}
  tx = optax.chain(optax.clip_by_global_norm(10.0), am.adamem(0.05, rank=2, refresh_every=20))
  state = tx.init(params)

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss_fn)(p, x, y)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss_fn(p, x, y)

  (params, _), losses = jax.lax.scan(body, (params, state), None, length=300)
  first, last = float(losses[0]), float(loss_fn(params, x, y))
  # Rank 2 of 6 columns carries momentum; the rest moves by the residual term.
  assert last < 1e-2 * first, (first, last)


def test_apply_if_finite_skips_a_nan_step_and_keeps_the_state():
  tx = optax.apply_if_finite(am.adamem(0.1, rank=2, refresh_every=2), max_consecutive_errors=3)
  grads = grad_stream(PARAMS, 2, seed=7)
  _, states, step = run(tx, PARAMS, grads)
  before = states[-1]  # count 2: the NaN step is also a refresh step
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[0])
  u, after = step(bad, before, PARAMS)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
  assert int(after.notfinite_count) == 1
  for x, y in zip(jax.tree.leaves(before.inner_state), jax.tree.leaves(after.inner_state),
                  strict=True):
    np.testing.assert_array_equal(x, y)
  # and the next finite step proceeds from the kept state
  u, after = step(grads[1], after, PARAMS)
  assert int(after.notfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(x))) and np.any(np.asarray(x))
             for x in jax.tree.leaves(u))


def test_bfloat16_params_give_bfloat16_updates():
  params = {"w": jnp.zeros((8, 12), jnp.bfloat16), "b": jnp.zeros((12,), jnp.bfloat16)}
  tx = am.adamem(1e-2, rank=3, refresh_every=2, weight_decay=0.01)
  grads = grad_stream(params, 3, seed=8)
  outs, states, _ = run(tx, params, grads)
  for u in outs:
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(u))
  inner = states[-1][0]
  assert projector(inner, "w").dtype == jnp.float32
  assert inner.mu["w"].dtype == jnp.float32 and inner.nu_res["w"].dtype == jnp.float32


def test_inject_hyperparams_with_a_static_rank():
  # refresh_every, b1, b2, delta, eps, weight_decay and the learning rate all
  # become arrays in the state; only the rank (a shape) must stay static.
  tx = optax.inject_hyperparams(am.adamem, static_args=("rank",))(
      learning_rate=0.01, rank=2, refresh_every=2, delta=0.5, clip_threshold=0.5
  )
  plain = am.adamem(0.01, rank=2, refresh_every=2, delta=0.5, clip_threshold=0.5)
  grads = grad_stream(PARAMS, 3, seed=9)
  outs, states, step = run(tx, PARAMS, grads)
  assert {"refresh_every", "b1", "b2", "delta", "eps", "clip_threshold", "weight_decay"} <= set(
      states[-1].hyperparams
  )
  assert step._cache_size() == 1
  want, _, _ = run(plain, PARAMS, grads)
  # inject_hyperparams stores the hyper-parameters as float32 arrays (b1 = 0.9 is
  # off by ~2e-8 relative), so the float64 runs differ at the ~1e-7 level.
  for a, b in zip(jax.tree.leaves(outs), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_state_structure_does_not_depend_on_the_options():
  # So that a checkpoint, optax.inject_hyperparams (which may or may not make
  # clip_threshold an array) and lax.cond branches see one structure.
  def structure(**kwargs):
    state = am.scale_by_adamem(rank=2, **kwargs).init(PARAMS)
    return jax.tree.structure(state), [(x.shape, x.dtype) for x in jax.tree.leaves(state)]

  want = structure()
  assert structure(statistics="momentum") == want
  assert structure(clip_threshold=None) == want
  assert structure(clip_threshold=jnp.asarray(0.5)) == want


def test_adamem_is_the_direction_plus_paper_weight_decay_times_the_learning_rate():
  params = grad_stream(PARAMS, 1, seed=12)[0]
  grads = grad_stream(PARAMS, 2, seed=13)
  # the paper's weight decay, given explicitly: the default is 0 as in every recipe
  got, _, _ = run(am.adamem(0.1, rank=2, refresh_every=5, weight_decay=0.01), params, grads)
  direction, _, _ = run(am.scale_by_adamem(rank=2, refresh_every=5), params, grads)
  for u, d in zip(got, direction, strict=True):
    want = jax.tree.map(lambda d, w: -0.1 * (d + 0.01 * w), d, params)  # weight decay 0.01
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.5), "b2"),
        (dict(delta=-1.0), "delta"),
        (dict(eps=-1e-8), "eps"),
        (dict(side="top"), "side"),
        (dict(statistics="adam"), "statistics"),
        (dict(clip_threshold=0.0), "clip_threshold"),
        (dict(clip_threshold=-1.0), "clip_threshold"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_them(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    am.scale_by_adamem(**kwargs)
  with pytest.raises(ValueError, match=f"`{name}`"):
    am.adamem(0.1, **kwargs)


def test_bad_where_names_the_leaf():
  tx = am.scale_by_adamem(rank=2, where={"w": True, "b": True})
  with pytest.raises(ValueError, match="leaf 'b' of shape \\(4,\\)"):
    tx.init({"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))})


@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    rank=st.integers(1, 6),
    side=st.sampled_from(["left", "right"]),
    residual_size=st.sampled_from([1.0, 1e-1, 1e-2]),
    delta=st.sampled_from([0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_two_gemm_update_equals_the_explicit_residual_in_float32(
    m, n, rank, side, residual_size, delta, seed
):
  # scale_by_adamem never forms S_t = (I − PPᵀ)G: it takes the column norms as
  # ‖G_j‖² − ‖R_j‖².  That difference cancels when G lies almost in span(P);
  # its float32 error is ~ε₃₂·‖G_j‖², i.e. relative ~1.2e-7/residual_size² in
  # ‖S_j‖² and half that in the scale.  At residual_size 1e-2 this is ≤ 1e-3, so
  # a 2e-3 relative tolerance on the whole update bounds it with margin.  Columns
  # whose residual is below residual_tolerance (3.5e-4 of ‖G_j‖²) are zero in
  # both forms; the two forms could disagree only for a column within ~1e-3
  # relative of that threshold.
  rng = np.random.default_rng(seed)
  plan = leaves.plan({"w": jnp.zeros((m, n), jnp.float32)}, proj.svd(rank, side),
                     where=True)["w"]  # projected even at full rank
  axis = 0 if plan.spec.axis_ranks(plan.view_shape)[0] is not None else 1
  p_dim, q = plan.view_shape[axis], plan.view_shape[1 - axis]
  r = min(rank, p_dim, q)
  p_mat = np.linalg.qr(rng.normal(size=(p_dim, r)))[0]
  in_span = p_mat @ rng.normal(size=(r, q))
  out_span = rng.normal(size=(p_dim, q))
  out_span -= p_mat @ (p_mat.T @ out_span)
  g = in_span + residual_size * out_span
  g = g if axis == 0 else g.T
  factors = [None, None]
  factors[axis] = jnp.asarray(p_mat, jnp.float32)
  basis = Basis(factors, plan.shape, plan.view_shape, plan.perm)
  a, b = plan.coefficient_shape
  stats = (
      jnp.asarray(rng.normal(size=(a, b)), jnp.float32),
      jnp.asarray(rng.uniform(0.1, 2.0, size=a), jnp.float32),
      jnp.asarray(rng.uniform(0.1, 2.0, size=b), jnp.float32),
      jnp.asarray(rng.uniform(0.0, 2.0, size=q) * residual_size**2, jnp.float32),
  )
  g = jnp.asarray(g, jnp.float32)
  parts = jitted_parts(basis, g, *stats, 3)
  update, new = jax.jit(am._adamem_update, static_argnames=("delta",))(
      basis, g, *stats, 3, b1=0.9, b2=0.95, eps=1e-8, delta=delta
  )
  want = np.asarray(parts.low_rank + delta * parts.residual, np.float64)
  err = np.linalg.norm(np.asarray(update, np.float64) - want)
  assert err <= 2e-3 * np.linalg.norm(want)
  np.testing.assert_allclose(new[3], parts.nu_res, rtol=2e-3, atol=1e-30)
  for got, ref in zip(new[:3], (parts.mu, parts.nu_row, parts.nu_col)):
    # the same float32 formulas, fused differently by XLA: a few ulps
    np.testing.assert_allclose(got, ref, rtol=1e-6)


@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    rank=st.integers(1, 12),
    side=st.sampled_from(["left", "right"]),
    inside=st.sampled_from([0.0, 0.5, 0.99, 0.9999, 1 - 1e-7, 1.0]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_step_is_bounded_for_a_gradient_anywhere_from_outside_to_inside_the_span(
    m, n, rank, side, inside, dtype, seed
):
  # A share `inside` of each gradient's squared norm lies in a fixed subspace of
  # dimension min(rank, p); at `inside` ≈ 1 the residual ‖G_j‖² − ‖R_j‖² is
  # cancellation error, which OS used to scale up to entries in the hundreds.
  # Three steps, a refresh at the third (new P from a later gradient).
  rng = np.random.default_rng(seed)
  p_dim, q = (m, n) if side == "left" else (n, m)
  r = min(rank, p_dim, q)
  basis = np.linalg.qr(rng.normal(size=(p_dim, p_dim)))[0]
  span, rest = basis[:, :r], basis[:, r:]
  grads = []
  for _ in range(3):
    a, b = span @ rng.normal(size=(r, q)), rest @ rng.normal(size=(p_dim - r, q))
    a, b = a / np.linalg.norm(a), b / max(np.linalg.norm(b), 1e-300)
    g = np.sqrt(inside) * a + np.sqrt(1 - inside) * b
    grads.append({"w": jnp.asarray(g if side == "left" else g.T, dtype)})
  params = {"w": jnp.zeros((m, n), dtype)}
  b2 = 0.95
  for clip_threshold in (1.0, None):
    # where=True: the bound must hold at full rank too, which the default leaves unprojected.
    tx = am.scale_by_adamem(rank, 2, b2=b2, clip_threshold=clip_threshold, side=side,
                            where=True)
    outs, states, _ = run(tx, params, grads)
    for t, (u, state) in enumerate(zip(outs, states, strict=True), start=1):
      u = np.asarray(u["w"], np.float64)
      assert np.all(np.isfinite(u))
      u = u if side == "left" else u.T
      p_mat = projector(state, "w").astype(np.float64)
      low, res = p_mat.T @ u, u - p_mat @ (p_mat.T @ u)
      # bfloat16 rounds the update by 2^-8 relative; float32 P is orthonormal to ~1e-6
      tol = 1.02 if dtype == jnp.bfloat16 else 1.001
      if clip_threshold is not None:
        # each part clipped to RMS ≤ 1: the coefficients over r·q, the residual over p·q
        assert np.sqrt(np.mean(low**2)) <= tol, (t, low)
        assert np.sqrt(np.sum(res**2) / (p_dim * q)) <= tol + 1e-3 * np.linalg.norm(low), t
      else:
        # Alg. 4 alone cannot blow up: c_j ≥ (1 − β2)‖S_j‖² bounds each residual column
        # by √(p·(1 − β2^t)/(1 − β2)); the 1e-3·‖low‖ allows for P's round-off
        bound = np.sqrt(p_dim * (1 - b2**t) / (1 - b2)) * tol * 1.03
        cols = np.linalg.norm(res, axis=0)
        assert np.all(cols <= bound + 1e-3 * np.linalg.norm(low)), (t, cols.max(), bound)
      if inside == 1.0 or r == p_dim:
        # nothing outside the subspace: the residual part is zero up to rounding of u
        assert np.linalg.norm(res) <= 1e-2 * (np.linalg.norm(low) + 1e-30) + 1e-6, t
