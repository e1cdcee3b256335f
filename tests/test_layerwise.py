"""Layer-wise updates (``olr.layerwise``) against the ordinary step, in float64.

The reference step takes ``jax.grad`` of the whole (unrolled) model and gives
``tx`` the ``outer`` params and every layer as separate trees, each with its
own state made by ``olr.layerwise.layer_state``: the layer-wise step must
follow the same trajectory.  Float64 tolerances: the two steps run the same
operations in a different order (whole-model VJP vs one block's VJP at a
time), so parameters agree to round-off, ~1e-13 relative after a few steps;
``1e-9`` leaves room for Adam's ``1/sqrt(ν)`` amplification of that
round-off on tiny gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as olr

L, V, D, H, B, T = 2, 11, 8, 12, 8, 5
RTOL, ATOL = 1e-9, 1e-11


def make_params(seed=0, dtype=jnp.float64):
  keys = jax.random.split(jax.random.key(seed), 6)
  outer = {
      "emb": 0.5 * jax.random.normal(keys[0], (V, D), dtype),
      "out": 0.5 * jax.random.normal(keys[1], (D, V), dtype),
      "scale": jnp.ones((D,), dtype),
  }
  layers = {
      "w1": 0.4 * jax.random.normal(keys[2], (L, D, H), dtype),
      "w2": 0.4 * jax.random.normal(keys[3], (L, H, D), dtype),
      "b": 0.1 * jax.random.normal(keys[4], (L, D), dtype),
  }
  return outer, layers


def make_batch(seed):
  return jax.random.randint(jax.random.key(100 + seed), (B, T + 1), 0, V)


def embed_fn(outer, batch):
  return outer["emb"][batch[:, :-1]]


def block_fn(layer, h):
  return h + jnp.tanh(h @ layer["w1"]) @ layer["w2"] + layer["b"]


def head_fn(outer, h, batch):
  logits = (h * outer["scale"]) @ outer["out"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def unstack(layers):
  return [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(L)]


def stack(layer_list):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *layer_list)


def ordinary_loss(outer, layer_list, batch, embed=embed_fn, block=block_fn, head=head_fn):
  h = embed(outer, batch)
  for layer in layer_list:
    h = block(layer, h)
  return head(outer, h, batch)


def reference_init(tx, outer, layers):
  return tx.init(outer), [olr.layerwise.layer_state(tx, p, i)
                          for i, p in enumerate(unstack(layers))]


def reference_step(tx, outer, layer_list, states, batch, loss=ordinary_loss, scale=None):
  """Whole-model grad; tx on outer and on every layer as separate trees."""
  value, (g_outer, g_layers) = jax.value_and_grad(loss, (0, 1))(outer, layer_list, batch)
  norm = optax.tree.norm((g_outer, g_layers))
  if scale is not None:
    factor = scale(norm)
    g_outer, g_layers = jax.tree.map(lambda g: g * factor, (g_outer, g_layers))
  outer_state, layer_states = states
  u, outer_state = tx.update(g_outer, outer_state, outer)
  outer = optax.apply_updates(outer, u)
  new_layers, new_states = [], []
  for p, g, s in zip(layer_list, g_layers, layer_states):
    u, s = tx.update(g, s, p)
    new_layers.append(optax.apply_updates(p, u))
    new_states.append(s)
  return outer, new_layers, (outer_state, new_states), value, norm


def assert_close(a, b, rtol=RTOL, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=rtol, atol=atol), a, b)


def run_both(tx, steps=3, step_kwargs=None, ref_scale=None, ref_tx=None, rtol=RTOL, atol=ATOL):
  step_kwargs = step_kwargs or {}
  outer, layers = make_params()
  step = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx, **step_kwargs)
  state = step.init(outer, layers)
  ref_tx = ref_tx or tx
  ref = (outer, unstack(layers), reference_init(ref_tx, outer, layers))
  update = jax.jit(step.update)
  ref_update = jax.jit(lambda o, ls, s, b, prev: reference_step(
      ref_tx, o, ls, s, b, scale=None if ref_scale is None else (lambda n: ref_scale(n, prev))))
  prev = jnp.zeros([])
  for t in range(steps):
    batch = make_batch(t)
    outer, layers, state, loss = update(outer, layers, state, batch)
    r_outer, r_layers, r_states, r_loss, r_norm = ref_update(*ref, batch, prev)
    ref = (r_outer, r_layers, r_states)
    prev = r_norm
    np.testing.assert_allclose(loss, r_loss, rtol=rtol)
    np.testing.assert_allclose(state.grad_norm, r_norm, rtol=rtol)
  assert_close(outer, ref[0], rtol=rtol, atol=atol)
  assert_close(layers, stack(ref[1]), rtol=rtol, atol=atol)
  if ref_tx is tx:
    assert_close(state.layers, stack(ref[2][1]), rtol=rtol, atol=atol)
  return outer, layers, state


TXS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "low_rank_svd_refresh": lambda: optax.chain(
        olr.low_rank(optax.scale_by_adam(), olr.svd(2), refresh_every=2),
        optax.scale_by_learning_rate(1e-2)),
    "galore": lambda: olr.galore(1e-2, rank=2, refresh_every=2),
    # Flora's Gaussian bases: drawn from each layer's folded key (layer_state).
    "gaussian": lambda: optax.chain(
        olr.low_rank(optax.scale_by_adam(), olr.gaussian(2), refresh_every=2, seed=5),
        optax.scale_by_learning_rate(1e-2)),
    "adam_8bit_nearest": lambda: olr.adam_8bit(1e-2, stochastic_rounding=False),
}


@pytest.mark.parametrize("name", sorted(TXS))
def test_layerwise_equals_the_ordinary_step_with_layers_as_separate_trees(name):
  # 8-bit Adam re-quantizes its moments every step, and a moment that lies
  # within round-off of a rounding boundary can land in either code: the
  # parameters (scale 0.1-0.5) then differ by up to ~1e-9; 1e-8 absolute is
  # far below what a wrong update would give (lr 1e-2 times O(1) steps).
  eight_bit = "8bit" in name
  run_both(TXS[name](), steps=3, rtol=1e-7 if eight_bit else RTOL,
           atol=1e-8 if eight_bit else ATOL)


def test_random_bases_differ_per_layer_and_are_a_function_of_the_seed():
  outer, layers = make_params()
  tx = olr.flora(1e-2, rank=2, refresh_every=2, seed=3)
  state = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx).init(outer, layers)
  keys = [s.key for s in jax.tree.leaves(state.layers, is_leaf=lambda s: isinstance(
      s, olr.LowRankState)) if isinstance(s, olr.LowRankState)][0]
  base = jax.random.PRNGKey(3)
  for i in range(L):
    np.testing.assert_array_equal(keys[i], jax.random.fold_in(base, i))
  assert len({tuple(np.asarray(k)) for k in keys}) == L
  same = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx, fold_keys=False)
  state = same.init(outer, layers)
  keys = [s.key for s in jax.tree.leaves(state.layers, is_leaf=lambda s: isinstance(
      s, olr.LowRankState)) if isinstance(s, olr.LowRankState)][0]
  np.testing.assert_array_equal(keys, np.stack([base] * L))


@pytest.mark.parametrize("mode", ["two_pass", "layer", "previous"])
def test_clipping_modes_match_their_definitions(mode):
  c = 0.5  # below the gradient norms of this model (~1-3), so every mode clips
  adam = optax.adam(1e-2)
  if mode == "two_pass":  # == clip_by_global_norm over the whole model
    run_both(adam, step_kwargs=dict(clip=mode, clip_norm=c),
             ref_scale=lambda n, prev: jnp.minimum(1.0, c / n))
  elif mode == "layer":  # == clip_by_global_norm inside every tree's own tx
    run_both(adam, step_kwargs=dict(clip=mode, clip_norm=c),
             ref_tx=optax.chain(optax.clip_by_global_norm(c), adam))
  else:  # the previous step's global norm; none at the first step
    run_both(adam, step_kwargs=dict(clip=mode, clip_norm=c),
             ref_scale=lambda n, prev: jnp.where(prev > 0, jnp.minimum(1.0, c / prev), 1.0))


def test_microbatches_equal_the_one_batch_step_on_their_concatenation():
  tx = olr.galore(1e-2, rank=2, refresh_every=2)  # a refresh at steps 0 and 2
  outer, layers = make_params()
  one = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx)
  four = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx, microbatches=4)
  s1, s4 = one.init(outer, layers), four.init(outer, layers)
  p1 = p4 = (outer, layers)
  for t in range(3):
    *p1, s1, l1 = jax.jit(one.update)(*p1, s1, make_batch(t))
    *p4, s4, l4 = jax.jit(four.update)(*p4, s4, make_batch(t))
    np.testing.assert_allclose(l4, l1, rtol=1e-12)
    np.testing.assert_allclose(s4.grad_norm, s1.grad_norm, rtol=1e-12)
  assert_close(p4, p1)
  assert_close(s4, s1)


@pytest.mark.parametrize("mode", ["two_pass", "layer"])
def test_clipping_with_microbatches_equals_the_one_batch_step(mode):
  """The two-pass norm (embed's part added after the first reverse pass) and the
  per-layer norms are of the summed micro-batch gradients."""
  kwargs = dict(clip=mode, clip_norm=0.5)
  outer, layers = make_params()
  one = olr.layerwise.make_step(embed_fn, block_fn, head_fn, optax.adam(1e-2), **kwargs)
  two = olr.layerwise.make_step(embed_fn, block_fn, head_fn, optax.adam(1e-2), microbatches=2,
                                **kwargs)
  s1 = s2 = one.init(outer, layers)
  p1 = p2 = (outer, layers)
  for t in range(2):
    *p1, s1, l1 = jax.jit(one.update)(*p1, s1, make_batch(t))
    *p2, s2, l2 = jax.jit(two.update)(*p2, s2, make_batch(t))
    np.testing.assert_allclose(l2, l1, rtol=1e-12)
    np.testing.assert_allclose(s2.grad_norm, s1.grad_norm, rtol=1e-12)
  assert_close(p2, p1)


def test_the_global_norm_is_summed_in_the_state_dtype_without_outer_params():
  """No ``outer`` params (an empty tree): the layers' float64 norm stays float64."""
  _, layers = make_params()
  table = make_params(seed=1)[0]["emb"]

  def embed(outer, batch):
    return table[batch[:, :-1]]

  def head(outer, h, batch):
    return jnp.mean(jnp.square(h))

  step = olr.layerwise.make_step(embed, block_fn, head, optax.adam(1e-2))
  state = step.init({}, layers)
  assert state.grad_norm.dtype == jnp.float64
  batch = make_batch(0)
  _, _, state, _ = jax.jit(step.update)({}, layers, state, batch)
  loss = lambda layer_list: ordinary_loss({}, layer_list, batch, embed=embed, head=head)
  np.testing.assert_allclose(state.grad_norm, optax.tree.norm(jax.grad(loss)(unstack(layers))),
                             rtol=1e-12)


def test_context_aux_and_remat_policy():
  """Positions (int) and a learned table (float, from outer) reach every block."""
  outer, layers = make_params()
  outer = {**outer, "pos": 0.1 * jax.random.normal(jax.random.key(7), (T, D))}

  def embed(o, batch):
    positions = jnp.arange(T)
    return o["emb"][batch[:, :-1]], {"table": o["pos"], "positions": positions}

  def block(layer, h, ctx):
    return block_fn(layer, h + ctx["table"][ctx["positions"]])

  def head(o, h, batch):
    loss = head_fn(o, h, batch)
    return loss, {"loss_again": loss}

  def loss(o, layer_list, batch):
    h, ctx = embed(o, batch)
    for p in layer_list:
      h = block(p, h, ctx)
    return head(o, h, batch)[0]

  tx = optax.adam(1e-2)
  step = olr.layerwise.make_step(
      embed, block, head, tx, with_context=True, has_aux=True, microbatches=2,
      remat_policy=jax.checkpoint_policies.nothing_saveable)
  state = step.init(outer, layers, batch=make_batch(0))
  ref = (outer, unstack(layers), reference_init(tx, outer, layers))
  for t in range(2):
    outer, layers, state, (value, aux) = jax.jit(step.update)(outer, layers, state, make_batch(t))
    *ref, r_loss, r_norm = reference_step(tx, *ref, make_batch(t), loss=loss)
    np.testing.assert_allclose(value, r_loss, rtol=1e-12)
    np.testing.assert_allclose(aux["loss_again"].mean(), r_loss, rtol=1e-12)
    np.testing.assert_allclose(state.grad_norm, r_norm, rtol=1e-12)
  assert_close(outer, ref[0])
  assert_close(layers, stack(ref[1]))


# ----------------------------------------------------------------------------
# Bad input.


def test_global_norm_clipping_inside_tx_is_refused_at_init():
  outer, layers = make_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  step = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx)
  with pytest.raises(ValueError, match=r"not layer-separable.*\['b'\] \(8,\).*clip="):
    step.init(outer, layers)
  # The same chain without the coupling, the clipping made explicit, is accepted.
  olr.layerwise.make_step(embed_fn, block_fn, head_fn, optax.adam(1e-2), clip="two_pass",
                          clip_norm=1.0).init(outer, layers)


