"""Example models and data pipelines used by the optax_lowrank training jobs."""
