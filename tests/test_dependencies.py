"""The core runs with jax and optax only: flax, orbax and chex are optional.

``pip install optax-lowrank`` installs what ``import optax_lowrank`` needs
(pyproject's ``dependencies``); the NNX layer (``olr.nnx``) needs the ``nnx``
extra.  A fresh interpreter where importing flax, orbax or chex fails stands
in for an environment without them.
"""

import subprocess
import sys
import textwrap

WITHOUT = textwrap.dedent(
    """
    import sys
    for name in ("flax", "orbax", "chex"):   # importing any of them now raises ImportError
      sys.modules[name] = None
    import jax, jax.numpy as jnp, optax
    import optax_lowrank as olr
    """
)

PROGRAM = WITHOUT + textwrap.dedent(
    """
    try:
      olr.nnx
    except ImportError as e:
      print("nnx: ImportError", e.name)
    params = {"w": jnp.ones((8, 6)), "b": jnp.zeros(6)}
    grads = jax.tree.map(lambda x: 0.1 * x + 0.2, params)
    for tx in (olr.galore(1e-2, rank=2), olr.adam_8bit(1e-2)):  # low_rank + svd; 8-bit
      updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
      assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    adapter = olr.adapters.init(params, olr.semi_orthogonal(2))
    lam = olr.adapters.zeros(adapter)
    assert jnp.array_equal(olr.adapters.materialize(adapter, lam)["w"], params["w"])
    print("ok")
    """
)


def test_the_core_imports_and_trains_without_flax_orbax_or_chex():
  out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                       timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert "nnx: ImportError flax" in lines  # the lazy olr.nnx says what is missing
  assert lines[-1] == "ok"