def test_layer_leaves_that_disagree_on_the_leading_axis_are_named():
  outer, layers = make_params()
  layers = {**layers, "b": layers["b"][:1]}
  step = olr.layerwise.make_step(embed_fn, block_fn, head_fn, optax.adam(1e-2))
  expected = r"\['w1'\] has shape \(2, 8, 12\), but \['b'\] has shape \(1, 8\) \(1 layers\)"
  with pytest.raises(ValueError, match=expected):
    step.init(outer, layers)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_a_block_that_changes_h_is_refused(bad):
  outer, layers = make_params()

  def block(layer, h):
    out = block_fn(layer, h)
    return out[..., :-1] if bad == "shape" else out.astype(jnp.float32)

  step = olr.layerwise.make_step(embed_fn, block, head_fn, optax.adam(1e-2))
  expected = r"\(8, 5, 8\) float64, output \(8, 5, 7\)" if bad == "shape" else "output.*float32"
  with pytest.raises(ValueError, match=expected):
    step.init(outer, layers, batch=make_batch(0))
  state = step.init(outer, layers)
  with pytest.raises(ValueError, match=expected):
    step.update(outer, layers, state, make_batch(0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip="global"), "`clip` must be"),
    (dict(clip="layer"), "needs `clip_norm`"),
    (dict(clip_norm=1.0), "without `clip`"),
    (dict(microbatches=0), "`microbatches`"),
])
def test_bad_arguments_fail_at_make_step(kwargs, match):
  with pytest.raises(ValueError, match=match):
    olr.layerwise.make_step(embed_fn, block_fn, head_fn, optax.adam(1e-2), **kwargs)


