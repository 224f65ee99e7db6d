"""The error every checkpoint reader raises (`hf`, `npz`), and the finiteness check they share."""

from __future__ import annotations

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, or does not fit the model."""


def check_finite(array: np.ndarray, what: str) -> None:
  """Raises CheckpointError naming `what` if a float `array` holds NaN or Inf (a frozen weight
  that is not finite makes every client's update non-finite, every round).

  Args:
    array: any shape; integer arrays pass unchecked.
    what: how the error names the array (its file and tensor name).
  """
  array = np.asarray(array)
  if array.dtype.kind == "f" or "float" in array.dtype.name:  # bfloat16 (ml_dtypes) included.
    bad = ~np.isfinite(array.astype(np.float32, copy=False))
    if bad.any():
      raise CheckpointError(
        f"{what} holds {int(bad.sum())} non-finite value(s) of {array.size}; a frozen weight must be finite"
      )
