"""woodbury_precondition / woodbury_solve: exactness, per-leaf independence,
float32 robustness, jit, optax composition, clearing at a low-rank refresh and
input errors.

Exactness tests run in float64 (enabled for the session by conftest; repeated
here so the module stands alone).  Robustness tests build float32 arrays
explicitly and compare with float64 NumPy on the same float32 data.
"""

import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import optax_lowrank as olr  # noqa: E402
from optax_lowrank.woodbury import (  # noqa: E402
  woodbury_precondition,
  woodbury_solve,
)

# One tree shared by several tests so that they share compilations.
TREE = {
    "w": jnp.zeros((3, 4)),
    "scalar": jnp.zeros(()),
    "deep": [jnp.zeros((2, 3, 2))],
    "w32": jnp.zeros((7,), jnp.float32),  # a second dtype group
}

solve = jax.jit(woodbury_solve, static_argnames=("refine", "g_in_history"))


def numpy_natural_gradient(window, g, lam):
  """Explicit float64 solve of (λI + GGᵀ) x = g, G's columns = `window`."""
  g = np.asarray(g, np.float64).reshape(-1)
  big_g = np.stack([np.asarray(w, np.float64).reshape(-1) for w in window], axis=1)
  f = lam * np.eye(g.size) + big_g @ big_g.T
  return np.linalg.solve(f, g)


def rel_err(x, ref):
  x = np.asarray(x, np.float64).reshape(-1)
  ref = np.asarray(ref, np.float64).reshape(-1)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@functools.cache
def jitted_update(s, refine=True):
  """One compiled update per (s, refine) and input shapes; λ is an argument
  (traced, so not validated), which lets tests share compilations."""

  def update(g, state, lam):
    return woodbury_precondition(s, lam, refine=refine).update(g, state)

  return jax.jit(update)


def run_stream(s, lam, grads, refine=True):
  """Feeds `grads` (a list of trees) through woodbury_precondition(s, lam)."""
  state = woodbury_precondition(s, lam).init(jax.tree.map(jnp.zeros_like, grads[0]))
  update = jitted_update(s, refine)
  outs, states = [], []
  for g in grads:
    u, state = update(g, state, jnp.asarray(lam))
    outs.append(u)
    states.append(state)
  return outs, states


# --------------------------------------------------------------------------
# exactness (float64)


@settings(max_examples=12, deadline=None)
@given(
    s=st.sampled_from([1, 4]),
    shape=st.sampled_from([(7,), (3, 4)]),
    extra=st.integers(1, 6),
    log_damping=st.floats(-2.0, 1.0),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_every_step_matches_explicit_numpy_solve(s, shape, extra, log_damping, scale, seed):
  # A stream longer than the history, so the ring wraps.  Tolerance: with
  # N(0, scale²) gradients, k ≤ 12, s ≤ 4 and λ ≥ 1e-2, cond(F) ≤ ~1e5, so both
  # this implementation and the explicit k×k solve are accurate to
  # cond·eps64 ≈ 1e-11; 1e-10 leaves a small margin.
  lam = 10.0**log_damping
  rng = np.random.default_rng(seed)
  steps = s + extra
  grads = [jnp.asarray(scale * rng.standard_normal(shape)) for _ in range(steps)]
  outs, states = run_stream(s, lam, grads)
  for t, (g, u, state) in enumerate(zip(grads, outs, states, strict=True)):
    window = grads[max(0, t + 1 - s): t + 1]
    ref = numpy_natural_gradient(window, g, lam)
    assert u.shape == g.shape and u.dtype == g.dtype
    assert rel_err(u, ref) <= 1e-10
    # the incrementally kept Gram matrix equals a recomputation
    h = np.asarray(state.history)
    np.testing.assert_allclose(state.gram, h @ h.T, rtol=1e-12, atol=1e-12 * scale**2)
    assert int(state.count) == t + 1


def test_first_step_closed_form_and_empty_slots():
  # One stored gradient: F⁻¹g = g / (λ + ‖g‖²); the s−1 empty (zero) slots
  # must not change anything.
  g = jnp.asarray([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 0.25])
  (u,), (state,) = run_stream(4, 0.3, [g])
  np.testing.assert_allclose(u, g / (0.3 + float(g @ g)), rtol=1e-14)
  np.testing.assert_array_equal(np.asarray(state.history)[1:], 0.0)


def test_gram_kept_incrementally_matches_recomputation_float32_long_stream():
  # 60 steps with s = 4 (fifteen wraps): each Gram entry is recomputed whenever
  # one of its two rows is replaced, so no error accumulates; it must equal a
  # fresh float32 HHᵀ to within the rounding of one length-k dot product.
  rng = np.random.default_rng(3)
  grads = [jnp.asarray(rng.standard_normal(7), jnp.float32) for _ in range(60)]
  _, states = run_stream(4, 1e-2, grads)
  for state in states[::7] + [states[-1]]:
    h = np.asarray(state.history, np.float64)
    gram = np.asarray(state.gram, np.float64)
    np.testing.assert_allclose(gram, h @ h.T, atol=1e-5 * np.max(np.diag(h @ h.T)))
    np.testing.assert_array_equal(gram, gram.T)


def tree_grads(steps, seed):
  rng = np.random.default_rng(seed)
  return [
      jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), TREE)
      for _ in range(steps)
  ]


