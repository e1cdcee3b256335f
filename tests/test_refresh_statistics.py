"""What "transport" does to each statistic is declared by the state class that holds it.

optax's classes are declared by ``olr.refresh`` (Adam's ``nu`` a second moment,
Adan's ``v`` — a moment of gradient *differences* — a first one); a user's
class is declared with ``olr.refresh.register_statistics``; only an undeclared
class is read by its field names.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lowrank as olr
from optax_lowrank import bases as bases_lib
from optax_lowrank import leaves as leaves_lib
from optax_lowrank import refresh


def _bases_and_plans():
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((6, 5))}
  plans = leaves_lib.plan(params, olr.svd(2, side="right"))
  plan = plans["w"]
  old, new = (plan.make_basis(jax.random.key(0), jnp.asarray(i, jnp.int32),
                              jnp.asarray(rng.standard_normal((6, 5))))
              for i in range(2))
  return plans, plan, old, new


def _signed(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _expected(old, new, x, second):
  return bases_lib.transport(refresh.bounded_transport_matrices(old, new), x,
                             second_moment=second)


def test_adan_v_is_carried_as_a_first_moment_and_n_as_a_second():
  plans, plan, old, new = _bases_and_plans()
  inner = optax.scale_by_adan()
  state = inner.init({"w": jnp.zeros(plan.coefficient_shape)})
  m, v, g = (_signed(plan.coefficient_shape, s) for s in (1, 2, 3))
  n = jnp.square(_signed(plan.coefficient_shape, 4))
  state = state._replace(m={"w": m}, v={"w": v}, n={"w": n}, g={"w": g})
  out = refresh.apply_policy("transport", inner, state, plans, {"w": old}, {"w": new})
  for field, x, second in (("m", m, False), ("v", v, False), ("g", g, False), ("n", n, True)):
    np.testing.assert_allclose(getattr(out, field)["w"], _expected(old, new, x, second),
                               rtol=1e-12, atol=1e-14, err_msg=field)
  assert float(jnp.min(out.v["w"])) < 0  # its sign survives (squared, it could not)
  assert float(jnp.min(out.n["w"])) >= 0


class _MyState(NamedTuple):
  nu: dict  # a first moment, whatever the name says
  h: dict   # a second moment, whatever the name says


def _my_inner():
  def init(params):
    return _MyState(jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))

  return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_a_declared_class_is_transported_as_declared_and_an_undeclared_one_by_name():
  plans, plan, old, new = _bases_and_plans()
  inner = _my_inner()
  nu, h = _signed(plan.coefficient_shape, 5), jnp.square(_signed(plan.coefficient_shape, 6))
  state = _MyState({"w": nu}, {"w": h})
  guessed = refresh.apply_policy("transport", inner, state, plans, {"w": old}, {"w": new})
  np.testing.assert_allclose(guessed.nu["w"], _expected(old, new, nu, True), rtol=1e-12)
  np.testing.assert_allclose(guessed.h["w"], _expected(old, new, h, False), rtol=1e-12)
  refresh.register_statistics(_MyState, second=("h",))
  try:
    declared = refresh.apply_policy("transport", inner, state, plans, {"w": old}, {"w": new})
  finally:
    refresh._KINDS.pop(_MyState)
  np.testing.assert_allclose(declared.nu["w"], _expected(old, new, nu, False), rtol=1e-12)
  np.testing.assert_allclose(declared.h["w"], _expected(old, new, h, True), rtol=1e-12)


def test_declared_fields_must_exist_and_the_class_must_be_a_namedtuple():
  with pytest.raises(ValueError, match="no field 'x'"):
    refresh.register_statistics(_MyState, second=("x",))
  with pytest.raises(TypeError, match="NamedTuple"):
    refresh.register_statistics(dict, second=("x",))
  assert _MyState not in refresh._KINDS


def test_optax_adam_inside_wrappers_is_found_by_its_class():
  # inject_hyperparams and chain nest ScaleByAdamState: nu is still a second moment,
  # mu a first one, found through the wrappers' own (undeclared) fields.
  plans, plan, old, new = _bases_and_plans()
  inner = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
  state = inner.init({"w": jnp.zeros(plan.coefficient_shape)})
  mu, nu = _signed(plan.coefficient_shape, 7), jnp.square(_signed(plan.coefficient_shape, 8))
  adam = state.inner_state[0]._replace(mu={"w": mu}, nu={"w": nu})
  state = state._replace(inner_state=(adam, *state.inner_state[1:]))
  out = refresh.apply_policy("transport", inner, state, plans, {"w": old}, {"w": new})
  np.testing.assert_allclose(out.inner_state[0].mu["w"], _expected(old, new, mu, False),
                             rtol=1e-12)
  np.testing.assert_allclose(out.inner_state[0].nu["w"], _expected(old, new, nu, True),
                             rtol=1e-12)
