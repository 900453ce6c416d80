"""Converters from other anomaly benchmarks to the MVTec AD folder layout.

* `mstc.convert_mstc`: ShanghaiTech Campus videos and frames -> one category
  per scene (the paper's mSTC).
* `lag.convert_lag`: the LAG glaucoma fundus database -> one category.

Both write into a temporary folder next to the output and rename it into
place only when everything succeeded, and raise `cavga_jax.errors.DataError`
(one line naming the path and the problem) for a wrong or incomplete
download. Command lines: `scripts/convert_mstc.py`, `scripts/convert_lag.py`.
"""

from cavga_jax.data.converters.lag import convert_lag
from cavga_jax.data.converters.mstc import convert_mstc

__all__ = ['convert_lag', 'convert_mstc']
