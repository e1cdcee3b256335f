"""Test-session settings.

float64 is enabled for the whole session: equivalence tests (duality, the
Woodbury solve, projections against NumPy) run in float64 so that their
tolerances reflect the mathematics, not float32 round-off.  Tests of
float32/bfloat16 behaviour create their arrays with explicit dtypes.
"""

import os

# Multi-threaded OpenBLAS (behind the CPU QR/SVD kernels) stalls on small,
# shared 2-core machines; one thread is faster and steadier there.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("ci")
