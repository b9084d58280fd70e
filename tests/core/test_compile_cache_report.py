"""``CacheReport`` (the compile-cache part of ``RFDETR.optimize()``'s cold-start report) sees torch's compile
caches miss in a first compile and hit in a second one from the same cache folder (a CPU stand-in for a
second process; the CUDA graphs themselves are tested on the GPU machine)."""

from __future__ import annotations

import torch

from rfdetr_core.cuda_graphs import CacheReport


def _compiled():
    def f(x):
        return torch.sin(x) * 2 + 1

    return torch.compile(f)


def test_cache_report_counts_a_miss_then_a_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(8)
    torch._dynamo.reset()
    out, first = CacheReport.watch(lambda: _compiled()(x))
    torch.testing.assert_close(out, torch.sin(x) * 2 + 1)
    torch._dynamo.reset()  # forget the compiled frame, as a new process would; the folder stays
    _, second = CacheReport.watch(lambda: _compiled()(x))
    assert first.counts["fxgraph_cache_miss"] >= 1 and first.counts["fxgraph_cache_hit"] == 0, first
    assert second.counts["fxgraph_cache_hit"] >= 1 and second.counts["fxgraph_cache_miss"] == 0, second
    assert set(second.to_dict()) >= {"fxgraph_cache_hit", "autograd_cache_hit", "bypass_reasons"}
    torch._dynamo.reset()
