"""The one identity of a token sequence: sha256 of its ids as little-endian int32, whatever their container.

Calibration statistics, model cards, release manifests and ``qconvert verify`` results all record it, so two
figures can be compared only when they were measured on the same ids. Qwen2.5's vocabulary (151,936 / 152,064
ids) fits in int32; the shape is not part of the hash.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def tokens_sha256(ids: Any) -> str:
    """sha256 of ``ids`` (a numpy array, a torch tensor or a list of ints) as little-endian int32."""
    if hasattr(ids, "detach"):  # a torch tensor: no torch import needed here
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("token ids do not fit in int32; they are not ids of a Qwen2.5 vocabulary.")
    return hashlib.sha256(np.ascontiguousarray(arr, dtype="<i4").tobytes()).hexdigest()
