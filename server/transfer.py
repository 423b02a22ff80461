"""Host values onto the device without making the host wait. A copy from pageable memory returns
only when the GPU has finished everything queued before it, which would stop the host from
preparing the next step while this one runs (async scheduling); a pinned, non-blocking copy does not."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_device(values: np.ndarray | list, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """`values` as a tensor on `device` (on the CPU it may share the array's memory)."""
    if isinstance(values, np.ndarray):
        values = np.ascontiguousarray(values)
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
