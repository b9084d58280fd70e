"""Which implementation ``torch.ops.rfdetr.ms_deform_attn`` runs: ``$RFDETR_DEFORM_ATTN`` and :func:`use_backend`.

Backends:

* ``auto`` (default): CUDA tensors use the kernel from ``csrc/`` if it builds, otherwise (one warning line)
  the ``pytorch`` path; CPU tensors use the ``pytorch`` path.
* ``cuda``: CUDA tensors use the kernel; a kernel that cannot be built is an error
  (:class:`rfdetr_core.ops.KernelBuildError`), never a fallback. CPU tensors use the ``pytorch`` path.
* ``pytorch``: ``F.grid_sample`` per level (:func:`rfdetr_core.ops.deform_attn.ms_deform_attn_pytorch`) on any
  device, never building anything.
* ``gather``: bilinear sampling built from one gather (:func:`rfdetr_core.ops.deform_attn.ms_deform_attn_gather`)
  on any device: same numbers as ``pytorch``, no ``GridSample`` in an exported graph (TensorRT miscompiles it).

``RFDETR_DEFORM_ATTN`` sets the process default; ``with use_backend(name):`` overrides it for the code inside
the block, in the current thread or asyncio task only (a :class:`contextvars.ContextVar`). The choice is read
when the op runs, so for ``torch.compile``, ``torch.jit.trace`` and ONNX export it is the choice in force while
the graph is traced.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from rfdetr_core.errors import RFDETRError

BACKEND_ENV = "RFDETR_DEFORM_ATTN"
BACKENDS = ("auto", "cuda", "pytorch", "gather")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rfdetr_deform_attn_backend", default=None
)


def _checked(choice: str, source: str) -> str:
    choice = choice.strip().lower() or "auto"
    if choice not in BACKENDS:
        raise RFDETRError(f"{source}={choice!r} is not one of {', '.join(BACKENDS)}; pick one of those.")
    return choice


def requested_backend() -> str:
    """The backend in force: the innermost :func:`use_backend` block, else ``$RFDETR_DEFORM_ATTN`` (``auto``)."""
    override = _override.get()
    if override is not None:
        return override
    return _checked(os.environ.get(BACKEND_ENV, "auto"), BACKEND_ENV)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the deformable attention inside the block on backend ``name`` (one of :data:`BACKENDS`).

    ``cuda`` builds (or loads) the kernel on entry and raises :class:`rfdetr_core.ops.KernelBuildError` there
    when it cannot be built. Blocks nest; the previous choice comes back on exit. Yields the backend name.
    """
    choice = _checked(name, "use_backend(name)")
    token = _override.set(choice)
    try:
        if choice == "cuda":
            from rfdetr_core.ops.cuda_ext import use_cuda_kernel

            use_cuda_kernel()  # raises KernelBuildError for "cuda" when the kernel cannot be built
        yield choice
    finally:
        _override.reset(token)
