"""Stacked (scanned) leaves: each index of the batch axes is its own matrix.

A ``(L, m, n)`` leaf with the rule ``((0,), (1,), (2,))`` must behave exactly
as ``L`` separate ``m × n`` leaves: same bases (SVD bases are deterministic),
same updates, same inner statistics, under every refresh policy, on both paths.
Float64 throughout: the two computations do the same arithmetic in a
different batching, so they agree to round-off (``1e-12`` on O(1) values).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import optax_lowrank as olr
from examples.llama import STACKED_RULE, Llama, LlamaConfig, loss_fn
from optax_lowrank import adapters

RULE = ((0,), (1,), (2,))
L, M, N = 3, 12, 8


def _grads(t, shape=(L, M, N)):
  return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), t), shape, jnp.float64)


def _run(tx, params, grads_of, steps):
  """Updates of ``steps`` steps, with the weights moving as a train loop moves them."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for t in range(steps):
    updates, state = update(grads_of(t), state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


def _stacked_vs_separate(make_tx, steps=7):
  w = jax.random.normal(jax.random.PRNGKey(0), (L, M, N), jnp.float64)
  bias = jnp.linspace(-1.0, 1.0, N, dtype=jnp.float64)
  stacked = {"w": w, "b": bias}
  separate = {"b": bias, **{f"w{i}": w[i] for i in range(L)}}
  ups_s, _ = _run(make_tx(reshape=RULE), stacked,
                  lambda t: {"w": _grads(t), "b": _grads(t)[0, 0]}, steps)
  ups_u, _ = _run(make_tx(reshape=None), separate,
                  lambda t: {"b": _grads(t)[0, 0], **{f"w{i}": _grads(t)[i] for i in range(L)}},
                  steps)
  scale = max(float(jnp.max(jnp.abs(u["w"]))) for u in ups_s)
  assert scale > 0
  for us, uu in zip(ups_s, ups_u):
    for i in range(L):
      np.testing.assert_allclose(us["w"][i], uu[f"w{i}"], rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(us["b"], uu["b"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "transport"])
@pytest.mark.parametrize("spec", [olr.svd(3), olr.svd(3, side="left"),
                                  olr.two_sided(2, 3, "svd"), olr.tucker(2)],
                         ids=["svd-auto", "svd-left", "two-sided-svd", "tucker"])
def test_low_rank_adam_on_a_stack_equals_separate_leaves(spec, on_refresh):
  _stacked_vs_separate(lambda reshape: olr.low_rank(
      optax.adam(1e-2), spec, refresh_every=3, on_refresh=on_refresh, reshape=reshape))


@pytest.mark.parametrize("on_refresh", ["keep", "reset", "transport"])
def test_natural_galore_on_a_stack_equals_separate_leaves(on_refresh):
  _stacked_vs_separate(lambda reshape: olr.natural_galore(
      1e-2, rank=3, history=2, refresh_every=3, on_refresh=on_refresh, reshape=reshape))


def test_adamem_on_a_stack_equals_separate_leaves():
  _stacked_vs_separate(lambda reshape: olr.adamem(
      1e-2, rank=3, refresh_every=3, reshape=reshape))


def test_woodbury_keeps_one_history_per_matrix():
  tx = olr.woodbury_precondition(history=4, batch_ndim=1)
  state = tx.init({"w": jnp.zeros((L, M, N))})
  assert state.history["w"].shape == (L, 4, M * N)
  assert state.gram["w"].shape == (L, 4, 4)
  with pytest.raises(ValueError, match=r"leaf 'v' of shape \(5,\).*batch_ndim"):
    tx.init({"v": jnp.zeros(5)})


@pytest.mark.parametrize("spec", [olr.gaussian(3), olr.rademacher(3), olr.semi_orthogonal(3),
                                  olr.randomized_svd(3, oversample=1), olr.two_sided(2, 2),
                                  olr.dense(5)],
                         ids=["gaussian", "rademacher", "semi-orthogonal", "randomized-svd",
                              "two-sided", "dense"])
def test_random_bases_of_a_stack_are_reproducible_and_differ_across_layers(spec):
  w = jax.random.normal(jax.random.PRNGKey(0), (L, M, N))
  grads = _grads(0)
  make = lambda seed: adapters.bases(adapters.init(
      {"w": w}, spec, seed=seed, reshape=RULE, grads={"w": grads}))["w"]
  a, b, other = make(0), make(0), make(1)
  assert a.batch_shape == (L,)
  for fa, fb, fo in zip(a.factors, b.factors, other.factors):
    if fa is None:
      continue
    assert fa.shape[0] == L
    np.testing.assert_array_equal(fa, fb)                       # a function of the seed
    assert not np.allclose(fa, fo)                              # ... and of nothing else
    for i in range(L):
      for j in range(i):
        assert not np.allclose(fa[i], fa[j]), (i, j)            # independent layers


def test_each_matrix_gets_the_basis_it_would_get_alone():
  """The per-layer SVD basis is the basis of that layer's own gradient."""
  g = _grads(0)
  stacked = adapters.bases(adapters.init({"w": g}, olr.svd(3), reshape=RULE, grads={"w": g}))
  for i in range(L):
    alone = adapters.bases(adapters.init({"w": g[i]}, olr.svd(3), grads={"w": g[i]}))
    np.testing.assert_allclose(stacked["w"].factors[1][i], alone["w"].factors[1], atol=1e-12)


@given(
    layers=st.integers(1, 3),
    m=st.integers(1, 7),
    n=st.integers(1, 7),
    rank=st.integers(1, 9),
    batch_axis=st.integers(0, 2),
    side=st.sampled_from(["auto", "left", "right"]),
)
def test_any_batch_axis_position_side_and_rank(layers, m, n, rank, batch_axis, side):
  """The batch axis may sit anywhere; ranks are clamped per matrix; sides resolve per matrix."""
  shape = [m, n]
  shape.insert(batch_axis, layers)
  rows, cols = [a for a in range(3) if a != batch_axis]
  rule = ((batch_axis,), (rows,), (cols,))
  g = jax.random.normal(jax.random.PRNGKey(layers * 100 + m * 10 + n), tuple(shape))
  # where=True: project even where the clamped rank saves nothing (the default would not)
  adapter = adapters.init({"w": g}, olr.svd(rank, side), reshape=rule, grads={"w": g},
                          where=True)
  basis = adapters.bases(adapter)["w"]
  lam = adapters.zeros(adapter)["w"]
  r = min(rank, m, n)
  resolved = ("right" if m >= n else "left") if side == "auto" else side
  assert lam.shape == ((layers, r, n) if resolved == "left" else (layers, m, r))
  coeffs = olr.project(basis, g)
  back = olr.project_back(basis, coeffs)
  assert back.shape == g.shape
  for i in range(layers):
    gi = jnp.take(g, i, axis=batch_axis)
    alone = adapters.init({"w": gi}, olr.svd(rank, side), grads={"w": gi}, where=True)
    want = olr.project_back(adapters.bases(alone)["w"], olr.project(adapters.bases(alone)["w"], gi))
    np.testing.assert_allclose(jnp.take(back, i, axis=batch_axis), want, atol=1e-10)


@pytest.mark.parametrize("rule, match", [
    (((0,), (1,)), r"exactly one of \(row_axes, col_axes\)"),
    (((0,), (1,), ()), r"row and column axes non-empty"),
    (((0,), (1,), (1, 2)), r"exactly one of \(batch_axes, row_axes, col_axes\)"),
    (((0,), (1,), (5,)), r"axis 5 is out of range for a 3-axis leaf"),
])
def test_a_rule_that_does_not_fit_fails_at_init_naming_leaf_and_argument(rule, match):
  tx = olr.low_rank(optax.adam(1e-3), olr.svd(2), reshape=rule)
  with pytest.raises(ValueError, match=r"leaf 'w' of shape \(3, 12, 8\).*`reshape`.*" + match):
    tx.init({"w": jnp.zeros((L, M, N))})


@pytest.mark.parametrize("spec", [olr.gaussian(3), olr.svd(3), olr.two_sided(2, 2)])
def test_duality_on_a_stacked_leaf(spec):
  """Gradient path == adapter path (paper 000, Thm 1) with stacked bases."""
  w0 = jax.random.normal(jax.random.PRNGKey(0), (L, M, N), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(2), (L, 5, M), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(3), (L, 5, N), jnp.float64)
  loss = lambda p: jnp.mean((jnp.einsum("lbm,lmn->lbn", x, p["w"]) - y) ** 2)
  result = olr.testing.assert_dual(loss, {"w": w0}, optax.adam(1e-2), spec, steps=8,
                                   refresh_every=3, reshape=RULE)
  assert result.max_deviation < 1e-12


def _tiny_llama(dtype=jnp.float64):
  return Llama(LlamaConfig.preset("tiny", scan_layers=True, dtype=dtype, param_dtype=dtype),
               rngs=nnx.Rngs(0))


def test_scanned_llama_matches_the_unrolled_one():
  batch = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 256)
  unrolled = Llama(LlamaConfig.preset("tiny"), rngs=nnx.Rngs(0))
  for scanned in (Llama(LlamaConfig.preset("tiny", scan_layers=True), rngs=nnx.Rngs(0)),
                  Llama(LlamaConfig.preset("tiny", scan_layers=True, remat=True),
                        rngs=nnx.Rngs(0))):
    kernel = nnx.state(scanned, nnx.Param)["layers"]["ffn"]["w1"]["kernel"][...]
    assert kernel.shape == (2, 32, 64)
    for i in range(2):  # the same initial values
      np.testing.assert_array_equal(kernel[i], unrolled.layers[i].ffn.w1.kernel[...])
    np.testing.assert_allclose(loss_fn(scanned, batch), loss_fn(unrolled, batch), rtol=1e-6)
  # the gradient of the remat'ed scan, layer by layer
  grad = nnx.jit(nnx.grad(loss_fn))
  g_s = grad(scanned, batch)["layers"]["attention"]["wo"]["kernel"][...]
  g_u = grad(unrolled, batch)["layers"][1]["attention"]["wo"]["kernel"][...]
  np.testing.assert_allclose(g_s[1], g_u, rtol=1e-4, atol=1e-7)


def test_low_rank_linear_under_nnx_scan_follows_the_gradient_path():
  """A scanned model with LowRankLinear layers (stacked Λ) == olr.low_rank on the same model."""
  batch = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 256)
  where = lambda path, x: "layers" in path and x.ndim == 3
  spec, steps, every, lr = olr.gaussian(4), 5, 3, 1e-2
  # gradient path on the dense scanned model
  model = _tiny_llama()
  graphdef, params = nnx.split(model, nnx.Param)
  tx = olr.low_rank(optax.sgd(lr), spec, refresh_every=every, where=where, reshape=STACKED_RULE)
  state = tx.init(params)
  grad_of = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)))
  for _ in range(steps):
    updates, state = tx.update(grad_of(params), state, params)
    params = optax.apply_updates(params, updates)
  # adapter path through the factors, scanned
  lr_model = _tiny_llama()
  adapter = adapters.init(nnx.state(lr_model, nnx.Param), spec, where=where,
                          reshape=STACKED_RULE)
  olr.nnx.to_low_rank(lr_model, adapter)
  layer = lr_model.layers.ffn.w2
  assert isinstance(layer, olr.nnx.LowRankLinear) and layer.lam[...].shape == (2, 64, 4)
  opt = nnx.Optimizer(lr_model, olr.nnx.optimizer(optax.sgd(lr)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt):
    opt.update(model, nnx.grad(loss_fn)(model, batch))

  for t in range(steps):
    if t and t % every == 0:
      adapter = olr.nnx.merge(lr_model, adapter)
    train_step(lr_model, opt)
  adapter = olr.nnx.merge(lr_model, adapter)  # fold the last Λ into W0
  got = adapter.base["layers"]["ffn"]["w2"]["kernel"]
  want = params["layers"]["ffn"]["w2"]["kernel"][...]
  moved = float(jnp.max(jnp.abs(want - nnx.state(_tiny_llama(), nnx.Param)["layers"]["ffn"]
                                ["w2"]["kernel"][...])))
  assert moved > 1e-6
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_a_stack_refresh_compiles_once_with_one_decomposition_mapped_over_the_stack():
  tx = olr.galore(1e-2, rank=3, refresh_every=2, reshape=RULE)
  params = {"w": jnp.zeros((L, M, N)), "v": jnp.zeros((2, 4, M, N))}
  rule4 = ((0, 1), (2,), (3,))
  tx = olr.galore(1e-2, rank=3, refresh_every=2,
                  reshape=lambda path, x: RULE if x.ndim == 3 else rule4)
  state = tx.init(params)
  grads = {"w": _grads(0), "v": _grads(1, (2, 4, M, N))}
  jaxpr = jax.make_jaxpr(tx.update)(grads, state, params)
  svds = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "svd"]
  assert len(svds) == 2  # one per leaf, not one per matrix (3 + 8) ...
  assert all(e.invars[0].aval.shape == (M, N) for e in svds)  # ... of one matrix at a time,
  scans = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "scan"
           and any(x.primitive.name == "svd" for x in _all_eqns(e.params["jaxpr"].jaxpr))]
  assert sorted(e.params["length"] for e in scans) == [3, 8]  # mapped over each stack
  traces = []
  update = jax.jit(lambda g, s, p: (traces.append(1), tx.update(g, s, p))[1])
  for _ in range(4):  # two refreshes and two ordinary steps
    _, state = update(grads, state, params)
  assert len(traces) == 1


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


