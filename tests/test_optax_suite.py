"""optax's own optimizer suite, run on every recipe of ours.

``optax/contrib/_common_test.py`` ships with optax: it is what every optimizer
in ``optax.contrib`` passes (extra ``update`` arguments, no recompilation on
the second call, convergence on four targets under ``lax.scan``,
``optax.tree.map_params``, ``optax.inject_hyperparams``, dtype preservation,
``optax.MultiSteps``, dtype stability under ``lax.cond``, schedules).  This
module imports it from the installed optax — nothing of it is copied here —
and runs its test methods, unchanged, on our recipes.  The suite looks an
``opt_name`` up as an attribute of the public ``optax.contrib`` module (then
of ``optax``), so each case adds our recipe there under a name of its own
(``"olr.galore"``, which no optax name can clash with) for the duration of the
case; no optax function is replaced.  Where the suite would skip
an optimizer (e.g. one whose ``learning_rate`` is not annotated as taking a
schedule), the case fails instead: none of ours is excused.

The suite is written for JAX's default float32 mode; this session enables
float64 (``tests/conftest.py``), so every case runs with it disabled, as in
optax's CI and in a user's program.

Two checks follow the suite: ``learning_rate`` carries the real
``optax.ScalarOrSchedule`` object, and an injected recipe keeps the plain
recipe's state tree with updates equal to 1e-6 relative.
"""

import contextlib
import inspect
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_lowrank as olr

common = pytest.importorskip("optax.contrib._common_test")

# Every recipe, with the suite's own settings for optax.contrib.galore
# (learning rate 1e-2, rank 8) where the recipe takes them.
RECIPES = {
    "galore": {"learning_rate": 1e-2, "rank": 8},
    "flora": {"learning_rate": 1e-2, "rank": 8},
    "natural_galore": {"learning_rate": 1e-2, "rank": 8},
    "adamem": {"learning_rate": 1e-2, "rank": 8},
    "adam_8bit": {"learning_rate": 1e-2},
    "adam_in_subspace": {"learning_rate": 1e-2, "projection": olr.svd(8)},
    "apollo": {"learning_rate": 1e-2, "rank": 8},
    "apollo_mini": {"learning_rate": 1e-2},
    "fira": {"learning_rate": 1e-2, "rank": 8},
}
FACTORIES = {f"olr.{name}": getattr(olr, name) for name in RECIPES}
# optax's four targets but two: its mixed target is a vector parabola plus a matrix
# parabola, separable and with every leaf its own optimizer state, so converging on it
# means converging on each of "parabola" and "matrix_parabola" (12 compiles fewer).
TARGETS = {
    "rosenbrock": common._setup_rosenbrock,
    "mixed_tensor": common._setup_mixed_tensor_target,
}

def _cases(wrapper: bool = False, **axes):
  """Named cases: every recipe × every combination of ``axes`` ({label: value} each)."""
  out = [{"testcase_name": f"_{name}", "opt_name": f"olr.{name}", "opt_kwargs": kw}
         for name, kw in RECIPES.items()]
  if wrapper:
    out = [dict(c, wrapper_name=None, wrapper_kwargs=None) for c in out]
  for arg, values in axes.items():
    out = [dict(c, testcase_name=f"{c['testcase_name']}_{label}", **{arg: value})
           for c in out for label, value in values.items()]
  return out


def _suite_method(name: str):
  """The undecorated test function ``name`` of optax's ``ContribTest``."""
  for attr, value in vars(common.ContribTest).items():
    if attr.startswith(name) and hasattr(value, "__wrapped__"):
      fn = inspect.unwrap(value)
      if fn.__name__ == name:
        return fn
  raise LookupError(f"optax's suite has no test named {name!r}")


