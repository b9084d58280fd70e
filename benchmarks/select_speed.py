"""GPU time of the graph-safe top-K selection (``rfdetr_core.postprocess.select_topk``) against alternatives.

    python benchmarks/select_speed.py [--iters 200] [--json OUT.json]

For each (batch, queries x slots, K) of the seg variants (seg-nano 100 queries, seg-medium/large 200, 91 slots,
``K = queries`` as ``RFDETR.optimize`` keeps) it times, eager and replayed as a CUDA graph (CUDA events, median
of ``--iters``):

- ``current``: ``select_topk`` as it is (on CUDA since 2026-12-07 evening: the stable sort);
- ``partition``: its CPU/export path (``topk`` for the K-th score, a stable partition, a K x K rank);
- ``topk_keys``: the rule before 2026-12-07 (chosen indexes ordered by a second ``topk`` over int64 keys and a
  ``sort``), kept here as the baseline;
- ``stable_sort``: one ``argsort(stable=True)`` of all ``Q*S`` scores (what the rule equals; not exportable as a
  bounded ONNX ``TopK``).

Every variant's indexes are checked equal to ``stable_sort``'s first.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from gpu_inference_vs_upstream import time_calls  # benchmarks/ is on the path when run as a script

from rfdetr_core.postprocess import _top_pairs_in_order, select_topk


def topk_keys(logits: torch.Tensor, n: int):
    """The selection as written before 2026-12-07 (baseline)."""
    batch, _, num_slots = logits.shape
    probs = logits.sigmoid().reshape(batch, -1)
    total = probs.shape[1]
    kth = probs.topk(n, dim=1).values[:, n - 1 :]
    above, ties = probs > kth, probs == kth
    room = n - above.sum(dim=1, keepdim=True)
    chosen = above | (ties & (ties.cumsum(dim=1) <= room))
    key = torch.where(chosen, total - torch.arange(total, device=probs.device), 0)
    index = key.topk(n, dim=1).indices.sort(dim=1).values
    scores = probs.gather(1, index)
    earlier = torch.ones(n, n, dtype=torch.bool, device=probs.device).tril(-1)
    s_j, s_l = scores[:, :, None], scores[:, None, :]
    rank = ((s_l > s_j) | ((s_l == s_j) & earlier)).sum(dim=2)
    order = torch.empty_like(rank).scatter_(1, rank, torch.arange(n, device=probs.device).expand(batch, n))
    index = index.gather(1, order)
    return scores.gather(1, order), index % num_slots, index // num_slots


def partition(logits: torch.Tensor, n: int):
    batch, _, num_slots = logits.shape
    probs = logits.sigmoid().reshape(batch, -1)
    index = _top_pairs_in_order(probs, n)
    return probs.gather(1, index), index % num_slots, index // num_slots


def stable_sort(logits: torch.Tensor, n: int):
    batch, _, num_slots = logits.shape
    probs = logits.sigmoid().reshape(batch, -1)
    scores, index = probs.sort(dim=1, descending=True, stable=True)
    index = index[:, :n]
    return scores[:, :n], index % num_slots, index // num_slots


def _time(fn, iters: int) -> tuple[float, float]:
    """(eager, graph) median milliseconds of ``fn()``."""
    for _ in range(3):
        fn()
    times = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for name, call in (("eager", fn), ("graph", graph.replay)):
        times[name] = statistics.median(time_calls(call, iters))
    return times["eager"], times["graph"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("select_speed.py times CUDA kernels: run it on a machine with a CUDA device")
    torch.manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms median, eager / CUDA graph")
    for batch in (1, 8):
        for queries in (100, 200):
            logits = torch.randn(batch, queries, 91, device="cuda") * 3
            want = stable_sort(logits, queries)
            row = {"batch": batch, "queries": queries, "slots": 91, "k": queries}
            for name, fn in (
                ("current", select_topk),
                ("partition", partition),
                ("topk_keys", topk_keys),
                ("stable_sort", stable_sort),
            ):
                got = fn(logits, queries)
                if not all(torch.equal(a, b) for a, b in zip(got, want)):
                    raise SystemExit(
                        f"{name} disagrees with the stable sort at batch {batch}, {queries} queries"
                    )
                row[name] = _time(lambda fn=fn, x=logits, k=queries: fn(x, k), args.iters)
            rows.append(row)
            print(
                f"B={batch} Q={queries}: "
                + ", ".join(
                    f"{k} {row[k][0]:.3f} / {row[k][1]:.3f}" for k in ("current", "partition", "topk_keys", "stable_sort")
                )
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