def test_memory_counts_a_stack_as_its_matrices():
  stacked = {"w": jax.ShapeDtypeStruct((L, M, N), jnp.float32)}
  separate = {f"w{i}": jax.ShapeDtypeStruct((M, N), jnp.float32) for i in range(L)}
  tx = lambda reshape: olr.galore(1e-2, rank=3, reshape=reshape)
  got, want = olr.memory.state_bytes(tx(RULE), stacked), olr.memory.state_bytes(tx(None), separate)
  assert got.total == want.total and got.by_kind == want.by_kind
  assert got.by_leaf["w"] == {k: v * L for k, v in want.by_leaf["w0"].items()}


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optax_lowrank as olr
    from optax_lowrank import distributed as dist

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(0.3 * rng.normal(size=(3, 64, 16))),
              "b": jnp.zeros(16)}
    x = jnp.asarray(rng.normal(size=(3, 8, 64)))

    def loss(p):
      return jnp.mean((jnp.tanh(jnp.einsum("lbm,lmn->lbn", x, p["w"])) + p["b"]) ** 2)

    tx = olr.galore(1e-2, rank=4, refresh_every=3, reshape=((0,), (1,), (2,)))

    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    # layer axis replicated, the rows of every matrix sharded over 8 devices
    shardings = {"w": NamedSharding(mesh, P(None, "fsdp", None)), "b": NamedSharding(mesh, P())}
    sharded = jax.device_put(params, shardings)
    state_sh = dist.state_shardings(tx, sharded)
    opt_state = jax.jit(tx.init, out_shardings=state_sh)(sharded)
    sharded_step = jax.jit(step, out_shardings=(shardings, state_sh))
    ref_p, ref_s = params, tx.init(params)
    ref_step = jax.jit(step)
    for _ in range(7):  # three refreshes
      sharded, opt_state = sharded_step(sharded, opt_state)
      ref_p, ref_s = ref_step(ref_p, ref_s)
    mu = opt_state[0].inner_state[0].mu["w"]
    print("RESULTS " + json.dumps({
        "diff": float(jnp.max(jnp.abs(sharded["w"] - ref_p["w"]))),
        "moved": float(jnp.max(jnp.abs(ref_p["w"] - params["w"]))),
        "param_spec": [a for a in sharded["w"].sharding.spec],
        "mu_shape": list(mu.shape),
        "mu_spec": [a for a in mu.sharding.spec],
        "cache_size": sharded_step._cache_size(),
    }))
    """
)


def test_a_sharded_stack_equals_the_unsharded_one_on_8_devices():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULTS "))
  out = json.loads(line[len("RESULTS "):])
  assert out["moved"] > 1e-3
  assert out["diff"] < 1e-12 * max(1.0, out["moved"])
  assert out["param_spec"] == [None, "fsdp", None]
  # Adam's moments on the (3, 64, 4) coefficients follow the rows of their matrices
  assert out["mu_shape"] == [3, 64, 4] and out["mu_spec"][1] == "fsdp"
  assert out["cache_size"] == 1


def test_8bit_inner_state_on_a_stack_costs_what_its_matrices_cost():
  """Blocks of 256 never straddle two matrices when a matrix's coefficients fill whole blocks."""
  stacked = {"w": jnp.zeros((2, 128, 64), jnp.float32)}
  separate = {f"w{i}": jnp.zeros((128, 64), jnp.float32) for i in range(2)}
  tx = lambda reshape: olr.low_rank(olr.adam_8bit(1e-3), olr.svd(32), reshape=reshape)
  got = olr.memory.state_bytes(tx(RULE), stacked).by_kind
  want = olr.memory.state_bytes(tx(None), separate).by_kind
  assert got == want and got["inner"] < 2 * 4 * 2 * 128 * 32  # below float32 moments
  state = tx(RULE).init(stacked)
  g = {"w": _grads(0, (2, 128, 64)).astype(jnp.float32)}
  updates, _ = jax.jit(tx(RULE).update)(g, state, stacked)
  assert updates["w"].dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(updates["w"])))