def test_microbatches_that_do_not_divide_the_batch_are_named():
  outer, layers = make_params()
  step = olr.layerwise.make_step(embed_fn, block_fn, head_fn, optax.adam(1e-2), microbatches=3)
  with pytest.raises(ValueError, match=r"batch has shape \(8, 6\)"):
    step.init(outer, layers, batch=make_batch(0))


# ----------------------------------------------------------------------------
# Checkpoints, NNX, sharding.


def test_orbax_resume_of_a_donated_step_is_bit_identical(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  tx = olr.galore(1e-2, rank=2, refresh_every=2)
  outer, layers = make_params()
  step = olr.layerwise.make_step(embed_fn, block_fn, head_fn, tx)
  update = jax.jit(step.update, donate_argnums=(0, 1, 2))  # in place, as in training
  carry = (outer, layers, step.init(outer, layers))
  for t in range(2):
    carry = update(*carry, make_batch(t))[:3]
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", carry)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                             carry))
  for t in range(2, 4):
    carry = update(*carry, make_batch(t))[:3]
    restored = update(*restored, make_batch(t))[:3]
  assert_close(restored, carry, rtol=0, atol=0)


def test_split_nnx_llama_composes_to_the_model_and_merges_back():
  """The parts of a scanned Llama compute its loss; merge puts params back.

  Training through the parts equals the ordinary step: see the job's test
  below (``examples.train --layerwise`` uses ``split_nnx``).
  """
  from flax import nnx

  from examples.llama import Llama, LlamaConfig, loss_fn

  config = LlamaConfig.preset("tiny", scan_layers=True, dtype=jnp.float64,
                              param_dtype=jnp.float64)
  model = Llama(config, rngs=nnx.Rngs(0))
  batch = jax.random.randint(jax.random.key(0), (2, 9), 0, config.vocab_size)

  def head(m, h, batch):  # as Llama.__call__ and loss_fn: float32 logits
    logits = m.output(m.norm(h)).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  parts = olr.layerwise.split_nnx(model, embed=lambda m, b: m.embed(b[:, :-1]), head=head)
  h = parts.embed_fn(parts.outer, batch)
  for layer in unstack_n(parts.layers, config.n_layers):
    h = parts.block_fn(layer, h)
  np.testing.assert_allclose(parts.head_fn(parts.outer, h, batch), loss_fn(model, batch),
                             rtol=1e-6)  # float32 logits in both, summed in another order
  outer = jax.tree.map(lambda x: x + 1.0, parts.outer)
  layers = jax.tree.map(lambda x: 2.0 * x, parts.layers)
  merged = parts.merge(outer, layers)
  np.testing.assert_array_equal(merged.layers.ffn.w1.kernel[...], layers["ffn"]["w1"]["kernel"])
  np.testing.assert_array_equal(merged.embed.embedding[...], outer["embed"]["embedding"])
  with pytest.raises(ValueError, match="no attribute 'blocks'"):
    olr.layerwise.split_nnx(model, embed=lambda m, b: m.embed(b), head=head, stack="blocks")


def unstack_n(tree, n):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import optax_lowrank as olr
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import tests.test_layerwise as t
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("fsdp",))
    outer, layers = t.make_params()
    tx = olr.galore(1e-2, rank=2, refresh_every=2)
    step = olr.layerwise.make_step(t.embed_fn, t.block_fn, t.head_fn, tx)
    state = step.init(outer, layers)
    def fsdp(x):  # shard the largest axis divisible by 8 (the data axis of FSDP), else replicate
      axes = [a for a in range(x.ndim) if x.shape[a] % 8 == 0 and x.shape[a] > 1]
      spec = [None] * x.ndim
      if axes:
        spec[max(axes, key=lambda a: x.shape[a])] = "fsdp"
      return jax.device_put(x, NamedSharding(mesh, P(*spec)))
    plain = (outer, layers, state)
    sharded = jax.tree.map(fsdp, plain)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded))
    update = jax.jit(step.update)
    for s in range(2):
      batch = jax.device_put(t.make_batch(s), NamedSharding(mesh, P("fsdp")))
      plain = update(*plain, t.make_batch(s))[:3]
      sharded = update(*sharded, batch)[:3]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-9, atol=1e-11), sharded, plain)
    print("SHARDED-OK")
