"""Test-session settings.

float64 is enabled for the whole session: equivalence tests (duality, the
Woodbury solve, projections against NumPy) run in float64 so that their
tolerances reflect the mathematics, not float32 round-off.  Tests of
float32/bfloat16 behaviour create their arrays with explicit dtypes.
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")
