"""The programs: each takes a run's config, checks it once, and calls the
library with typed settings. `train`, `evaluate`, `predict` (CAVGA),
`train_vae`, `evaluate_vae` (Liu et al.), `one_class`; `runtime` is their
command-line setup."""
