"""Tests for optax_lowrank.quantization_levels (the level tables and ranks in them)."""

import jax.numpy as jnp
import numpy as np
import pytest

from optax_lowrank import quantization_levels as ql


def test_documented_error_factors():
  assert ql.max_abs_error_factor("int8") == pytest.approx(1 / 254, rel=1e-12)
  assert ql.max_abs_error_factor("nf4") == pytest.approx((1 - 0.6961928009986877) / 2)
  assert ql.max_abs_error_factor("dynamic8") == pytest.approx(0.9 / 128)
  assert ql.max_abs_error_factor("dynamic8_unsigned") == pytest.approx(0.9 / 256)


def test_nf4_levels_match_quantile_definition():
  np.testing.assert_allclose(ql.nf4_levels_from_definition(), ql.NF4_LEVELS, atol=1e-6, rtol=0)
  assert ql.NF4_LEVELS.shape == (16,) and ql.NF4_LEVELS.dtype == np.float32
  assert ql.NF4_LEVELS[7] == 0.0 and ql.NF4_LEVELS[0] == -1.0 and ql.NF4_LEVELS[-1] == 1.0


def test_dynamic_tree_levels():
  signed, unsigned = ql.DYNAMIC8_LEVELS, ql.DYNAMIC8_UNSIGNED_LEVELS
  assert signed.shape == (255,) and unsigned.shape == (256,)
  for levels in (signed, unsigned):
    assert np.all(np.diff(levels) > 0) and levels[-1] == 1.0 and 0.0 in levels
  np.testing.assert_array_equal(signed, -signed[::-1])
  assert np.min(signed[signed > 0]) == pytest.approx(1e-6)
  assert np.min(unsigned[unsigned > 0]) == pytest.approx(1e-7)


@pytest.mark.parametrize("fmt", ql.FORMATS)
def test_rank_is_the_index_at_levels_and_level_value_inverts_it(fmt):
  table = ql.format_levels(fmt).astype(np.float32)
  y = table * (127.0 if fmt == "int8" else 1.0)  # int8 ranks are in code units
  ranks = np.asarray(ql.rank(jnp.asarray(y), fmt))
  np.testing.assert_allclose(ranks, np.arange(table.size), atol=2e-3, rtol=0)
  # Between two levels the rank is linear; level_value maps it back.
  mids = jnp.asarray(np.arange(table.size - 1) + 0.25, jnp.float32)
  back = ql.rank(ql.level_value(mids, fmt), fmt)
  np.testing.assert_allclose(back, mids, atol=2e-3, rtol=0)


def test_unknown_formats_are_refused():
  for bad in ("int4", "NF4", None):
    with pytest.raises(ValueError, match="`format`"):
      ql.format_levels(bad)
