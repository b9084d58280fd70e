"""The seedable, resumable batch sampler, multi-scale sizes and the loaders built on them."""

from __future__ import annotations

import pytest
import torch

from rfdetr_train.data import (
    ResumableBatchSampler,
    build_train_loader,
    build_val_loader,
    load_dataset,
    multi_scale_sizes,
)
from rfdetr_train.data.synthetic import generate


def _keys(sampler, n):
    out = []
    for _ in range(n):
        batch = next(iter(sampler))
        out.append(batch)
        sampler.advance()
    return out


def test_multi_scale_sizes_match_upstream_grid():
    # seg-medium: 432 +- 5 x 24 (rfdetr-upstream.md 5.1: 312 ... 552)
    sizes = multi_scale_sizes(432, 24)
    assert [s[0] for s in sizes] == list(range(312, 553, 24)) and all(h == w for h, w in sizes)
    assert multi_scale_sizes((192, 256), 32, 2) == [
        (128, 192),
        (160, 224),
        (192, 256),
        (224, 288),
        (256, 320),
    ]
    assert multi_scale_sizes(48, 24, 5) == [
        (24, 24),
        (48, 48),
        (72, 72),
        (96, 96),
        (120, 120),
        (144, 144),
        (168, 168),
    ]


def test_sampler_is_a_function_of_seed_epoch_and_step():
    sizes = multi_scale_sizes(96, 24, 2)
    a = ResumableBatchSampler(10, 3, sizes, seed=7)
    b = ResumableBatchSampler(10, 3, sizes, seed=7)
    c = ResumableBatchSampler(10, 3, sizes, seed=8)
    run_a, run_b, run_c = _keys(a, 9), _keys(b, 9), _keys(c, 9)
    assert run_a == run_b and run_a != run_c
    assert len(a) == 3  # drop_last: 10 // 3
    epoch0 = [k.index for batch in run_a[:3] for k in batch]
    assert len(set(epoch0)) == 9 and run_a[:3] != run_a[3:6], "each epoch reshuffles"
    assert {k.epoch for k in run_a[3]} == {1}
    assert len({batch[0].size for batch in run_a}) > 1, "multi-scale: the size changes with the step"
    assert all(len({k.size for k in batch}) == 1 for batch in run_a), "one size per batch"


def test_resume_from_state_dict_gives_the_same_batches():
    sizes = multi_scale_sizes(96, 24, 3)
    full = _keys(ResumableBatchSampler(11, 2, sizes, seed=3), 12)
    first = ResumableBatchSampler(11, 2, sizes, seed=3)
    head = _keys(first, 7)  # crosses an epoch boundary (5 batches per epoch)
    state = first.state_dict()
    resumed = ResumableBatchSampler(11, 2, sizes, seed=3)
    resumed.load_state_dict(state)
    assert head + _keys(resumed, 5) == full
    with pytest.raises(ValueError, match="batch_size was 2, now 4"):
        ResumableBatchSampler(11, 4, sizes, seed=3).load_state_dict(state)


def test_ranks_get_disjoint_slices_of_each_global_batch():
    sizes = [(64, 64)]
    r0, r1 = (ResumableBatchSampler(20, 3, sizes, seed=1, rank=r, world_size=2) for r in (0, 1))
    single = ResumableBatchSampler(20, 6, sizes, seed=1)
    for _ in range(len(single)):
        a, b, s = next(iter(r0)), next(iter(r1)), next(iter(single))
        assert [k.index for k in a + b] == [k.index for k in s]
        for x in (r0, r1, single):
            x.advance()


def test_tiny_dataset_is_repeated_to_min_batches():
    s = ResumableBatchSampler(3, 2, [(32, 32)], min_batches=4)
    assert len(s) == 4
    idx = [k.index for batch in _keys(s, 4) for k in batch]
    assert len(idx) == 8 and all(idx.count(i) in (2, 3) for i in range(3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("syn"), seed=5, sizes={"train": 10, "val": 5})
    return load_dataset(root)


@pytest.mark.parametrize("workers", [0, 1])
def test_train_loader_resumes_exactly_with_workers(tiny, workers):
    def run(loader, n):
        out = []
        while len(out) < n:
            for batch in loader:
                out.append(batch)
                if len(out) == n:
                    break
        return out

    kw = dict(resolution=96, size_multiple=24, batch_size=3, seed=11, workers=workers, multi_scale_steps=2)
    ref = run(build_train_loader(tiny, **kw), 6)
    first = build_train_loader(tiny, **kw)
    head = run(first, 4)  # 3 batches per epoch: crosses into epoch 1
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 1
    second = build_train_loader(tiny, **kw)
    second.load_state_dict(state)
    tail = run(second, 2)
    for x, y in zip(head + tail, ref):
        assert torch.equal(x.images, y.images)
        assert [t["image_id"] for t in x.targets] == [t["image_id"] for t in y.targets]
        for tx, ty in zip(x.targets, y.targets):
            assert torch.equal(tx["masks"], ty["masks"]) and torch.equal(tx["boxes"], ty["boxes"])
    assert first.timing.batches == 4 and first.timing.data_wait > 0


def test_val_loader_keeps_order_limit_and_source_size(tiny):
    val = build_val_loader(tiny, resolution=(96, 120), batch_size=2, limit=3)
    batches = list(val)
    assert [b.images.shape[0] for b in batches] == [2, 1] and batches[0].images.shape[1:] == (3, 96, 120)
    ids = [t["image_id"] for b in batches for t in b.targets]
    assert ids == val.image_ids == [im["id"] for im in tiny.split("val").coco["images"][:3]]
    t = batches[0].targets[0]
    im = tiny.split("val").coco["images"][0]
    assert t["orig_size"].tolist() == [im["height"], im["width"]] and t["size"].tolist() == [96, 120]
    assert t["masks"].dtype == torch.bool and t["labels"].dtype == torch.int64
    assert ((t["boxes"] > 0) & (t["boxes"] <= 1)).all()


def test_worker_batches_with_a_background_image(tmp_path):
    import json

    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 30), (i * 60, 10, 10)).save(tmp_path / f"{i}.png")
    coco = {
        "images": [{"id": i + 1, "file_name": f"{i}.png", "width": 40, "height": 30} for i in range(3)],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    data = load_dataset(tmp_path / "train.json")
    kw = dict(resolution=48, size_multiple=24, batch_size=3, workers=1, multi_scale=False, transforms="none")
    batch = next(iter(build_train_loader(data, **kw)))
    counts = sorted(len(t["labels"]) for t in batch.targets)
    assert counts == [0, 0, 1] and batch.images.shape == (3, 3, 48, 48)
    empty = next(t for t in batch.targets if len(t["labels"]) == 0)
    assert empty["masks"].shape == (0, 48, 48) and empty["boxes"].shape == (0, 4)
