"""Tests for optax_lowrank.hashing (the counter-based generator of stochastic rounding)."""

import jax
import jax.numpy as jnp
import numpy as np

from optax_lowrank import hashing


def test_mix_seed():
  step, leaf, moment = (a.ravel() for a in np.meshgrid(range(20), range(5), range(2)))
  seeds = jax.jit(jax.vmap(lambda *w: hashing.mix_seed(0, *w)))(step, leaf, moment)
  assert len(set(np.asarray(seeds).tolist())) == 200  # distinct per (step, leaf, moment)
  assert hashing.mix_seed(3, 4).dtype == jnp.uint32
  assert int(hashing.mix_seed(3, 4)) == int(jax.jit(hashing.mix_seed)(jnp.int32(3), jnp.int32(4)))
  assert int(hashing.mix_seed(2**32 + 5)) == int(hashing.mix_seed(5))  # Python ints mod 2^32
  key = jax.random.key(1)
  assert int(hashing.mix_seed(key)) != int(hashing.mix_seed(jax.random.key(2)))


def test_uniform_is_sliceable_and_looks_uniform():
  seed = hashing.mix_seed(7)
  whole = np.asarray(hashing.uniform(seed, 1 << 16))
  assert whole.dtype == np.float32 and whole.min() >= 0.0 and whole.max() < 1.0
  # A slice drawn on its own (offset) is the same slice of the whole draw.
  np.testing.assert_array_equal(hashing.uniform(seed, 100, 1000), whole[1000:1100])
  np.testing.assert_array_equal(jax.jit(hashing.uniform, static_argnums=1)(seed, 100, 1000),
                                whole[1000:1100])
  # Mean, variance and lag-1 correlation of U(0, 1), within 5 standard errors.
  n = whole.size
  assert abs(whole.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
  assert abs(whole.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
  assert abs(np.corrcoef(whole[:-1], whole[1:])[0, 1]) < 5 / np.sqrt(n)
  other = np.asarray(hashing.uniform(hashing.mix_seed(8), 1 << 16))
  assert abs(np.corrcoef(whole, other)[0, 1]) < 5 / np.sqrt(n)


def test_fmix32_is_a_bijection_on_a_sample():
  x = jnp.arange(1 << 16, dtype=jnp.uint32) * jnp.uint32(65521)
  assert np.unique(np.asarray(hashing.fmix32(x))).size == x.size
