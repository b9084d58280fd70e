"""Variant registry: numbers from the reference, size grids, error messages."""

from __future__ import annotations

import pytest

from rfdetr_core.errors import InvalidResolutionError, UnknownVariantError
from rfdetr_core.variants import get_variant, list_variants

# (name, resolution, grid multiple, windows, decoder layers, queries) from rfdetr-upstream.md sections 1.2-1.3
EXPECTED = [
    ("seg-nano", 312, 12, 1, 4, 100),
    ("seg-small", 384, 24, 2, 4, 100),
    ("seg-medium", 432, 24, 2, 5, 200),
    ("seg-large", 504, 24, 2, 5, 200),
    ("seg-xlarge", 624, 24, 2, 6, 300),
    ("seg-2xlarge", 768, 24, 2, 6, 300),
    ("nano", 384, 32, 2, 2, 300),
    ("small", 512, 32, 2, 3, 300),
    ("medium", 576, 32, 2, 4, 300),
    ("large", 704, 32, 2, 4, 300),
    ("xlarge", 700, 20, 1, 5, 300),
    ("2xlarge", 880, 40, 2, 5, 300),
    ("base", 560, 56, 4, 3, 300),
    ("large-legacy", 560, 56, 4, 3, 300),
]


def test_every_required_variant_is_registered():
    names = set(list_variants())
    assert {row[0] for row in EXPECTED} | {"seg-tiny"} <= names
    assert set(list_variants("segment")) >= {"seg-nano", "seg-2xlarge", "seg-tiny"}
    assert "nano" not in list_variants("segment")


@pytest.mark.parametrize(("name", "res", "multiple", "windows", "dec", "queries"), EXPECTED)
def test_variant_numbers_and_grid(name, res, multiple, windows, dec, queries):
    v = get_variant(name)
    assert (v.resolution, v.size_multiple, v.num_windows, v.dec_layers, v.num_queries) == (
        res,
        multiple,
        windows,
        dec,
        queries,
    )
    assert v.check_resolution(res) == (res, res)
    assert v.check_resolution(res, res + multiple) == (res, res + multiple)
    assert res // v.patch_size == v.positional_encoding_size or name in ("base", "large-legacy")
    with pytest.raises(InvalidResolutionError) as err:
        v.check_resolution(res + 1)
    msg = str(err.value)
    assert f"multiple of {multiple}" in msg and str(res) in msg and str(res + multiple) in msg
    assert isinstance(err.value, ValueError)


def test_weights_md5_and_licences():
    for name in ("xlarge", "2xlarge"):
        w = get_variant(name).weights
        assert w.license == "PML-1.0" and w.md5 is None and w.needs_license_acceptance
    w = get_variant("seg-medium").weights
    assert w.md5 == "a49af1562c3719227ad43d0ca53b4c7a" and not w.needs_license_acceptance
    assert w.url() == "https://storage.googleapis.com/rfdetr/rf-detr-seg-m-ft.pth"
    assert w.url("file:///tmp/w/") == "file:///tmp/w/rf-detr-seg-m-ft.pth"
    assert get_variant("seg-tiny").weights is None


def test_window_blocks_follow_upstream_rule():
    assert get_variant("seg-medium").window_block_indexes == (0, 1, 2, 4, 5, 7, 8, 10, 11)
    assert get_variant("base").window_block_indexes == (0, 1, 3, 4, 6, 7, 9, 10)


def test_lookup_is_forgiving_and_errors_suggest():
    assert get_variant("SEG_MEDIUM").name == "seg-medium"
    assert get_variant("seg-xxlarge").name == "seg-2xlarge"
    with pytest.raises(UnknownVariantError, match="Did you mean 'seg-medium'"):
        get_variant("seg-meduim")


def test_error_for_tiny_and_non_integer_sizes():
    v = get_variant("seg-medium")
    with pytest.raises(InvalidResolutionError, match="Nearest valid sizes: 24, 48"):
        v.check_resolution(5)
    with pytest.raises(InvalidResolutionError, match="must be an integer"):
        v.check_resolution(432.0)
    with pytest.raises(InvalidResolutionError, match="width 100"):
        v.check_resolution(432, 100)
