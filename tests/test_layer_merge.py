"""adapters.merge of stacked bases, layer by layer: the whole-leaf results, one layer's memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lowrank as olr
from optax_lowrank import adapters, memory, quantization
from optax_lowrank import quantized_merge as qm

L, M, N, R, BLOCK = 3, 64, 96, 8, 64
STACKED = ((0,), (1,), (2,))


def _adapter(fmt, rule):
  key = jax.random.PRNGKey(0)
  params = {"w": (jax.random.normal(key, (L, M, N)) * 0.1).astype(jnp.bfloat16),
            "v": jax.random.normal(key, (M, N)) * 0.1}
  a = adapters.init(params, olr.gaussian(R), where=lambda path, leaf: leaf.ndim >= 2,
                    reshape=lambda path, leaf: STACKED if leaf.ndim == 3 else None)
  if fmt is not None:
    a = adapters.quantize_base(a, fmt, BLOCK, rule=rule)
  lam = jax.tree.map(lambda z: jax.random.normal(jax.random.PRNGKey(2), z.shape, z.dtype) * 0.05,
                     adapters.zeros(a))
  return a, lam


def _whole_leaf_merge(a, lam):
  """The merge as one whole-leaf computation: materialize, then the merge rule per leaf."""
  merged = adapters.materialize(a, lam)
  seed = quantization.mix_seed(a.key, a.refresh_index + 1)
  return qm.merge_tree(a.base, merged, bases=adapters.bases(a), seed=seed)


@pytest.mark.parametrize(("fmt", "rule", "jit"), [
    (None, None, True),
    ("nf4", qm.DEFAULT_MERGE_RULE, True),
    ("nf4", qm.DEFAULT_MERGE_RULE, False),  # eagerly: a Python loop over layers
    ("int8", qm.MergeRule(rounding="stochastic", scales="keep", feedback_bits=2), True),
])
def test_layer_by_layer_merge_is_bit_identical_to_the_whole_leaf_merge(fmt, rule, jit):
  with jax.enable_x64(False):
    a, lam = _adapter(fmt, rule)
    new, _ = (jax.jit(adapters.merge) if jit else adapters.merge)(a, lam)
    ref = (jax.jit(_whole_leaf_merge) if jit else _whole_leaf_merge)(a, lam)
    for x, y in zip(jax.tree.leaves(new.base), jax.tree.leaves(ref), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_stacked_merge_holds_one_layer_not_the_stack():
  with jax.enable_x64(False):
    a, lam = _adapter("nf4", qm.DEFAULT_MERGE_RULE)
    a = jax.eval_shape(lambda: a)
    layered = memory.plan_function(adapters.merge, a, lam, donate_argnums=(0, 1))
    whole = memory.plan_function(_whole_leaf_merge, a, lam, donate_argnums=(0, 1))
  stack_f32 = L * M * N * 4
  assert whole.memory.temporaries >= stack_f32  # float copies of the whole stack
  assert layered.memory.temporaries < whole.memory.temporaries - stack_f32
