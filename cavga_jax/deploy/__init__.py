"""Deployment: a trained run's headline map for new images (`scorer`),
serialized with `jax.export` (`export`), and where `predict.py` may write
(`predict_output`)."""
