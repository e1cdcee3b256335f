"""The real TPU compiler, run on this machine without a TPU.

``libtpu`` (``pip install "jax[tpu]==<jax version>"`` brings the one built for
our jax) compiles for a TPU *topology* from
:func:`jax.experimental.topologies.get_topology_desc`: the devices exist only
as compile targets, nothing is allocated or run ("deviceless" ahead-of-time
compilation).  Each test lowers and compiles one jitted train step of a tiny
Llama (bf16 weights and compute) for a v5e and a v5p topology: every recipe,
``low_rank`` under every refresh policy, the adapter path with
``LowRankLinear`` on a float, INT8 and NF4 base, and an FSDP step sharded over
4 devices of the topology.  The test passes when the TPU compiler accepts the
step (the optimized HLO carries TPU tiled layouts) and its memory figures
are consistent; the figures are printed at the end (``-s`` or the CI log).

Skipped when ``libtpu`` is not installed.  CI installs it and runs::

    JAX_PLATFORMS=cpu python -m pytest -n auto -m tpu

``JAX_PLATFORMS=cpu`` keeps the default backend on the CPU (the topology API
does not need the TPU backend); the steps are compiled with float64 off,
since the TPU has no float64 (the test session enables it, see conftest).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest

if importlib.util.find_spec("libtpu") is None:
  pytest.skip("libtpu is not installed (pip install 'jax[tpu]==<jax version>')",
              allow_module_level=True)

# Quiet libtpu's start-up probe of TPU workers and metadata (there is no TPU
# here), and let another process hold libtpu at the same time (a benchmark).
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_lowrank as olr  # noqa: E402
from examples.llama import STACKED_RULE, Llama, LlamaConfig, loss_fn  # noqa: E402
from optax_lowrank import adapters  # noqa: E402
from optax_lowrank import distributed as dist  # noqa: E402

pytestmark = pytest.mark.tpu

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1"}
LR = 1e-3
RANK = 8
BATCH = (4, 17)  # 4 sequences of 16 tokens (+1 for the shifted targets)


def _config(scan: bool) -> LlamaConfig:
  return LlamaConfig.preset("tiny", scan_layers=scan, param_dtype=jnp.bfloat16,
                            dtype=jnp.bfloat16, remat=scan)


def is_block_kernel(path, leaf) -> bool:
  del leaf
  return "layers" in path and "kernel" in path


def _projected(**kw):
  return dict(where=is_block_kernel, reshape=STACKED_RULE, **kw)


def _low_rank(spec, on_refresh="keep", inner=None):
  return olr.low_rank(inner or optax.adam(LR), spec, refresh_every=4, on_refresh=on_refresh,
                      scale=0.25, **_projected())


# The gradient path: name -> the optimizer of the scanned model (stacked kernels
# projected per layer through STACKED_RULE, everything else at full size).
GRADIENT_PATH = {
    "adamw": lambda: optax.adamw(LR, weight_decay=0.01),
    "adam_8bit": lambda: olr.adam_8bit(LR, min_8bit_size=0),
    "galore": lambda: olr.galore(LR, rank=RANK, refresh_every=4, **_projected()),
    "flora": lambda: olr.flora(LR, rank=RANK, refresh_every=4, **_projected()),
    "natural_galore": lambda: olr.natural_galore(LR, rank=RANK, history=4, refresh_every=4,
                                                 **_projected()),
    "adamem": lambda: olr.adamem(LR, rank=RANK, refresh_every=4, **_projected()),
    "low_rank-adam_8bit-svd": lambda: _low_rank(olr.svd(RANK),
                                                inner=olr.adam_8bit(LR, min_8bit_size=0)),
    "low_rank-two_sided": lambda: _low_rank(olr.two_sided(RANK, RANK)),
    # Tucker on the 3-d stacked kernel itself: one factor per mode (layer, in, out).
    "low_rank-tucker": lambda: olr.low_rank(optax.adam(LR), olr.tucker((2, RANK, RANK)),
                                            refresh_every=4, where=is_block_kernel),
    "low_rank-randomized_svd": lambda: _low_rank(olr.randomized_svd(RANK)),
    "low_rank-svd-keep": lambda: _low_rank(olr.svd(RANK), "keep"),
    "low_rank-svd-reset": lambda: _low_rank(olr.svd(RANK), "reset"),
    "low_rank-svd-transport": lambda: _low_rank(olr.svd(RANK), "transport"),
}
ADAPTER_BASES = {"adapter-float": None, "adapter-int8": "int8", "adapter-nf4": "nf4"}


# v5p compiles every case; v5e (another chip generation: one TensorCore per
# chip, less HBM) the ones most likely to lower differently (decompositions,
# 8-bit codes, NF4 unpacking, collectives), which keeps the CI step short.
V5E_CASES = {"adamw", "galore", "adamem", "low_rank-adam_8bit-svd", "adapter-nf4"}


def _cases(names):
  return [(topo, name) for topo in TOPOLOGIES for name in names
          if topo == "v5p" or name in V5E_CASES]


@functools.cache
def _topology(name):
  return topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[name])


@pytest.fixture(scope="module")
def report(request):
  """Collects one row per compiled step; prints them as a table at the end."""
  rows: list[tuple[str, str, dict]] = []
  yield rows
  lines = [f"{'TPU step (tiny Llama, bf16)':<34}{'topology':>9}"
           + "".join(f"{c:>12}" for c in ("peak", "args", "temp", "aliased")) + "   (KiB)"]
  for name, topo, m in rows:
    lines.append(f"{name:<34}{topo:>9}" + "".join(
        f"{m[k] / 1024:>12.1f}" for k in ("peak", "arguments", "temporaries", "aliased")))
  reporter = request.config.pluginmanager.get_plugin("terminalreporter")
  write = reporter.write_line if reporter is not None else print
  write("")
  for line in lines:
    write(line)


def _abstract(tree, sharding=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _compile_step(loss, tx, trainable, frozen, batch, in_shardings=None, out_shardings=None):
  """Lower and compile ``grad -> tx.update -> apply_updates``, trainable and state donated."""
  opt_state = jax.eval_shape(tx.init, trainable)

  def step(trainable, opt_state, frozen, batch):
    grads = jax.grad(loss)(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  jitted = jax.jit(step, donate_argnums=(0, 1), in_shardings=in_shardings,
                   out_shardings=out_shardings)
  compiled = jitted.lower(trainable, opt_state, frozen, batch).compile()
  return compiled, opt_state


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def _check(compiled, trainable, opt_state, frozen, name, topology, report, shards=1):
  """The TPU compiler made this step, and its figures add up (per device)."""
  text = compiled.as_text()
  # TPU layouts are tiled, e.g. bf16[32,64]{1,0:T(8,128)(2,1)}; XLA:CPU's are not.
  assert ":T(" in text, f"{name}: not compiled by the TPU compiler"
  m = _memory(compiled)
  # Every argument is held (TPU tiles pad small arrays, so at least their bytes).
  assert m["arguments"] >= _nbytes((trainable, opt_state, frozen)) // shards
  # The donated weights and optimizer state are reused for the new ones.
  assert 0 < m["aliased"] <= m["arguments"]
  assert m["peak"] >= m["arguments"]
  report.append((name, topology, m))


def _split(model):
  graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

  def loss(trainable, frozen, batch):
    return loss_fn(nnx.merge(graphdef, trainable, frozen), batch)

  return loss, trainable, frozen


def _on_device(trees, device):
  sharding = jax.sharding.SingleDeviceSharding(device)
  return [_abstract(t, sharding) for t in trees]


@pytest.mark.parametrize(("topo_name", "name"), _cases(GRADIENT_PATH))
def test_gradient_path_compiles_for_tpu(report, topo_name, name):
  topo = _topology(topo_name)
  with jax.enable_x64(False):
    model = nnx.eval_shape(lambda: Llama(_config(scan=True), rngs=nnx.Rngs(0)))
    loss, trainable, frozen = _split(model)
    batch = jax.ShapeDtypeStruct(BATCH, jnp.int32)
    trainable, frozen, batch = _on_device((trainable, frozen, batch), topo.devices[0])
    compiled, opt_state = _compile_step(loss, GRADIENT_PATH[name](), trainable, frozen, batch)
    _check(compiled, trainable, opt_state, frozen, name, topo_name, report)


@pytest.mark.parametrize(("topo_name", "name"), _cases(ADAPTER_BASES))
def test_adapter_path_compiles_for_tpu(report, topo_name, name):
  """LowRankLinear layers (Gaussian bases) on a float, INT8 or NF4 base; Adam on Λ."""
  topo = _topology(topo_name)
  with jax.enable_x64(False):
    model = Llama(_config(scan=False), rngs=nnx.Rngs(0))  # tiny: built on the CPU
    adapter = adapters.init(nnx.state(model, nnx.Param), olr.gaussian(RANK),
                            where=is_block_kernel)
    if ADAPTER_BASES[name] is not None:
      adapter = adapters.quantize_base(adapter, ADAPTER_BASES[name])
    olr.nnx.to_low_rank(model, adapter)
    loss, trainable, frozen = _split(model)
    tx = olr.nnx.optimizer(optax.adam(LR), scale=0.25)
    batch = jax.ShapeDtypeStruct(BATCH, jnp.int32)
    trainable, frozen, batch = _on_device((trainable, frozen, batch), topo.devices[0])
    compiled, opt_state = _compile_step(loss, tx, trainable, frozen, batch)
    _check(compiled, trainable, opt_state, frozen, name, topo_name, report)


def _fsdp_spec(leaf) -> P:
  """Rows of every matrix over the 4 devices (layer axis of a stack replicated)."""
  if leaf.ndim == 3 and leaf.shape[1] % 4 == 0:
    return P(None, "fsdp", None)
  if leaf.ndim == 2 and leaf.shape[0] % 4 == 0:
    return P("fsdp", None)
  return P()


@pytest.mark.parametrize("topo_name", list(TOPOLOGIES))
def test_fsdp_sharded_galore_step_compiles_for_4_tpu_devices(report, topo_name):
  topo = _topology(topo_name)
  mesh = Mesh(np.array(topo.devices[:4]), ("fsdp",))
  with jax.enable_x64(False):
    model = nnx.eval_shape(lambda: Llama(_config(scan=True), rngs=nnx.Rngs(0)))
    loss, trainable, frozen = _split(model)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(x)), trainable)
    trainable = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable, shardings)
    frozen = _abstract(frozen, NamedSharding(mesh, P()))
    batch = jax.ShapeDtypeStruct(BATCH, jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))
    tx = olr.galore(LR, rank=RANK, refresh_every=4, **_projected())
    state_sh = dist.state_shardings(tx, trainable)
    opt_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(tx.init, trainable), state_sh)

    def step(trainable, opt_state, frozen, batch):
      grads = jax.grad(loss)(trainable, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state

    compiled = (jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings, state_sh))
                .lower(trainable, opt_state, frozen, batch).compile())
    # The step runs on the 4 devices, and the weights stay row-sharded.
    out_sh = compiled.output_shardings[0]
    kernel = out_sh["layers"]["ffn"]["w1"]["kernel"]
    assert kernel.spec == P(None, "fsdp", None)
    assert len(kernel.device_set) == 4
    _check(compiled, trainable, opt_state, frozen, "fsdp-galore (4 devices)", topo_name,
           report, shards=4)