def test_leaves_are_independent():
  grads = tree_grads(7, seed=7)
  outs, _ = run_stream(4, 0.05, grads)
  for path, leaf in jax.tree_util.tree_leaves_with_path(TREE):
    def pick(tree, path=path):
      return functools.reduce(lambda t, key: t[getattr(key, "key", getattr(key, "idx", None))],
                              path, tree)

    alone, _ = run_stream(4, 0.05, [pick(g) for g in grads])
    tol = 1e-6 if leaf.dtype == jnp.float32 else 1e-12
    for u, v in zip(outs, alone, strict=True):
      np.testing.assert_allclose(pick(u), v, rtol=tol, atol=tol * 1e-3)


# --------------------------------------------------------------------------
# float32 robustness


@jax.jit
def naive_float32(history_rows, g, lam):
  """The paper's formula verbatim in float32: (g − G S⁻¹ Gᵀ g)/λ."""
  h = jnp.asarray(history_rows, jnp.float32)
  g = jnp.asarray(g, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  s_mat = lam * jnp.eye(h.shape[0], dtype=jnp.float32) + h @ h.T
  z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(s_mat), h @ g)
  return (g - h.T @ z) / lam


def test_float32_mixed_scales_match_float64():
  # Scales 1e-6..1e3 inside one history (random order, 24 steps, s = 8).
  # Tolerance 1e-4: the float32 solve works on the unit-diagonal equilibrated
  # system, whose condition for independent random directions is O(10), so
  # the expected error is a few s·eps32 ≈ 1e-6 (measured ≤ ~2e-6); the float64
  # reference itself is good to ~1e-6 here (cond(F) ~ 1e11).  The textbook
  # formula in float32 is off by orders of magnitude on the same data.
  rng = np.random.default_rng(11)
  k, s, lam = 64, 8, 1e-3
  scales = 10.0 ** rng.permutation(np.linspace(-6, 3, 24))
  grads = [jnp.asarray(sc * rng.standard_normal(k), jnp.float32) for sc in scales]
  outs, states = run_stream(s, lam, grads)
  naive_errors = []
  for t, (g, u) in enumerate(zip(grads, outs, strict=True)):
    ref = numpy_natural_gradient(grads[max(0, t + 1 - s): t + 1], g, lam)
    assert u.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(u)))
    assert rel_err(u, ref) <= 1e-4, (t, rel_err(u, ref))
    if t >= s:
      naive = naive_float32(states[t].history, g, lam)
      naive_errors.append(rel_err(naive, ref) if np.all(np.isfinite(naive)) else np.inf)
  assert max(naive_errors) > 1e-2  # the scenario really is hard


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 1e3])
def test_float32_repeated_gradient(scale):
  # The same g every step: GᵀG has rank one.  With m stored copies the exact
  # answer is g / (λ + m‖g‖²) (computed in float64 from the float32 g).  Exact
  # duplicates are folded into one column, so this is a 1×1 problem and the
  # float32 result is good to a few eps32; tolerance 1e-5.  The textbook
  # formula gives NaN (indefinite S) or garbage at the larger scales.
  rng = np.random.default_rng(5)
  k, s, lam = 64, 8, 1e-3
  g = jnp.asarray(scale * rng.standard_normal(k), jnp.float32)
  outs, states = run_stream(s, lam, [g] * (2 * s + 1))
  g64 = np.asarray(g, np.float64)
  for t, u in enumerate(outs):
    m = min(t + 1, s)
    exact = g64 / (lam + m * (g64 @ g64))
    assert bool(jnp.all(jnp.isfinite(u)))
    assert rel_err(u, exact) <= 1e-5, (t, rel_err(u, exact))
  if scale >= 1.0:
    naive = naive_float32(states[-1].history, g, lam)
    assert not np.all(np.isfinite(naive)) or rel_err(naive, exact) > 1e-2