class RecipesPassOptaxSuite(parameterized.TestCase):
  """Each ``test_*`` runs optax's test method of the same name on one recipe."""

  def setUp(self):
    super().setUp()
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    self.addCleanup(jax.config.update, "jax_enable_x64", x64)
    for opt_name, factory in FACTORIES.items():  # where the suite looks names up
      patcher = mock.patch.object(optax.contrib, opt_name, factory, create=True)
      patcher.start()
      self.addCleanup(patcher.stop)

  def skipTest(self, reason):  # noqa: N802 - unittest's name
    self.fail(f"optax's suite would skip this recipe: {reason}")

  @contextlib.contextmanager
  def subTest(self, msg=None, **params):  # noqa: N802 - unittest's name
    # The first failing check fails the case, named.
    try:
      yield
    except AssertionError as e:
      raise AssertionError(f"[{msg}] {e}") from None

  def _run(self, name, **kw):
    _suite_method(name)(self, **kw)

  @parameterized.named_parameters(_cases(wrapper=True))
  def test_optimizers_accept_extra_args(self, **kw):
    self._run("test_optimizers_accept_extra_args", wrap=False, **kw)

  @parameterized.named_parameters(_cases(wrapper=True, target=TARGETS))
  def test_optimizers(self, **kw):
    self._run("test_optimizers", dtype="float32", **kw)

  @parameterized.named_parameters(_cases())
  def test_optimizers_can_be_wrapped_in_inject_hyperparams(self, **kw):
    self._run("test_optimizers_can_be_wrapped_in_inject_hyperparams", **kw)

  @parameterized.named_parameters(_cases(dtype={"bf16": "bfloat16", "f32": "float32"}))
  def test_preserve_dtype(self, **kw):
    self._run("test_preserve_dtype", **kw)

  @parameterized.named_parameters(_cases(dtype={"bf16": "bfloat16", "f32": "float32"}))
  def test_gradient_accumulation(self, **kw):
    self._run("test_gradient_accumulation", **kw)

  @parameterized.named_parameters(_cases(wrapper=True, dtype={
      "f16": jnp.float16, "bf16": jnp.bfloat16, "f32": jnp.float32, "f64": jnp.float64}))
  def test_state_shape_dtype_shard_stability(self, **kw):
    self._run("test_state_shape_dtype_shard_stability", **kw)

  @parameterized.named_parameters(_cases(wrapper=True))
  def test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such(self, **kw):
    self._run("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such", **kw)

  # --- beyond the suite ------------------------------------------------------

  @parameterized.named_parameters(_cases())
  def test_learning_rate_annotation_is_optax_scalar_or_schedule(self, opt_name, opt_kwargs):
    del opt_kwargs
    annotation = inspect.signature(FACTORIES[opt_name]).parameters["learning_rate"].annotation
    self.assertIs(annotation, optax.ScalarOrSchedule)

  @parameterized.named_parameters(_cases(dtype={"f32": jnp.float32}))
  def test_injected_state_tree_and_updates_equal_plain(self, opt_name, opt_kwargs, dtype):
    """Same state tree, and updates equal to 1e-6 relative over three steps.

    Injected hyper-parameters are arrays; the recipes make Python floats
    arrays of the same dtype, so the arithmetic is the same.  adam_8bit keeps
    optax.adam's own arithmetic (its tests hold it equal to optax.adam), so in
    float32 it is held to optax.adam's plain-vs-injected difference (~7e-6,
    Python's ``1 − 0.999`` against float32's) instead.
    """
    jax.config.update("jax_enable_x64", dtype == jnp.float64)
    factory = FACTORIES[opt_name]
    static = tuple(a for a in ("rank", "projection") if a in opt_kwargs)
    plain = factory(**opt_kwargs)
    injected = optax.inject_hyperparams(factory, static_args=static)(**opt_kwargs)
    params = {"w": jnp.linspace(-1.0, 1.0, 6 * 5, dtype=dtype).reshape(6, 5),
              "b": jnp.arange(3.0, dtype=dtype)}
    state_p = jax.jit(plain.init)(params)
    state_i = jax.jit(injected.init)(params)
    self.assertEqual(jax.tree.structure(state_i.inner_state), jax.tree.structure(state_p))
    rtol = 1e-6
    if opt_name == "olr.adam_8bit" and dtype == jnp.float32:
      rtol = 1.5 * _adam_plain_vs_injected(params)
    step_p, step_i = jax.jit(plain.update), jax.jit(injected.update)
    for t in range(3):
      grads = jax.tree.map(lambda x, t=t: jnp.cos(3.0 * x + t) + 0.1 * x, params)
      u_p, state_p = step_p(grads, state_p, params)
      u_i, state_i = step_i(grads, state_i, params)
      for a, b in zip(jax.tree.leaves(u_i), jax.tree.leaves(u_p)):
        self.assertEqual(a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(b))))
      params = optax.apply_updates(params, u_p)


def _adam_plain_vs_injected(params) -> float:
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1 * x, params)
  plain, injected = optax.adam(1e-2), optax.inject_hyperparams(optax.adam)(1e-2)
  u_p, _ = plain.update(grads, plain.init(params), params)
  u_i, _ = injected.update(grads, injected.init(params), params)
  return max(float(jnp.max(jnp.abs(a - b) / jnp.abs(b)))
             for a, b in zip(jax.tree.leaves(u_i), jax.tree.leaves(u_p)))
