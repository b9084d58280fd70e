"""Registry of model variants: architecture numbers, default resolution, size grid and pretrained weights.

Numbers follow the upstream RF-DETR 1.11.2 configurations (Robinson et al., "RF-DETR: Real-Time Detection
Transformer", arXiv 2511.09554), as described in ``shared/reference/rfdetr-upstream.md`` sections 1-2.

Every input side must be a multiple of ``patch_size * num_windows`` (the "size grid"): the patch grid is cut
into ``num_windows x num_windows`` equal windows. :meth:`Variant.check_resolution` raises a
:class:`~rfdetr_core.errors.InvalidResolutionError` naming the nearest valid sizes otherwise.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from rfdetr_core.errors import InvalidResolutionError, UnknownVariantError
from rfdetr_core.models.spec import valid_sizes

WEIGHTS_BASE_URL = "https://storage.googleapis.com/rfdetr"

APACHE = "Apache-2.0"
# Roboflow Platform Model License: needs an explicit acceptance (and a Roboflow plan) before download.
PML = "PML-1.0"


@dataclass(frozen=True)
class PretrainedWeights:
    """Where official weights live and how to check them.

    ``remote`` is the path under the weights base URL; ``filename`` the name in ``RFDETR_HOME/weights``.
    ``md5`` is ``None`` where upstream publishes none (the PML-licensed files).
    """

    filename: str
    remote: str
    md5: str | None
    license: str = APACHE

    @property
    def needs_license_acceptance(self) -> bool:
        return self.license != APACHE

    def url(self, base: str = WEIGHTS_BASE_URL) -> str:
        return f"{base.rstrip('/')}/{self.remote}"


@dataclass(frozen=True)
class Variant:
    """Architecture of one registered model.

    Encoder: a DINOv2 ViT (``encoder_dim`` wide, ``encoder_depth`` blocks, ``encoder_heads`` heads) with
    ``num_windows`` x ``num_windows`` windowed attention; ``out_feature_indexes`` are the 1-based stages
    (hidden-state indexes) fed to the projector. Decoder: ``dec_layers`` deformable layers of width
    ``hidden_dim``. ``num_classes`` counts real classes of the pretrained head; :attr:`default_slots` gives
    the logit slots (slot = COCO category id for upstream weights).
    """

    name: str
    task: str  # "segment" or "detect"
    resolution: int
    patch_size: int
    num_windows: int
    positional_encoding_size: int
    out_feature_indexes: tuple[int, ...]
    dec_layers: int
    num_queries: int
    encoder_dim: int = 384
    encoder_depth: int = 12
    encoder_heads: int = 6
    hidden_dim: int = 256
    sa_nheads: int = 8
    ca_nheads: int = 16
    dec_n_points: int = 2
    dim_feedforward: int = 2048
    group_detr: int = 13
    projector_scale: tuple[str, ...] = ("P4",)
    num_select: int | None = None  # detections kept by post-processing; defaults to num_queries
    num_classes: int = 90
    mask_downsample_ratio: int = 4
    weights: PretrainedWeights | None = None
    placeholder: bool = False
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def is_segmentation(self) -> bool:
        return self.task == "segment"

    @property
    def default_slots(self) -> int:
        """Logit slots of the pretrained head: ``num_classes`` real classes + 1 background/no-object slot
        (upstream's layout: 90 COCO classes -> 91 slots, slot = category id)."""
        return self.num_classes + 1

    @property
    def size_multiple(self) -> int:
        """Every input side must be a multiple of this (patch size x windows)."""
        return self.patch_size * self.num_windows

    @property
    def default_num_select(self) -> int:
        return self.num_select if self.num_select is not None else self.num_queries

    @property
    def window_block_indexes(self) -> tuple[int, ...]:
        """0-based blocks running windowed attention; the others attend globally.

        Upstream's rule, kept for checkpoint compatibility: blocks ``0..max(out_feature_indexes)`` minus the
        raw ``out_feature_indexes`` numbers (so [3,6,9,12] gives global attention at blocks 3, 6 and 9).
        """
        last = max(self.out_feature_indexes)
        return tuple(
            i for i in range(last + 1) if i not in self.out_feature_indexes and i < self.encoder_depth
        )

    def valid_sizes(self, around: int, count: int = 2) -> list[int]:
        """The ``count`` valid sizes just below and above ``around`` (positive only)."""
        return valid_sizes(self.size_multiple, around, count)

    def check_resolution(self, height: int, width: int | None = None) -> tuple[int, int]:
        """Return ``(height, width)`` or raise :class:`InvalidResolutionError` naming the nearest valid sizes."""
        width = height if width is None else width
        m = self.size_multiple
        for side_name, side in (("height", height), ("width", width)):
            if not isinstance(side, int) or isinstance(side, bool):
                raise InvalidResolutionError(f"{self.name}: {side_name} must be an integer, got {side!r}.")
            if side <= 0 or side % m:
                near = ", ".join(str(s) for s in self.valid_sizes(max(side, 1)))
                raise InvalidResolutionError(
                    f"{self.name}: {side_name} {side} is not a multiple of {m} "
                    f"(patch size {self.patch_size} x {self.num_windows} window(s) per side). "
                    f"Nearest valid sizes: {near}."
                )
        return height, width

    def with_overrides(self, **changes) -> Variant:
        """A copy with some fields changed (e.g. ``num_queries``)."""
        return replace(self, **changes)


def _seg(name, resolution, windows, dec_layers, queries, filename, remote, md5, **kw) -> Variant:
    return Variant(
        name=name,
        task="segment",
        resolution=resolution,
        patch_size=12,
        num_windows=windows,
        positional_encoding_size=resolution // 12,
        out_feature_indexes=(3, 6, 9, 12),
        dec_layers=dec_layers,
        num_queries=queries,
        weights=PretrainedWeights(filename, remote, md5),
        **kw,
    )


def _det(name, resolution, dec_layers, filename, remote, md5, **kw) -> Variant:
    return Variant(
        name=name,
        task="detect",
        resolution=resolution,
        patch_size=16,
        num_windows=2,
        positional_encoding_size=resolution // 16,
        out_feature_indexes=(3, 6, 9, 12),
        dec_layers=dec_layers,
        num_queries=300,
        weights=PretrainedWeights(filename, remote, md5),
        **kw,
    )


_VIT_B = {"encoder_dim": 768, "encoder_heads": 12}

_REGISTRY: dict[str, Variant] = {
    v.name: v
    for v in [
        # Segmentation (rfdetr-upstream.md section 1.3). Seg-Nano has no windowing, hence multiples of 12.
        _seg(
            "seg-nano",
            312,
            1,
            4,
            100,
            "rf-detr-seg-nano.pt",
            "rf-detr-seg-n-ft.pth",
            "9995497791d0ff1664a1d9ddee9cfd20",
            description="RF-DETR-Seg Nano, 33.6M params, COCO mask AP 40.3",
        ),
        _seg(
            "seg-small",
            384,
            2,
            4,
            100,
            "rf-detr-seg-small.pt",
            "rf-detr-seg-s-ft.pth",
            "0a2a3006381d0c42853907e700eadd08",
            description="RF-DETR-Seg Small, 33.7M params, COCO mask AP 43.1",
        ),
        _seg(
            "seg-medium",
            432,
            2,
            5,
            200,
            "rf-detr-seg-medium.pt",
            "rf-detr-seg-m-ft.pth",
            "a49af1562c3719227ad43d0ca53b4c7a",
            description="RF-DETR-Seg Medium, 35.7M params, COCO mask AP 45.3",
        ),
        _seg(
            "seg-large",
            504,
            2,
            5,
            200,
            "rf-detr-seg-large.pt",
            "rf-detr-seg-l-ft.pth",
            "275f7b094909544ed2841c94a677d07e",
            description="RF-DETR-Seg Large, 35.9M params, COCO mask AP 47.1",
        ),
        _seg(
            "seg-xlarge",
            624,
            2,
            6,
            300,
            "rf-detr-seg-xlarge.pt",
            "rf-detr-seg-xl-ft.pth",
            "3693b35d0eea86ebb3e0444f4a611fba",
            description="RF-DETR-Seg XLarge, 38.1M params, COCO mask AP 48.8",
        ),
        _seg(
            "seg-2xlarge",
            768,
            2,
            6,
            300,
            "rf-detr-seg-xxlarge.pt",
            "rf-detr-seg-2xl-ft.pth",
            "040bc3412af840fa8a47e0ff69b552ba",
            aliases=("seg-xxlarge",),
            description="RF-DETR-Seg 2XLarge, 38.6M params, COCO mask AP 49.9",
        ),
        # Detection (section 1.2).
        _det(
            "nano",
            384,
            2,
            "rf-detr-nano.pth",
            "nano_coco/checkpoint_best_regular.pth",
            "fb6504cce7fbdc783f7a46991f07639f",
            description="RF-DETR Nano, 30.5M params, COCO AP 48.4",
        ),
        _det(
            "small",
            512,
            3,
            "rf-detr-small.pth",
            "small_coco/checkpoint_best_regular.pth",
            "fb37061c1af7bace359c91b723a8d5c1",
            description="RF-DETR Small, 32.1M params, COCO AP 53.0",
        ),
        _det(
            "medium",
            576,
            4,
            "rf-detr-medium.pth",
            "medium_coco/checkpoint_best_regular.pth",
            "7223f764a87b863f02eb8d52bf0ce2ee",
            description="RF-DETR Medium, 33.7M params, COCO AP 54.7",
        ),
        _det(
            "large",
            704,
            4,
            "rf-detr-large-2026.pth",
            "rf-detr-large-2026.pth",
            "5cb72153541cbcb9aa6efa26222acc75",
            description="RF-DETR Large (2026), 33.9M params, COCO AP 56.5",
        ),
        Variant(
            name="xlarge",
            task="detect",
            resolution=700,
            patch_size=20,
            num_windows=1,
            positional_encoding_size=35,
            out_feature_indexes=(3, 6, 9, 12),
            dec_layers=5,
            num_queries=300,
            hidden_dim=512,
            sa_nheads=16,
            ca_nheads=32,
            dec_n_points=4,
            **_VIT_B,
            weights=PretrainedWeights(
                "rf-detr-xlarge.pth", "platform-licensed/rf-detr-xlarge.pth", None, PML
            ),
            description="RF-DETR XLarge, 126.4M params, COCO AP 58.6 (weights under PML-1.0)",
        ),
        Variant(
            name="2xlarge",
            task="detect",
            resolution=880,
            patch_size=20,
            num_windows=2,
            positional_encoding_size=44,
            out_feature_indexes=(3, 6, 9, 12),
            dec_layers=5,
            num_queries=300,
            hidden_dim=512,
            sa_nheads=16,
            ca_nheads=32,
            dec_n_points=4,
            **_VIT_B,
            aliases=("xxlarge",),
            weights=PretrainedWeights(
                "rf-detr-xxlarge.pth", "platform-licensed/rf-detr-xxlarge.pth", None, PML
            ),
            description="RF-DETR 2XLarge, 126.9M params, COCO AP 60.1 (weights under PML-1.0)",
        ),
        # The original RF-DETR (legacy, patch 14, DINOv2 position table of 37x37 = 518/14).
        Variant(
            name="base",
            task="detect",
            resolution=560,
            patch_size=14,
            num_windows=4,
            positional_encoding_size=37,
            out_feature_indexes=(2, 5, 8, 11),
            dec_layers=3,
            num_queries=300,
            weights=PretrainedWeights(
                "rf-detr-base.pth", "rf-detr-base-coco.pth", "b4d3ce46099eaed50626ede388caf979"
            ),
            description="RF-DETR Base (original, 29M), COCO AP 53.3",
        ),
        Variant(
            name="large-legacy",
            task="detect",
            resolution=560,
            patch_size=14,
            num_windows=4,
            positional_encoding_size=37,
            out_feature_indexes=(2, 5, 8, 11),
            dec_layers=3,
            num_queries=300,
            hidden_dim=384,
            sa_nheads=12,
            ca_nheads=24,
            dec_n_points=4,
            projector_scale=("P3", "P5"),
            **_VIT_B,
            weights=PretrainedWeights(
                "rf-detr-large.pth", "rf-detr-large.pth", "992c8e862aa733a7bb2777e45d49f1a0"
            ),
            description="RF-DETR Large (original, 128M)",
        ),
        # Small from-scratch model for the CPU demo (no pretrained weights), sized by the training issue from
        # measured speed on a 2-core machine: 160 px (10x10 patches of 16, one window), a 4-block ViT of
        # width 192, hidden 96 (at hidden 128 the H/4 mask path alone cost ~2x the step time), 2 decoder
        # layers, 30 queries x 4 groups. 2.7M parameters.
        Variant(
            name="seg-tiny",
            task="segment",
            resolution=160,
            patch_size=16,
            num_windows=1,
            positional_encoding_size=10,
            out_feature_indexes=(2, 4),
            dec_layers=2,
            num_queries=30,
            encoder_dim=192,
            encoder_depth=4,
            encoder_heads=3,
            hidden_dim=96,
            sa_nheads=4,
            ca_nheads=8,
            dim_feedforward=384,
            group_detr=4,
            num_classes=3,
            description="Tiny from-scratch segmentation model for the CPU demo (2.7M params, 160 px)",
        ),
    ]
}

_ALIASES = {alias: v.name for v in _REGISTRY.values() for alias in v.aliases}


def list_variants(task: str | None = None) -> list[str]:
    """Names of registered variants, optionally only ``task`` ("segment" or "detect")."""
    return [name for name, v in _REGISTRY.items() if task is None or v.task == task]


def get_variant(name: str | Variant) -> Variant:
    """Look a variant up by name (case-insensitive, ``_`` accepted for ``-``)."""
    if isinstance(name, Variant):
        return name
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY) + list(_ALIASES), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownVariantError(
        f"Unknown model variant {name!r}.{hint} Known variants: {', '.join(_REGISTRY)}."
    )
