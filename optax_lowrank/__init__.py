"""optax_lowrank: memory-efficient training by linear gradient transformations.

Project gradients into a small space, run any optax optimizer there, project
back (``low_rank``); or train the dual linear adapter ``Θ0 + SᵀΛ``
(``adapters``).  See ``docs/`` and the README.
"""

from typing import TYPE_CHECKING

from optax_lowrank import (
    adapters,
    distributed,
    eight_bit,
    full_rank,
    layerwise,
    memory,
    quantization,
    quantized_merge,
    refresh_schedule,
    testing,
)
from optax_lowrank.adafactor_momentum import adamem, adamem_state_bytes, scale_by_adamem
from optax_lowrank.bases import Basis, project, project_back
from optax_lowrank.eight_bit import adam_8bit, scale_by_adam_8bit
from optax_lowrank.leaves import stacked
from optax_lowrank.low_rank import LowRankState, low_rank
from optax_lowrank.projections import (
    Projection,
    dense,
    gaussian,
    rademacher,
    randomized_svd,
    semi_orthogonal,
    subspace_iteration,
    svd,
    tucker,
    two_sided,
)
from optax_lowrank.recipes import (
    adam_in_subspace,
    apollo,
    apollo_mini,
    fira,
    flora,
    galore,
    natural_galore,
)
from optax_lowrank.woodbury import woodbury_precondition, woodbury_solve

__version__ = "0.1.0"

# Modules that import flax load on first use (``olr.nnx``), so the core needs only
# jax and optax: ``pip install optax-lowrank[nnx]`` brings flax.
_LAZY_MODULES = ("nnx",)

if TYPE_CHECKING:
  from optax_lowrank import nnx


def __getattr__(name: str):
  if name in _LAZY_MODULES:
    import importlib

    module = importlib.import_module(f"optax_lowrank.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module 'optax_lowrank' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY_MODULES))


__all__ = [
    "Basis",
    "adapters",
    "distributed",
    "adam_8bit",
    "eight_bit",
    "layerwise",
    "quantization",
    "quantized_merge",
    "scale_by_adam_8bit",
    "memory",
    "nnx",
    "testing",
    "LowRankState",
    "Projection",
    "adam_in_subspace",
    "apollo",
    "apollo_mini",
    "fira",
    "full_rank",
    "adamem",
    "adamem_state_bytes",
    "scale_by_adamem",
    "dense",
    "flora",
    "galore",
    "gaussian",
    "low_rank",
    "natural_galore",
    "project",
    "project_back",
    "rademacher",
    "randomized_svd",
    "refresh_schedule",
    "subspace_iteration",
    "semi_orthogonal",
    "stacked",
    "svd",
    "tucker",
    "two_sided",
    "woodbury_precondition",
    "woodbury_solve",
]
