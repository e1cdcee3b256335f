"""olr.memory: exact optimizer-state bytes by kind and leaf; compiled step memory."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_lowrank as olr
from optax_lowrank import memory

M, N, R = 24, 16, 4  # tall leaf: right side, coefficients M×R, projector N×R
PARAMS = {"w": jax.ShapeDtypeStruct((M, N), jnp.float32),
          "b": jax.ShapeDtypeStruct((N,), jnp.float32)}
F32 = 4


def test_galore_state_is_adam_on_coefficients_plus_one_projector():
  sb = memory.state_bytes(olr.galore(1e-3, rank=R), PARAMS)
  assert sb.by_leaf["w"] == {"inner": 2 * M * R * F32, "projector": N * R * F32, "key": 0,
                             "history": 0, "counter": 0}
  assert sb.by_leaf["b"]["inner"] == 2 * N * F32
  assert sb.by_kind["key"] == 8  # one uint32[2] PRNG key
  assert sb.by_kind["counter"] == 2 * 4  # low_rank's and Adam's int32 counts
  assert sb.total == 2 * (M * R + N) * F32 + N * R * F32 + 8 + 8


def test_flora_stores_no_projector():
  sb = memory.state_bytes(olr.flora(1e-3, rank=R), PARAMS)
  assert sb.by_kind["projector"] == 0
  assert sb.by_leaf["w"]["inner"] == 2 * M * R * F32


def test_natural_galore_history_is_s_coefficients_plus_gram():
  s = 5
  sb = memory.state_bytes(olr.natural_galore(1e-3, rank=R, history=s), PARAMS)
  assert sb.by_leaf["w"]["history"] == (s * M * R + s * s) * F32
  assert sb.by_leaf["b"]["history"] == 0  # unprojected leaves get plain Adam
  assert sb.by_leaf["w"]["inner"] == 2 * M * R * F32


class _UserState(NamedTuple):
  count: jax.Array
  key: jax.Array  # a user's field named like LowRankState's: statistics all the same
  history: jax.Array
  v: jax.Array


def _user_tx():
  def init(params):
    w = params["w"]
    return _UserState(jnp.zeros([], jnp.int32), jnp.zeros_like(w), jnp.zeros_like(w),
                      jnp.zeros_like(w))
  return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_state_kinds_come_from_the_state_type_not_the_field_name():
  params = {"w": PARAMS["w"]}
  sb = memory.state_bytes(_user_tx(), params)
  assert sb.by_kind == {"inner": 3 * M * N * F32, "projector": 0, "key": 0, "history": 0,
                        "counter": 4}
  told = memory.state_bytes(_user_tx(), params, fields={_UserState: {"history": "history"}})
  assert told.by_kind["history"] == M * N * F32 and told.by_kind["inner"] == 2 * M * N * F32
  # inside olr.low_rank the same user state is the inner state: its fields are still inner
  sb = memory.state_bytes(olr.low_rank(_user_tx(), olr.svd(R)), params)
  assert sb.by_kind["history"] == 0 and sb.by_kind["projector"] == N * R * F32
  with pytest.raises(ValueError, match="kinds"):
    memory.state_bytes(_user_tx(), params, fields={_UserState: {"v": "moment"}})


def test_compare_has_the_baselines_and_adam_is_twice_the_params():
  rows = memory.compare(PARAMS, {"galore": olr.galore(1e-3, rank=R)})
  assert list(rows) == ["optax.adam", "optax.adafactor", "galore"]
  assert rows["optax.adam"].by_kind["inner"] == 2 * (M * N + N) * F32
  assert rows["galore"].total < rows["optax.adam"].total
  table = memory.format_table(rows)
  assert "galore" in table and "projector" in table


def test_step_memory_reads_xla_buffer_assignment():
  def step(x, y):
    return x @ y, x + 1

  x = jnp.ones((64, 64), jnp.float32)
  m = memory.step_memory(step, x, x)
  assert m.arguments == 2 * 64 * 64 * F32
  # the two result buffers, plus XLA's small tuple of pointers to them on CPU
  assert 0 <= m.outputs - 2 * 64 * 64 * F32 <= 64
  donated = memory.step_memory(step, x, x, donate_argnums=(0,))
  assert donated.aliased == 64 * 64 * F32
  # donating x lets x + 1 be written over it: the step holds one 64×64 buffer less
  assert m.peak - donated.peak == 64 * 64 * F32
  assert donated.peak >= 3 * 64 * 64 * F32  # x (then x + 1), y and x @ y


@pytest.mark.parametrize("unit", ["B", "MiB"])
def test_format_table_for_step_memory(unit):
  x = jnp.ones((8, 8), jnp.float32)
  text = memory.format_table({"f": memory.step_memory(lambda a: a * 2, x)}, unit=unit)
  assert "peak" in text and unit in text


def test_compiled_peak_ordering_on_a_weight_dominated_llama():
  # A Llama whose weights dominate its activations (batch 1 × 8 tokens), as in
  # LLM training at scale.  XLA's buffer assignment is deterministic for a
  # given program, so the ordering is a property of the programs, not noise.
  from benchmarks.memory import measure
  from examples.llama import LlamaConfig

  config = LlamaConfig(dim=128, n_layers=1, n_heads=4, hidden_dim=352, max_seq_len=8)
  measured = measure(config, rank=8, batch_size=1, donation=(False, True))
  a, b, c, d, e = (measured[k][0] for k in sorted(measured))  # without donation
  assert c.peak < b.peak < a.peak  # adapter path < gradient path < full-rank AdamW
  assert d.arguments < c.arguments  # the INT8 base is smaller to hold...
  for donated in (0, 1):
    a, b, c, d, e = (measured[k][donated] for k in sorted(measured))
    # ... and to run: each layer's weights are dequantized only around its own
    # forward and backward products (olr.nnx's custom VJP), not all kept alive.
    assert d.peak < c.peak
    # 8-bit Adam on Λ: the float moments of one leaf at a time (quantization.tie)
    assert e.peak < c.peak
