"""Tests of ``optax_lowrank.full_rank`` and the APOLLO / APOLLO-Mini / Fira recipes.

The recipes are checked, in float64 and over refreshes, against direct NumPy
transcriptions of the papers' update rules (Zhu et al. 2025, arXiv 2412.05270,
Alg. 1; Chen et al. 2024, arXiv 2410.01623, §3) fed with the library's bases:
random bases are rebuilt from the seed with the leaf plans, SVD bases are
read from the state.  Tolerances are float64 round-off (``1e-10`` relative).  Injected
hyper-parameters (the learning rate, ``scale``, ``limit``...) are checked for
every recipe by ``tests/test_optax_suite.py``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_lowrank as olr
from examples import checkpoint as ckpt_lib
from optax_lowrank import full_rank as fr

B1, B2, EPS = 0.9, 0.999, 1e-6
LR = 0.1
STACK = ((0,), (1,), (2,))
# Step scales chosen so that the limiter engages at some steps and not at others.
SCALES = (1.0, 4.0, 0.5, 3.0, 1.0, 6.0)


def _params():
  rng = np.random.default_rng(0)
  return {
      "w": jnp.asarray(rng.standard_normal((6, 10))),     # wide: left projection
      "t": jnp.asarray(rng.standard_normal((10, 6))),     # tall: right projection
      "s": jnp.asarray(rng.standard_normal((3, 6, 10))),  # a stack of 3 matrices
      "b": jnp.asarray(rng.standard_normal((4,))),        # not projected
  }


def _grads(params, steps=None):
  rng = np.random.default_rng(1)
  return [jax.tree.map(lambda x, c=c: jnp.asarray(c * rng.standard_normal(x.shape)), params)
          for c in SCALES[:steps or len(SCALES)]]


def _matrices(x):
  """A leaf as a list of matrices (one for 2-D leaves, one per index of a stack)."""
  x = np.asarray(x)
  return [x] if x.ndim == 2 else list(x)


def reference(grads, factors, *, residual, granularity, alpha, lr, gamma):
  """The papers' rule for one matrix, step by step, in NumPy.

  ``grads[t]`` is ``G_t`` (m×n); ``factors[t]`` the basis factor at step t and
  which side it projects.  APOLLO: ``R = P G``, Adam on R, ``s`` the ratio of
  norms of Adam's step to R (per channel or per matrix), ``G̃ = G·diag(s)``,
  norm-growth limiter on ``G̃``, ``W ← W − η·α·G̃``.  Fira: ``φ`` the same
  ratio, ``S = φ∘(G − Pᵀ R)``, limiter on S, ``W ← W − η·(α·Pᵀ ψ(R) + S)``.
  Returns the updates and, per step, whether the limiter engaged.
  """
  m = v = prev = None
  updates, engaged = [], []
  for t, (g, (side, u)) in enumerate(zip(grads, factors), 1):
    r = u.T @ g if side == "left" else g @ u
    m = (1 - B1) * r if m is None else B1 * m + (1 - B1) * r
    v = (1 - B2) * r * r if v is None else B2 * v + (1 - B2) * r * r
    step = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + EPS)
    axis = 0 if side == "left" else 1
    if granularity == "channel":  # the channels are the axis the projection keeps
      s = (np.linalg.norm(step, axis=axis, keepdims=True)
           / np.linalg.norm(r, axis=axis, keepdims=True))
    else:
      s = np.linalg.norm(step) / np.linalg.norm(r)
    if residual:
      back = u @ r if side == "left" else r @ u.T
      x = s * (g - back)
      low = u @ step if side == "left" else step @ u.T
    else:
      x, low = g * s, 0.0
    hit = prev is not None and gamma is not None and np.linalg.norm(x) > gamma * prev
    if hit:
      x = x * gamma * prev / np.linalg.norm(x)
    prev = np.linalg.norm(x)
    engaged.append(hit)
    updates.append(-lr * (alpha * low + x) if residual else -lr * alpha * x)
  return updates, engaged


def _random_factors(params, spec, seed, refresh_every, steps, reshape=STACK):
  """Per leaf, per step: the (side, factor) list of every matrix, rebuilt from the seed."""
  plans = olr.leaves.plan(params, spec, reshape=reshape)
  key = jax.random.PRNGKey(seed)
  out = {}
  for name, p in plans.items():
    if not p.projected:
      continue
    per_refresh = []
    for k in range((steps - 1) // refresh_every + 1):
      factors = p.make_basis(key, k, None).factors
      side = "left" if factors[0] is not None else "right"
      f = np.asarray(factors[0] if side == "left" else factors[1])
      per_refresh.append([(side, x) for x in ([f] if f.ndim == 2 else list(f))])
    out[name] = [per_refresh[t // refresh_every] for t in range(steps)]
  return out


def _run(tx, params, grads):
  state = tx.init(params)
  update = jax.jit(tx.update)
  updates, states = [], []
  for g in grads:
    u, state = update(g, state, params)
    updates.append(u)
    states.append(state)
  return updates, states


def _check_against_reference(updates, factors, grads, **rule):
  engaged = []
  for name, per_step in factors.items():
    n_mats = len(per_step[0])
    for i in range(n_mats):
      ref, hits = reference([_matrices(g[name])[i] for g in grads],
                            [fs[i] for fs in per_step], **rule)
      engaged += hits
      for t, (u, want) in enumerate(zip(updates, ref)):
        got = _matrices(u[name])[i]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12,
                                   err_msg=f"{name}[{i}] step {t}")
  return engaged


def _adam_reference(grads, name):
  tx = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
  p = {name: grads[0][name]}
  state = tx.init(p)
  out = []
  for g in grads:
    u, state = tx.update({name: g[name]}, state)
    out.append(np.asarray(u[name]))
  return out


def test_apollo_matches_the_paper(granularity="channel"):
  """Channel-wise (tensor-wise: APOLLO-Mini below and the rule's property test)."""
  params, grads = _params(), _grads(_params())
  tx = olr.apollo(LR, rank=3, refresh_every=2, scale=1.5, granularity=granularity,
                  seed=3, reshape=STACK)
  updates, _ = _run(tx, params, grads)
  factors = _random_factors(params, olr.gaussian(3), 3, 2, len(grads))
  engaged = _check_against_reference(updates, factors, grads, residual=False,
                                     granularity=granularity, alpha=1.5, lr=LR, gamma=1.01)
  assert any(engaged) and not all(engaged)  # the limiter both engages and stays off
  for want, u in zip(_adam_reference(grads, "b"), updates):  # unprojected: plain Adam
    np.testing.assert_allclose(u["b"], want, rtol=1e-12)


def test_apollo_mini_matches_the_paper():
  params, grads = _params(), _grads(_params())
  tx = olr.apollo_mini(LR, refresh_every=3, seed=1, reshape=STACK)
  updates, _ = _run(tx, params, grads)
  factors = _random_factors(params, olr.gaussian(1), 1, 3, len(grads))
  assert all(f.shape[-1] == 1 for fs in factors["w"] for _, f in fs)
  engaged = _check_against_reference(updates, factors, grads, residual=False,
                                     granularity="tensor", alpha=math.sqrt(128), lr=LR,
                                     gamma=1.01)
  assert any(engaged) and not all(engaged)


def test_fira_matches_the_paper(granularity="channel"):
  """Fira's column-wise factors (tensor-wise: the rule's property test)."""
  params, grads = _params(), _grads(_params())
  tx = olr.fira(LR, rank=2, refresh_every=2, granularity=granularity, reshape=STACK)
  updates, states = _run(tx, params, grads)
  factors = {}
  for name in ("w", "t", "s"):
    per_step = []
    for t, state in enumerate(states):
      f = state[0].bases[name].factors
      side = "left" if f[0] is not None else "right"
      f = np.asarray(f[0] if side == "left" else f[1])
      mats = [f] if f.ndim == 2 else list(f)
      if t % 2 == 0:  # a refresh: GaLore's top singular vectors of this gradient
        for g, u in zip(_matrices(grads[t][name]), mats):
          sv = np.linalg.svd(g)[0 if side == "left" else 2]
          top = sv[:, :2] if side == "left" else sv[:2].T
          np.testing.assert_allclose(u @ u.T, top @ top.T, atol=1e-10)
      per_step.append([(side, x) for x in mats])
    factors[name] = per_step
  engaged = _check_against_reference(updates, factors, grads, residual=True,
                                     granularity=granularity, alpha=0.25, lr=LR, gamma=1.01)
  assert any(engaged) and not all(engaged)


def test_without_limiter():
  params, grads = _params(), _grads(_params(), 4)
  tx = olr.apollo(LR, rank=3, refresh_every=2, limit=None, seed=0, reshape=STACK)
  updates, states = _run(tx, params, grads)
  assert states[-1][0].limiter is None
  factors = _random_factors(params, olr.gaussian(3), 0, 2, len(grads))
  _check_against_reference(updates, factors, grads, residual=False, granularity="channel",
                           alpha=1.0, lr=LR, gamma=None)


@settings(max_examples=6)  # each example compiles its own shapes
@given(
    m=st.integers(2, 7), n=st.integers(2, 7), rank=st.integers(1, 6),
    side=st.sampled_from(["left", "right"]), residual=st.booleans(),
    granularity=st.sampled_from(["channel", "tensor"]),
    kind=st.sampled_from(["gaussian", "svd"]), batch=st.sampled_from([(), (2,)]),
    last=st.floats(0.0, 3.0),
)
def test_rule_is_the_formula(m, n, rank, side, residual, granularity, kind, batch, last):
  """One step of a rule, any shape, rank, side and spec, equals the formula in NumPy."""
  rng = np.random.default_rng(m * 100 + n * 10 + rank)
  spec = (olr.gaussian if kind == "gaussian" else olr.svd)(rank, side)
  g = jnp.asarray(rng.standard_normal(batch + (m, n)))
  plans = olr.leaves.plan({"g": g}, spec, reshape=STACK if batch else None)
  p = plans["g"]
  if not p.projected:  # the clamped rank reached the smaller side
    return
  basis = p.make_basis(jax.random.PRNGKey(0), 0, g)
  c = olr.project(basis, g)
  u = jnp.asarray(rng.standard_normal(c.shape))
  rule = fr.FullRankRule(residual, granularity, 1.2)
  prev = jnp.full(batch, last)
  alpha = 0.3 + last  # any α > 0
  got, new_last = rule.apply(p, basis, g, c, u, prev, alpha)
  f = np.asarray(basis.factors[0] if side == "left" else basis.factors[1])
  for i in range(int(np.prod(batch, dtype=int))):
    gi, ci, ui = (np.asarray(x).reshape((-1,) + x.shape[-2:])[i] for x in (g, c, u))
    fi = f.reshape((-1,) + f.shape[-2:])[i]
    axis = 0 if side == "left" else 1
    keep = granularity == "channel"
    s = (np.linalg.norm(ui, axis=axis, keepdims=True) / np.linalg.norm(ci, axis=axis,
                                                                       keepdims=True)
         if keep else np.linalg.norm(ui) / np.linalg.norm(ci))
    back = (lambda x, fi=fi: fi @ x) if side == "left" else (lambda x, fi=fi: x @ fi.T)
    x = s * (gi - back(ci)) if residual else s * gi
    norm = np.linalg.norm(x)
    if last > 0 and norm > 1.2 * last:
      x = x * 1.2 * last / norm
    want = x + alpha * back(ui) if residual else alpha * x
    np.testing.assert_allclose(np.asarray(got).reshape((-1, m, n))[i], want,
                               rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(new_last).reshape(-1)[i], np.linalg.norm(x),
                               rtol=1e-9)


def test_state_bytes():
  shapes = {"w": (64, 96), "t": (96, 64), "s": (3, 64, 96), "b": (96,)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  r = 8
  mats = 1 + 1 + 3
  flora = olr.memory.state_bytes(olr.flora(1e-3, rank=r, reshape=STACK), params)
  apollo = olr.memory.state_bytes(olr.apollo(1e-3, rank=r, reshape=STACK), params)
  unlimited = olr.memory.state_bytes(olr.apollo(1e-3, rank=r, reshape=STACK, limit=None), params)
  # Flora's state exactly, plus one float32 per matrix for the limiter.
  assert unlimited.total == flora.total
  assert apollo.total == flora.total + 4 * mats
  assert apollo.by_leaf["s"]["inner"] == 3 * (2 * r * 96 * 4 + 4)
  mini = olr.memory.state_bytes(olr.apollo_mini(1e-3, reshape=STACK), params)
  for name, count in (("w", 1), ("t", 1), ("s", 3)):
    m, n = shapes[name][-2:]
    leaf = mini.by_leaf[name]
    assert leaf["projector"] == 0
    assert sum(leaf.values()) == count * (2 * max(m, n) * 4 + 4) <= count * 2 * (m + n) * 4
  assert mini.by_leaf["b"]["inner"] == 2 * 96 * 4  # Adam at full size
  fira = olr.memory.state_bytes(olr.fira(1e-3, rank=r, reshape=STACK), params)
  galore = olr.memory.state_bytes(olr.galore(1e-3, rank=r, reshape=STACK), params)
  assert fira.total == galore.total + 4 * mats


def test_eight_bit_inner_state():
  # 4 × 1024 coefficients: the smallest leaf 8-bit Adam quantizes (min_8bit_size=4096)
  params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((5, 1024)), jnp.float32)}
  g = jax.tree.map(lambda x: jnp.cos(3 * x), params)
  plain = olr.apollo(1e-2, rank=4)
  small = olr.apollo(1e-2, rank=4, eight_bit=True)
  a, b = olr.memory.state_bytes(plain, params), olr.memory.state_bytes(small, params)
  assert b.total < a.total / 3
  ua, _ = plain.update(g, plain.init(params), params)
  ub, _ = small.update(g, small.init(params), params)
  assert ub["w"].dtype == jnp.float32
  np.testing.assert_allclose(ub["w"], ua["w"], rtol=2e-2, atol=1e-6)  # 8-bit rounding