@pytest.mark.parametrize("recipe", ["galore", "natural_galore"])
def test_orbax_resume_of_a_stack_is_bit_identical(recipe, tmp_path):
  import orbax.checkpoint as ocp

  make = {"galore": lambda: olr.galore(1e-2, rank=3, refresh_every=2, reshape=RULE),
          "natural_galore": lambda: olr.natural_galore(1e-2, rank=3, history=2,
                                                       refresh_every=2, reshape=RULE)}[recipe]
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (L, M, N))}
  tx = make()
  update = jax.jit(tx.update)

  def run(p, s, steps):
    for t in steps:
      u, s = update({"w": _grads(t)}, s, p)
      p = optax.apply_updates(p, u)
    return p, s

  straight = run(params, tx.init(params), range(5))
  half = run(params, tx.init(params), range(3))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", half)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: half))
  resumed = run(*restored, range(3, 5))
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def test_track_coefficients_on_a_stack_holds_one_lambda_per_matrix():
  tx = olr.low_rank(optax.sgd(1.0), olr.svd(3), refresh_every=10, reshape=RULE,
                    track_coefficients=True)
  params = {"w": jnp.zeros((L, M, N))}
  state = tx.init(params)
  updates, state = tx.update({"w": _grads(0)}, state, params)
  lam = state.coefficients["w"]
  assert lam.shape == (L, M, 3)
  basis = state.bases["w"]
  np.testing.assert_allclose(olr.project_back(basis, lam), updates["w"], atol=1e-12)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_quantized_stacked_base_under_nnx_scan(fmt):
  """Each layer of a stacked quantized base is sliced by nnx.scan, before and after merges."""
  batch = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, 256)
  where = lambda path, x: "layers" in path and x.ndim == 3
  config = LlamaConfig.preset("tiny", scan_layers=True)
  model = Llama(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  adapter = adapters.quantize_base(
      adapters.init(params, olr.gaussian(4), where=where, reshape=STACKED_RULE), fmt, 64)

  def dense_loss(adapter, lam, model=None):
    """The functional adapter path on the dense scanned model (unprojected leaves
    taken from ``model``, which trains them directly)."""
    weights = adapters.materialize(adapter, lam)
    if model is not None:
      trained = {"/".join(olr.leaves.path_names(k)): v for k, v in
                 jax.tree_util.tree_flatten_with_path(
                     olr.leaves.unwrap_variables(nnx.state(model, nnx.Param)))[0]}
      weights = olr.leaves.map_plans(
          lambda p, w: w if p.projected else trained[p.path], adapter.plans, weights)
    return loss_fn(nnx.merge(graphdef, weights), batch)

  olr.nnx.to_low_rank(model, adapter)
  assert model.layers.ffn.w1.base.get_value().codes.shape[0] == 2  # codes: one row per layer
  np.testing.assert_allclose(loss_fn(model, batch), dense_loss(adapter, adapters.zeros(adapter)),
                             rtol=1e-5)
  opt = nnx.Optimizer(model, olr.nnx.optimizer(optax.adam(1e-2)), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    opt.update(model, grads)
    return loss

  first = train_step(model, opt)
  for _ in range(3):
    train_step(model, opt)
  lam = model.layers.ffn.w1.lam[...]
  assert float(jnp.max(jnp.abs(lam))) > 0
  adapter = olr.nnx.merge(model, adapter)
  assert float(jnp.max(jnp.abs(model.layers.ffn.w1.lam[...]))) == 0
  after = loss_fn(model, batch)
  np.testing.assert_allclose(after, dense_loss(adapter, adapters.zeros(adapter), model),
                             rtol=1e-5)
  assert after < first
