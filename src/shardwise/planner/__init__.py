"""Which layout (tp, dp, sequence parallelism, overlap) to use, and why: cost model, calibration, ranking."""

from . import costmodel as costmodel
