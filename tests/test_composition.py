"""low_rank and the recipes inside optax's wrappers, jit, scan and pmap.

Modelled on the checks optax applies to every optimizer
(optax/contrib/_common_test.py): extra args, inject_hyperparams, dtype
preservation and stability, MultiSteps, tree_map_params, convergence under
lax.scan.
"""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowrank as olr

RECIPES = {
    "galore": lambda **kw: olr.galore(kw.pop("learning_rate", 0.05), rank=2, refresh_every=5, **kw),
    "flora": lambda **kw: olr.flora(kw.pop("learning_rate", 0.05), rank=2, refresh_every=5, **kw),
}


def _params(dtype=jnp.float32):
  return {"w": jnp.full((6, 4), 0.5, dtype), "b": jnp.full((4,), -0.5, dtype)}


def _loss(params):
  # a least-squares problem whose optimum (w = A, b = c) has rank 2 structure
  a = jnp.outer(jnp.arange(6.0), jnp.ones(4)) / 6 + jnp.outer(jnp.ones(6), jnp.arange(4.0)) / 4
  c = jnp.linspace(-1, 1, 4)
  return jnp.sum((params["w"] - a.astype(params["w"].dtype)) ** 2) + jnp.sum(
      (params["b"] - c.astype(params["b"].dtype)) ** 2)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_converge_under_scan(name):
  opt = RECIPES[name](learning_rate=0.05)
  params = _params(jnp.float64)

  def step(carry, _):
    p, s = carry
    g = jax.grad(_loss)(p)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), _loss(p)

  (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), length=600)
  assert losses[-1] < 1e-3 * losses[0]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tree_map_params_is_a_no_op_map(name):
  opt = RECIPES[name]()
  state = opt.init(_params())
  mapped = optax.tree.map_params(opt, lambda v: v, state)
  chex.assert_trees_all_equal(mapped, state)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_inject_hyperparams_gives_the_same_updates(name):
  factory = {"galore": olr.galore, "flora": olr.flora}[name]
  hp = dict(learning_rate=0.1, rank=2, refresh_every=3, scale=0.5, b1=0.8, weight_decay=0.01)
  opt = factory(**hp)
  inj = optax.inject_hyperparams(factory, static_args=("rank",))(**hp)
  params = _params()
  grads = jax.grad(_loss)(params)
  s, si = opt.init(params), inj.init(params)
  for _ in range(4):
    u, s = jax.jit(opt.update)(grads, s, params)
    ui, si = jax.jit(inj.update)(grads, si, params)
    # rtol as optax uses: injected hyper-parameters are float32 arrays, not Python floats
    chex.assert_trees_all_close(u, ui, rtol=1e-5)
  assert float(si.hyperparams["scale"]) == 0.5


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64])
def test_dtype_preserved_and_state_dtype_stable(name, dtype):
  opt = RECIPES[name]()
  params = _params(dtype)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    g = jax.grad(_loss)(params)
    # lax.cond forces both branches to agree on the state's dtypes
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    u, state = jax.lax.cond(cond, lambda: opt.update(g, state, params), lambda: (params, state))
    return optax.apply_updates(params, u), state

  for _ in range(2):
    params, state = step(params, state)
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_multisteps_accumulates_then_applies(name):
  opt = optax.MultiSteps(RECIPES[name](), every_k_schedule=4)
  params = _params()
  state = opt.init(params)
  grads = jax.grad(_loss)(params)
  for i in range(4):
    u, state = jax.jit(opt.update)(grads, state, params)
    if i < 3:
      chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, grads))
  # the 4th call applies one step on the mean gradient: same as one plain step
  u_plain, _ = RECIPES[name]().update(grads, RECIPES[name]().init(params), params)
  chex.assert_trees_all_close(u, u_plain, rtol=1e-5, atol=1e-7)


def test_masked_low_rank_leaves_other_leaves_alone():
  opt = optax.masked(olr.low_rank(optax.scale_by_adam(), olr.svd(2)), {"w": True, "b": False})
  params = _params()
  grads = jax.grad(_loss)(params)
  u, state = opt.update(grads, opt.init(params), params)
  chex.assert_trees_all_equal(u["b"], grads["b"])
  assert u["w"].shape == (6, 4)


@pytest.mark.parametrize("spec", [olr.svd(2), olr.gaussian(2)])
def test_apply_if_finite_leaves_the_state_untouched_on_a_skipped_step(spec):
  opt = optax.apply_if_finite(olr.low_rank(optax.scale_by_adam(), spec, refresh_every=2), 3)
  params = _params()
  grads = jax.grad(_loss)(params)
  state = opt.init(params)
  for _ in range(2):  # the next step (count 2) is a refresh step
    _, state = opt.update(grads, state, params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  u, skipped = jax.jit(opt.update)(bad, state, params)
  chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
  assert int(skipped.notfinite_count) == 1
  chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, grads))
  # a finite step afterwards behaves as if the bad one never happened
  u1, _ = opt.update(grads, skipped, params)
  u2, _ = opt.update(grads, state, params)
  chex.assert_trees_all_close(u1, u2)


def test_chain_with_clipping_and_schedule_compiles_once():
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 20)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    olr.low_rank(optax.scale_by_adam(), olr.svd(2), refresh_every=4),
                    optax.scale_by_learning_rate(sched))
  params = _params()
  state = opt.init(params)
  step = jax.jit(lambda p, s: opt.update(jax.grad(_loss)(p), s, p))
  for _ in range(10):
    u, state = step(params, state)
    params = optax.apply_updates(params, u)
  assert step._cache_size() == 1


PMAP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    import optax_lowrank as olr
    assert jax.device_count() == 4, jax.devices()
    opt = olr.galore(0.05, rank=2, refresh_every=3)
    params = {"w": jnp.linspace(-1, 1, 24).reshape(6, 4), "b": jnp.zeros(4)}
    data = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 6)))

    def loss(p, x):
      return jnp.mean((x @ p["w"] + p["b"] - 1.0) ** 2)

    def step(p, s, x):
      g = jax.lax.pmean(jax.grad(loss)(p, x), "d")
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    pstep = jax.pmap(step, axis_name="d")
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * 4), t)
    p, s = rep(params), rep(opt.init(params))
    sp, ss = params, opt.init(params)
    for _ in range(7):
      p, s = pstep(p, s, data)
      g = jax.grad(lambda q: jnp.mean(jnp.stack([loss(q, x) for x in data])))(sp)
      u, ss = opt.update(g, ss, sp)
      sp = optax.apply_updates(sp, u)
    for k in params:
      np.testing.assert_allclose(p[k][0], sp[k], atol=1e-5)
      np.testing.assert_allclose(p[k][3], p[k][0], atol=0)
    print("PMAP_OK")
    """
)


def test_pmap_on_four_host_devices_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", PMAP_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
  assert "PMAP_OK" in out.stdout, out.stderr[-3000:]