""")


def test_fsdp_sharded_params_and_state_on_8_host_devices_equal_unsharded():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=root)
  proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                        text=True, timeout=300, cwd=root)
  assert "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


def test_the_job_trains_layer_wise_like_the_ordinary_scanned_step(tmp_path):
  """``python -m examples.train --layerwise``: same losses as ``--scan-layers`` (float32)."""
  import json

  from examples import train

  common = ["--size", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "3", "--eval-batches", "1", "--max-bytes", "20000",
            "--methods", "galore", "--refresh-every", "2", "--no-progress",
            "--ckpt-dir", str(tmp_path / "ck")]
  runs = {}
  for flag in ("--scan-layers", "--layerwise"):
    assert train.main([*common, "--out", str(tmp_path / flag), flag]) == 0
    runs[flag] = json.loads((tmp_path / flag / "results.json").read_text())["results"][0]
  # float32: the two steps sum the same products in another order (~1e-6).
  np.testing.assert_allclose(runs["--layerwise"]["train_loss"], runs["--scan-layers"]["train_loss"],
                             rtol=1e-5)
  np.testing.assert_allclose(runs["--layerwise"]["final_val_loss"],
                             runs["--scan-layers"]["final_val_loss"], rtol=1e-5)
  assert train.main([*common, "--out", str(tmp_path / "bad"), "--layerwise",
                     "--methods", "adapter"]) == 2
