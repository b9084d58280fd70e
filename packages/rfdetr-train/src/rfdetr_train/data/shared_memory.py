"""Tensors allocated in shared memory inside DataLoader workers, so handing them to the training process
costs no extra copy (the trick ``torch.utils.data.default_collate`` uses for its stacked batches)."""

from __future__ import annotations

import torch


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` that lives in shared memory inside a loader worker (as ``default_collate`` does), so
    sending it to the training process costs no extra copy; a plain tensor elsewhere."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = 1
    for d in shape:
        numel *= d
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)
