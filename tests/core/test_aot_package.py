"""rfdetr_core.aot_package: a module compiled ahead of time into the cache folder on the first call and loaded,
without compiling, on the next; the package's outputs equal the module's at other batch sizes (dynamic batch);
the cache name follows the weights. Runs on CPU (a small module: the C++ compile takes ~20 s on 2 cores);
``RFDETR.optimize(compile="aoti")`` on CUDA is tested in test_fast_path_gpu.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rfdetr_core import aot_package


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.conv(images).relu()  # [B, 8, H, W]
        pooled = feats.mean((2, 3))  # [B, 8]
        return self.head(pooled), feats.amax(1)  # [B, 5], [B, H, W]


@pytest.mark.slow
def test_cached_package_compiles_once_then_loads(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = _Small().eval()
    example = torch.randn(2, 3, 16, 16)
    fn, report = aot_package.cached_package(module, example, tmp_path, key={"what": "test"})
    assert not report["hit"] and report["compile_seconds"] > 0 and report["path"].endswith(".pt2")
    assert [p.name for p in tmp_path.iterdir()] == [report["path"].rsplit("/", 1)[-1]]  # no temporary left
    for batch in (1, 3, 5):  # dynamic batch
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = module(x)
        got = fn(x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

    def no_compiling(*args, **kwargs):
        raise AssertionError("the cached package should have been loaded, not compiled")

    monkeypatch.setattr(aot_package, "compile_package", no_compiling)
    again, second = aot_package.cached_package(module, example, tmp_path, key={"what": "test"})
    assert second["hit"] and second["path"] == report["path"] and second["compile_seconds"] == 0
    x = torch.randn(4, 3, 16, 16)
    for g, w in zip(again(x), fn(x), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="should have been loaded"):  # another key is another package
        aot_package.cached_package(module, example, tmp_path, key={"what": "other"})


def test_the_weights_digest_follows_every_weight():
    torch.manual_seed(0)
    module = _Small()
    before = aot_package._weights_digest(module)
    assert aot_package._weights_digest(module) == before
    with torch.no_grad():
        module.head.bias[3] += 1e-6
    assert aot_package._weights_digest(module) != before
    half = _Small().to(torch.bfloat16)  # bf16 tensors are hashed by their bytes too
    assert aot_package._weights_digest(half) != aot_package._weights_digest(half.float())


def test_cuda_packages_need_the_opt_in(monkeypatch):
    """Loading a CUDA package crashed the process on an H200 (torch 2.11): refused, with the way out, unless
    RFDETR_AOTI_CUDA=1; CPU packages are not affected."""
    monkeypatch.delenv(aot_package.CUDA_OPT_IN, raising=False)
    aot_package.check_device_type("cpu")
    with pytest.raises(aot_package.AotiDeviceError, match="RFDETR_AOTI_CUDA=1") as info:
        aot_package.check_device_type("cuda")
    assert "optimize(compile=True)" in str(info.value)
    monkeypatch.setenv(aot_package.CUDA_OPT_IN, "1")
    aot_package.check_device_type("cuda")


def _fake_package(path, device_type: str) -> None:
    """A zip laid out like torch's package with only the metadata file (enough for package_device_type)."""
    import json
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "model/data/aotinductor/model/abc.wrapper_metadata.json",
            json.dumps({aot_package.AOTI_DEVICE_KEY: device_type, "rfdetr_identity": "x"}),
        )


def test_a_cuda_package_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv(aot_package.CUDA_OPT_IN, raising=False)
    cuda_file, cpu_file, other = tmp_path / "cuda.pt2", tmp_path / "cpu.pt2", tmp_path / "other.pt2"
    _fake_package(cuda_file, "cuda")
    _fake_package(cpu_file, "cpu")
    other.write_bytes(b"not a zip")
    assert aot_package.package_device_type(cuda_file) == "cuda"
    assert aot_package.package_device_type(cpu_file) == "cpu"
    assert aot_package.package_device_type(other) is None

    def never(*args, **kwargs):
        raise AssertionError("torch's loader must not be reached for a refused CUDA package")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", never)
    with pytest.raises(aot_package.AotiDeviceError, match="disabled"):
        aot_package.load_package(cuda_file)
    with pytest.raises(AssertionError, match="must not be reached"):  # a CPU package goes on to torch's loader
        aot_package.load_package(cpu_file)