def test_float32_repeated_gradient_among_others():
  # Copies of one gradient interleaved with independent ones.
  rng = np.random.default_rng(8)
  k, s, lam = 64, 8, 1e-3
  g = jnp.asarray(30.0 * rng.standard_normal(k), jnp.float32)
  grads = []
  for t in range(14):
    grads.append(g if t % 3 else jnp.asarray(rng.standard_normal(k), jnp.float32))
  outs, _ = run_stream(s, lam, grads)
  for t, (x, u) in enumerate(zip(grads, outs, strict=True)):
    ref = numpy_natural_gradient(grads[max(0, t + 1 - s): t + 1], x, lam)
    assert rel_err(u, ref) <= 1e-4, (t, rel_err(u, ref))


def test_float32_nearly_parallel_gradients():
  # g + 1e-2·noise: GᵀG is nearly singular and λ = 1e-3 is tiny next to ‖g‖².
  # The exact answer amplifies the small differences; perturbing the float32
  # data by one rounding unit moves it by ~1e-5 (measured), so no float32
  # method can promise much better.  Tolerance 1e-3 (measured ~1e-5).
  rng = np.random.default_rng(9)
  k, s, lam = 64, 8, 1e-3
  base = rng.standard_normal(k)
  grads = [jnp.asarray(base + 1e-2 * rng.standard_normal(k), jnp.float32) for _ in range(12)]
  outs, _ = run_stream(s, lam, grads)
  for t, (g, u) in enumerate(zip(grads, outs, strict=True)):
    ref = numpy_natural_gradient(grads[max(0, t + 1 - s): t + 1], g, lam)
    assert rel_err(u, ref) <= 1e-3, (t, rel_err(u, ref))


@pytest.mark.parametrize("refine", [True, False])
def test_float32_extreme_damping_stays_finite_bounded_and_descending(refine):
  # λ = 1e-8 next to gradients of norm ~1e4 that are nearly parallel: the
  # exact answer is not determined by float32 data, but what F⁻¹ guarantees
  # must hold: finite, ‖F⁻¹g‖ ≤ ‖g‖/λ and gᵀF⁻¹g > 0 (a descent direction).
  rng = np.random.default_rng(10)
  k, s, lam = 64, 8, 1e-8
  base = 1e3 * rng.standard_normal(k)
  grads = [jnp.asarray(base * (1 + 1e-6 * rng.standard_normal(k)), jnp.float32)
           for _ in range(12)]
  outs, _ = run_stream(s, lam, grads, refine=refine)
  for g, u in zip(grads, outs, strict=True):
    g64, u64 = np.asarray(g, np.float64), np.asarray(u, np.float64)
    assert np.all(np.isfinite(u64))
    assert np.linalg.norm(u64) <= np.linalg.norm(g64) / lam * (1 + 1e-3)
    assert g64 @ u64 > 0


