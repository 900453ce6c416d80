"""cavga_jax: CAVGA (attention-guided anomaly localization with VAEs) in JAX/Flax."""

__version__ = "0.1.0"
