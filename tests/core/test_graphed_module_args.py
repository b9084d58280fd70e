"""``GraphedModule``'s arguments, checked before anything is compiled or captured (the capture itself needs a GPU:
tests/core/test_fast_path_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from rfdetr_core.cuda_graphs import COMPILE_MODES, GraphedModule


def test_compile_modes_never_ask_inductor_for_its_own_cuda_graphs():
    # the module captures the graph itself; "reduce-overhead"-style modes would capture inside the capture
    assert all(mode is None or mode.endswith("-no-cudagraphs") for mode in COMPILE_MODES.values())


@pytest.mark.parametrize("compile_arg", ["reduce-overhead", "max-autotune-no-cudagraphs", "default"])
def test_unknown_compile_values_are_refused(compile_arg):
    with pytest.raises(ValueError, match="compile must be False, True or 'max-autotune'"):
        GraphedModule(torch.nn.Linear(2, 2), (4, 4), compile=compile_arg)


@pytest.mark.parametrize("compile_arg", [False, True, "max-autotune"])
def test_a_cpu_module_is_refused_whatever_the_compile_mode(compile_arg):
    with pytest.raises(ValueError, match="CUDA graphs need the module on a CUDA device"):
        GraphedModule(torch.nn.Linear(2, 2), (4, 4), compile=compile_arg)