def test_bfloat16_gradients_keep_a_float32_history():
  rng = np.random.default_rng(12)
  params = {"w": jnp.zeros((3, 4), jnp.bfloat16)}
  grads = [{"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.bfloat16)} for _ in range(6)]
  state = woodbury_precondition(4, 0.1).init(params)
  assert state.history["w"].dtype == jnp.float32 and state.history["w"].shape == (4, 12)
  outs, _ = run_stream(4, 0.1, grads)
  assert outs[-1]["w"].dtype == jnp.bfloat16
  ref = numpy_natural_gradient([g["w"].astype(jnp.float32) for g in grads[-4:]],
                               grads[-1]["w"].astype(jnp.float32), 0.1)
  assert rel_err(outs[-1]["w"].astype(jnp.float32), ref) <= 1e-2  # bfloat16 output


# --------------------------------------------------------------------------
# woodbury_solve


def test_woodbury_solve_general_and_history_rows():
  rng = np.random.default_rng(13)
  h = rng.standard_normal((4, 9))
  h[3] = 0.0  # an empty slot
  gram = jnp.asarray(h @ h.T)
  lam = 0.2
  g_out = rng.standard_normal(9)  # not in the history: Woodbury form
  ref = numpy_natural_gradient(list(h), g_out, lam)
  assert rel_err(solve(h, g_out, lam), ref) <= 1e-12
  assert rel_err(solve(h, g_out, lam, gram=gram, g_in_history=False), ref) <= 1e-12
  g_in = h[1]  # a history row: push-through form
  ref = numpy_natural_gradient(list(h), g_in, lam)
  assert rel_err(solve(h, g_in, lam), ref) <= 1e-11
  assert rel_err(solve(h, g_in, lam, gram=gram, g_in_history=False), ref) <= 1e-11
  # g of any shape with k elements; the push-through path with and without
  # the refinement step
  for refine in (True, False):
    y = solve(h, g_in.reshape(3, 3), lam, gram=gram, g_in_history=True, refine=refine)
    assert y.shape == (9,) and rel_err(y, ref) <= 1e-11


def test_zero_gradients_and_an_indefinite_gram_stay_finite():
  # zero gradients: every slot equal to g, F⁻¹0 = 0
  outs, _ = run_stream(4, 0.1, [jnp.zeros(7)] * 6)
  for u in outs:
    np.testing.assert_array_equal(u, 0.0)
  # a Gram matrix made badly indefinite on purpose (not a Gram matrix at all):
  # the low floors cannot be factorised, the last one always can
  rng = np.random.default_rng(20)
  h = rng.standard_normal((4, 9))
  bad = h @ h.T - 0.5 * np.max(np.diag(h @ h.T)) * np.eye(4)
  bad = jnp.asarray(bad)
  y = solve(h, h[1].reshape(3, 3), 0.2, gram=bad, g_in_history=True, refine=True)
  assert np.all(np.isfinite(y))
  y = solve(h, rng.standard_normal(9), 0.2, gram=bad, g_in_history=False)
  assert np.all(np.isfinite(y))


def test_transformation_agrees_with_woodbury_solve_on_its_state():
  rng = np.random.default_rng(14)
  grads = [jnp.asarray(rng.standard_normal(7), jnp.float32) for _ in range(7)]
  outs, states = run_stream(4, 0.01, grads)
  for g, u, state in zip(grads, outs, states, strict=True):
    np.testing.assert_allclose(u, solve(state.history, g, 0.01), rtol=1e-5, atol=1e-7)


def test_woodbury_solve_shape_errors():
  with pytest.raises(ValueError, match="history_matrix"):
    woodbury_solve(jnp.ones(5), jnp.ones(5), 0.1)
  with pytest.raises(ValueError, match="elements"):
    woodbury_solve(jnp.ones((3, 5)), jnp.ones(4), 0.1)


# --------------------------------------------------------------------------
# jit, chain, inject_hyperparams


def test_jit_traces_once_over_many_steps():
  traces = []
  tx = woodbury_precondition(4, 0.1)

  def step(g, state):
    traces.append(None)  # runs only while tracing
    return tx.update(g, state)

  step = jax.jit(step)
  state = tx.init(TREE)
  for g in tree_grads(13, seed=15):  # three wraps of the ring
    _, state = step(g, state)
  assert len(traces) == 1
  assert int(state.count) == 13


CHAIN = optax.chain(woodbury_precondition(4, 0.5), optax.scale(-0.1))
chain_update = jax.jit(CHAIN.update)


def test_in_chain():
  grads = tree_grads(6, seed=16)
  state = CHAIN.init(TREE)
  alone, _ = run_stream(4, 0.5, grads)
  for g, v in zip(grads, alone, strict=True):
    u, state = chain_update(g, state)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
      np.testing.assert_allclose(x, -0.1 * np.asarray(y), rtol=1e-6)


def test_inject_hyperparams_damping():
  rng = np.random.default_rng(17)
  grads = [jnp.asarray(rng.standard_normal(7)) for _ in range(6)]
  tx = optax.inject_hyperparams(woodbury_precondition, static_args=("history",))(
      history=4, damping=0.1
  )
  state = tx.init(grads[0])
  update = jax.jit(tx.update)
  low, _ = run_stream(4, 0.1, grads)
  high, _ = run_stream(4, 0.7, grads)
  for t, g in enumerate(grads):
    if t == 3:
      state.hyperparams["damping"] = jnp.asarray(0.7)
    u, state = update(g, state)
    np.testing.assert_allclose(u, (low if t < 3 else high)[t], rtol=1e-12)


def test_inject_hyperparams_without_static_history_is_a_clear_error():
  tx = optax.inject_hyperparams(woodbury_precondition)(history=3, damping=0.1)
  state = tx.init(jnp.zeros(4))
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.update)(jnp.ones(4), state)


# --------------------------------------------------------------------------
# inside low_rank: a refresh clears the history


def test_a_low_rank_refresh_clears_the_history_and_restarts_it():
  # The stored gradients are coefficients in the old basis: after a refresh the
  # history holds only the newest gradient, as a fresh state would, even under
  # "keep" (which leaves every other statistic as it is).
  inner = woodbury_precondition(4, 0.2)
  tx = olr.low_rank(inner, olr.semi_orthogonal(2, side="right"), refresh_every=3)
  params = {"w": jnp.zeros((5, 6))}
  rng = np.random.default_rng(19)
  grads = [{"w": jnp.asarray(rng.standard_normal((5, 6)))} for _ in range(4)]
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads[:3]:
    _, state = update(g, state, params)
  assert int(jnp.sum(jnp.any(state.inner_state.history["w"] != 0, axis=1))) == 3
  _, state = update(grads[3], state, params)  # step 3: a refresh
  coefficients = olr.project(state.bases["w"], grads[3]["w"])
  _, fresh = jax.jit(lambda c: inner.update(c, inner.init(c)))({"w": coefficients})
  history, gram = state.inner_state.history["w"], state.inner_state.gram["w"]
  slot = 3 % 4  # the ring position continues
  np.testing.assert_allclose(history[slot], fresh.history["w"][0], rtol=1e-12, atol=0)
  np.testing.assert_array_equal(np.delete(np.asarray(history), slot, axis=0), 0.0)
  np.testing.assert_allclose(gram[slot, slot], fresh.gram["w"][0, 0], rtol=1e-12, atol=0)
  np.testing.assert_array_equal(np.asarray(gram).sum() - gram[slot, slot], 0.0)


# --------------------------------------------------------------------------
# input errors


@pytest.mark.parametrize("history", [0, -2, 2.5, True, "3", None])
def test_bad_history(history):
  with pytest.raises(ValueError, match="history"):
    woodbury_precondition(history, 1e-3)


@pytest.mark.parametrize(
    "damping", [0.0, -1e-3, float("nan"), float("inf"), np.float32(-1.0), [1e-3, 1e-2], "x"]
)
def test_bad_damping(damping):
  with pytest.raises(ValueError, match="damping"):
    woodbury_precondition(4, damping)


def test_concrete_array_damping_is_accepted_and_validated():
  woodbury_precondition(4, jnp.asarray(1e-3))
  with pytest.raises(ValueError, match="damping"):
    woodbury_precondition(4, jnp.asarray(-1e-3))


def test_complex_leaves_are_rejected():
  with pytest.raises(TypeError, match="real"):
    woodbury_precondition(2, 0.1).init(jnp.zeros(3, jnp.complex64))