def test_where_and_bf16():
  params = {"a": jnp.ones((6, 10), jnp.bfloat16), "c": jnp.ones((6, 10), jnp.bfloat16),
            "s": jnp.ones((2, 6, 10), jnp.bfloat16)}
  grads = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32)
                                         .reshape(x.shape)).astype(x.dtype), params)
  for tx in (olr.apollo(1e-2, rank=2, where=lambda path, x: path[0] != "c", reshape=STACK),
             olr.fira(1e-2, rank=2, where=lambda path, x: path[0] != "c", reshape=STACK)):
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert state[0].limiter["c"] is None and state[0].limiter["s"].shape == (2,)
    assert state[0].limiter["a"].dtype == jnp.float32
    assert state[0].inner_state.mu["c"].shape == (6, 10)  # Adam at full size


def test_orbax_resume_is_bit_identical(tmp_path):
  """Fira: a stored SVD basis and the limiter's memory go through orbax (APOLLO's state
  is Flora's key-rebuilt kind, checkpointed in tests/test_checkpoint.py, plus the same
  limiter)."""
  name = "fira"
  params, grads = _params(), _grads(_params(), 4)
  kw = {"rank": 3, "refresh_every": 2, "reshape": STACK}
  tx = getattr(olr, name)(LR, **kw)
  step = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads:
    u_straight, state = step(g, state, params)
  straight = state
  state = tx.init(params)
  for g in grads[:2]:
    _, state = step(g, state, params)
  with ckpt_lib.Checkpointer(tmp_path) as ck:
    ck.save(2, state, {"method": name})
  with ckpt_lib.Checkpointer(tmp_path) as ck:
    state, _ = ck.restore(ckpt_lib.abstract_like(tx.init(params)))
  for g in grads[2:]:
    u_resumed, state = step(g, state, params)
  assert jax.tree.structure(state) == jax.tree.structure(straight)
  for a, b in zip(jax.tree.leaves((u_resumed, state)), jax.tree.leaves((u_straight, straight)),
                  strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="granularity"):
    olr.apollo(1e-3, granularity="row")
  with pytest.raises(ValueError, match="limit"):
    olr.fira(1e-3, limit=0.9)
  with pytest.raises(ValueError, match="kind"):
    olr.apollo(1e-3, kind="uniform")
  with pytest.raises(TypeError, match="full_rank"):
    olr.low_rank(optax.adam(1e-3), olr.gaussian(2), full_rank="apollo")
  with pytest.raises(ValueError, match="track_coefficients"):
    olr.low_rank(optax.adam(1e-3), olr.gaussian(2), full_rank=fr.scaled_gradient(),
                 track_coefficients=True)
  tx = olr.low_rank(optax.scale_by_adam(), olr.two_sided(2, 2),
                    full_rank=fr.scaled_residual("channel"))
  with pytest.raises(ValueError, match=r"leaf 'w' of shape \(6, 10\).*full_rank.*tensor"):
    tx.init({"w": jnp.ones((6, 10))})
  # tensor-wise serves every projection
  tx = olr.low_rank(optax.scale_by_adam(), olr.two_sided(2, 2),
                    full_rank=fr.scaled_residual("tensor"))
  w = {"w": jnp.ones((6, 10))}
  u, _ = jax.eval_shape(tx.update, w, tx.init(w))
  assert u["w"].shape == (6, 10)
