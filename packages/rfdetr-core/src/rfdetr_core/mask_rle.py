"""COCO run-length encoding (RLE) of masks, written for rfdetr-core (no pycocotools needed).

Three entry points:

* :func:`encode_masks` — bool masks ``[N, H, W]`` -> ``N`` compressed RLE dicts, equal to
  ``pycocotools.mask.encode`` (``{"size": [H, W], "counts": bytes}``);
* :func:`logits_to_rle` — mask logits on the mask-head grid ``[N, h, w]`` -> RLEs at the source size without
  ever holding all full-size masks (the fast path of evaluation, ``Detections.to_coco`` and serving);
* :func:`rle_area` — ``[N]`` pixel areas of compressed RLEs (equal to ``pycocotools.mask.area``).

**The format** (COCO's ``maskApi``; facts, not code, taken from it): a mask is read in column-major order and
stored as alternating run lengths, zeros first (a mask whose first pixel is set starts with a zero-length
run). The compressed string stores, for run ``i``, ``x = counts[i] - counts[i-2]`` when ``i > 2`` (else
``counts[i]``) in 5-bit little-endian groups of a two's-complement number; each group becomes the character
``48 + group``, with ``0x20`` set on every group but the last. Encoding and decoding here are vectorised over
all runs of all masks with numpy.

**logits_to_rle.** The model's masks are logits on the mask-head grid; the reported mask is ``bilinear
upsample to the source size (align_corners=False), then logit > threshold`` (upstream's rule). A bilinear
output pixel is a convex combination of at most four grid cells, so it can exceed a threshold ``>= 0`` only
next to a grid cell that exceeds it. Each mask is therefore upsampled only inside the source-pixel rectangle
served by its positive cells (plus their interpolation neighbours); the rest of the image is zero without
being computed. Crops of similar size are batched up to a pixel budget, and only run boundaries (start/end
offsets in COCO's column-major order) leave the device, so GPU memory stays at one chunk and host traffic at
a few bytes per run. The result equals ``F.interpolate`` + threshold up to float rounding of pixels whose
interpolated logit is within an ulp of the threshold (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Above this share of the image, a crop is upsampled with F.interpolate at full size (see logits_to_rle).
LARGE_CROP_FRACTION = 0.25
# Pixels of bool masks handled at once by encode_masks (bounds its temporary memory to about 2x this).
_ENCODE_CHUNK_PIXELS = 1 << 23

BoundaryFn = Callable[[torch.Tensor], torch.Tensor]


# -- the compressed counts string ----------------------------------------------------------------------------
def _counts_to_strings(counts: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """Compressed COCO count strings of several RLEs at once.

    Args:
        counts: the uncompressed run lengths of all RLEs, concatenated (int64).
        lengths: ``[M]`` runs per RLE (each ``>= 1``).

    Returns:
        ``M`` byte strings (ASCII).
    """
    if lengths.size == 0:
        return []
    counts = counts.astype(np.int64, copy=False)
    starts = np.cumsum(lengths) - lengths
    index = np.arange(counts.size) - np.repeat(starts, lengths)  # position of each run inside its RLE
    x = counts.copy()
    delta = np.flatnonzero(index > 2)
    x[delta] -= counts[delta - 2]
    # groups needed: the fewest g with -2^(5g-1) <= x < 2^(5g-1) (x fits in 5g bits, two's complement)
    groups = np.ones(x.size, dtype=np.int64)
    for g in range(1, 13):
        limit = np.int64(1) << (5 * g - 1)
        groups += (x < -limit) | (x >= limit)
    k = np.arange(int(groups.max()))  # [G]
    digits = (x[:, None] >> (5 * k)) & 0x1F  # [R, G]; numpy's >> on int64 is arithmetic
    digits |= (k < (groups - 1)[:, None]) * 0x20  # continuation bit on all but the last group
    chars = (digits + 48).astype(np.uint8)[k < groups[:, None]]  # row-major: each value's groups in order
    ends = np.cumsum(np.add.reduceat(groups, starts))
    buf = chars.tobytes()
    return [buf[a:b] for a, b in zip(np.r_[0, ends[:-1]].tolist(), ends.tolist(), strict=True)]


def _strings_to_values(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Decode compressed count strings into their stored values (before undoing the ``i > 2`` deltas).

    Returns ``(values, lengths)``: the stored ``x`` of every run of every string concatenated, and ``[M]``
    runs per string. Raises ValueError for characters outside the alphabet or a string ending inside a number.
    """
    lengths_chars = np.fromiter((len(s) for s in strings), dtype=np.int64, count=len(strings))
    buf = b"".join(strings)
    if not buf:
        return np.zeros(0, np.int64), np.zeros(len(strings), np.int64)
    v = np.frombuffer(buf, dtype=np.uint8).astype(np.int64) - 48
    bad = np.flatnonzero((v < 0) | (v >= 64))
    if bad.size:
        raise ValueError(f"character {chr(buf[bad[0]])!r} is not an RLE digit")
    last = np.flatnonzero((v & 0x20) == 0)  # the last group of each value
    char_ends = np.cumsum(lengths_chars)
    # every non-empty string must end on a last group
    if not np.isin(char_ends[lengths_chars > 0] - 1, last).all():
        raise ValueError("the string ends inside a number")
    first = np.r_[0, last[:-1] + 1]
    ngroups = last - first + 1
    if ngroups.max() > 12:
        raise ValueError("a number is too long")
    k = np.arange(v.size) - np.repeat(first, ngroups)  # group index within its number
    values = np.add.reduceat((v & 0x1F) << (5 * k), first)
    negative = (v[last] & 0x10) != 0
    values[negative] -= np.int64(1) << (5 * ngroups[negative])  # sign-extend
    lengths = np.diff(np.searchsorted(last, char_ends, side="left"), prepend=0)  # values per string
    return values, lengths


def decode_counts(counts: str | bytes) -> np.ndarray:
    """A compressed COCO counts string -> uncompressed run lengths ``[n]`` int64 (pycocotools' ``rleFrString``).

    Raises ValueError for characters outside the alphabet, a string that ends inside a number, or a number
    longer than 12 groups.
    """
    if isinstance(counts, str):
        if not counts.isascii():
            raise ValueError(f"character {next(c for c in counts if not c.isascii())!r} is not an RLE digit")
        counts = counts.encode("ascii")
    x, _ = _strings_to_values([counts])
    out = x.copy()
    out[1::2] = np.cumsum(x[1::2])  # from the fourth run on, each is stored relative to the one two before
    out[2::2] = np.cumsum(x[2::2])
    return out


def compress_counts(counts: Sequence[Sequence[int]], height: int, width: int) -> list[dict]:
    """Compressed COCO RLE dicts ``{"size": [height, width], "counts": bytes}`` from uncompressed counts."""
    if not counts:
        return []
    lengths = np.fromiter((len(c) for c in counts), dtype=np.int64, count=len(counts))
    flat = np.concatenate([np.asarray(c, dtype=np.int64) for c in counts])
    return [{"size": [int(height), int(width)], "counts": s} for s in _counts_to_strings(flat, lengths)]


def decode_masks(rles: Sequence[dict]) -> np.ndarray:
    """Compressed COCO RLEs of one size -> bool masks ``[N, H, W]`` (equal to ``pycocotools.mask.decode``)."""
    if not rles:
        raise ValueError("decode_masks needs at least one RLE (the size comes from them)")
    height, width = (int(v) for v in rles[0]["size"])
    out = np.zeros((len(rles), width * height), dtype=bool)  # column-major pixels per mask
    for i, rle in enumerate(rles):
        if [int(v) for v in rle["size"]] != [height, width]:
            raise ValueError(f"RLE {i} has size {rle['size']}, the first has {[height, width]}")
        counts = decode_counts(rle["counts"])
        if int(counts.sum()) != height * width:
            raise ValueError(f"RLE {i} covers {int(counts.sum())} pixels, not {height}x{width}")
        out[i] = np.repeat(np.arange(counts.size) % 2 == 1, counts)  # runs alternate 0, 1, 0, ...
    return out.reshape(len(rles), width, height).transpose(0, 2, 1)


def rle_area(rles: Sequence[dict]) -> np.ndarray:
    """``[N]`` float64 pixel areas of COCO RLEs (compressed ``counts`` as str/bytes, or uncompressed lists).

    Equal to ``pycocotools.mask.area``: the sum of every second run (the ones-runs).
    """
    out = np.zeros(len(rles), dtype=np.float64)
    packed, where = [], []
    for i, r in enumerate(rles):
        c = r["counts"]
        if isinstance(c, (bytes, str)):
            packed.append(c.encode("ascii") if isinstance(c, str) else c)
            where.append(i)
        else:
            out[i] = float(sum(c[1::2]))
    if packed:
        values, lengths = _strings_to_values(packed)
        # ones-run j (odd position) has count = sum of the stored values at odd positions <= j, so the area
        # is sum over odd positions j of value_j * (odd positions from j to the end of its string)
        starts = np.cumsum(lengths) - lengths
        index = np.arange(values.size) - np.repeat(starts, lengths)
        n_odd = np.repeat(lengths // 2, lengths)
        weight = np.where(index % 2 == 1, n_odd - index // 2, 0)
        per_run = values * weight
        sums = np.zeros(len(packed), dtype=np.float64)
        np.add.at(sums, np.repeat(np.arange(len(packed)), lengths), per_run)
        out[np.asarray(where)] = sums
    return out


# -- bool masks -> RLE ---------------------------------------------------------------------------------------
def _nonzero(t: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
    """Indexes of the True entries of a bool array (numpy) or tensor (any device), row-major, as numpy."""
    if isinstance(t, np.ndarray):
        flat = np.flatnonzero(t)
        return tuple(i.astype(np.int64, copy=False) for i in np.unravel_index(flat, t.shape))
    return tuple(i.cpu().numpy() for i in torch.nonzero(t, as_tuple=True))


def _vertical_changes(masks: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels ``(mask, row - 1, col)`` whose value differs from the pixel above, sorted row-major.

    ``masks``: ``[c, H, W]`` bool, C-contiguous; a numpy array (CPU) or a tensor (on its device). The rows
    are compared several pixels at a time (as 8-, 4- or 2-byte words, the widest that divides the width) and
    only words that differ are expanded to pixels: a mask's rows mostly equal the row above, so this reads
    the masks about once instead of writing and scanning a full-size difference image.
    """
    c, h, w = masks.shape
    size = next((b for b in (8, 4, 2) if w % b == 0), 1)
    if size == 1:
        return _nonzero(masks[:, 1:, :] != masks[:, :-1, :])
    if isinstance(masks, np.ndarray):
        words = masks.view(np.dtype(f"i{size}"))  # [c, H, W / size]
    else:
        words = masks.view(torch.uint8).view({8: torch.int64, 4: torch.int32, 2: torch.int16}[size])
    k, r, blk = _nonzero(words[:, 1:, :] != words[:, :-1, :])
    pixels = masks.reshape(c, h, w // size, size)  # [c, H, W / size, size]
    if not isinstance(masks, np.ndarray):
        k_, r_, b_ = (torch.from_numpy(i).to(masks.device) for i in (k, r, blk))
    else:
        k_, r_, b_ = k, r, blk
    e, j = _nonzero(pixels[k_, r_ + 1, b_] != pixels[k_, r_, b_])  # [E, size] -> the changed pixels
    return k[e], r[e], blk[e] * size + j


def _masks_to_counts(masks: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[c, H, W]`` bool masks (C-contiguous numpy, or a tensor) -> (concatenated uncompressed counts,
    ``[c]`` runs per mask)."""
    c, h, w = masks.shape
    total = h * w
    # a run boundary at column-major offset j: pixel j differs from pixel j - 1 (pixel -1 counts as 0)
    k, r, col = _vertical_changes(masks)  # within a column
    top = masks[:, 0, :].clone() if isinstance(masks, torch.Tensor) else masks[:, 0, :].copy()  # [c, W]
    top[:, 1:] = masks[:, 0, 1:] != masks[:, -1, :-1]  # top of a column vs the previous column's bottom
    tk, tcol = _nonzero(top)
    # (mask, column-major offset) of every boundary
    key = np.sort(np.concatenate([k * total + col * h + r + 1, tk * total + tcol * h]))
    mask_of = key // total
    offset = key - mask_of * total
    per_mask = np.bincount(mask_of, minlength=c)  # boundaries per mask
    # counts of mask m: diff([0, boundaries..., total]); one extra run per mask
    lengths = per_mask + 1
    ends = np.cumsum(lengths)
    edges = np.empty(int(ends[-1]), dtype=np.int64)
    last = ends - 1
    body = np.ones(edges.size, dtype=bool)
    body[last] = False
    edges[body] = offset
    edges[last] = total
    prev = np.empty_like(edges)
    prev[1:] = edges[:-1]
    prev[ends - lengths] = 0  # each mask starts from offset 0
    return edges - prev, lengths


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict]:
    """Bool masks -> compressed COCO RLEs, equal to ``pycocotools.mask.encode`` of the same masks.

    Args:
        masks: ``[N, H, W]`` masks (bool, or any dtype where nonzero means set), numpy or torch (any device;
            CPU tensors are encoded through numpy, CUDA tensors on the device).

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": bytes}`` (pycocotools' types; JSON wants
        ``counts.decode("ascii")``).
    """
    if isinstance(masks, torch.Tensor) and masks.device.type == "cpu":
        masks = masks.numpy()
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}")
    if isinstance(masks, np.ndarray):
        m = np.ascontiguousarray(masks if masks.dtype == np.bool_ else masks != 0)
    else:
        m = (masks if masks.dtype == torch.bool else masks != 0).contiguous()
    n, h, w = m.shape
    if n == 0:
        return []
    if h * w == 0:
        return [{"size": [h, w], "counts": b"0"} for _ in range(n)]
    if isinstance(m, torch.Tensor):
        from rfdetr_core.mask_rle_cuda import encode_masks_on_device

        return encode_masks_on_device(m)  # everything on the device: a few syncs for all masks
    step = max(1, _ENCODE_CHUNK_PIXELS // (h * w))
    out: list[dict] = []
    for s in range(0, n, step):
        counts, lengths = _masks_to_counts(m[s : s + step])
        out.extend({"size": [h, w], "counts": c} for c in _counts_to_strings(counts, lengths))
    return out


# -- logits on the mask-head grid -> RLE at source size ------------------------------------------------------
def _source_index(out_size: int, in_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output pixel: the two grid cells it interpolates and the weight of the second one.

    PyTorch's bilinear rule with ``align_corners=False`` and no scale factor:
    ``src = max(in/out * (dst + 0.5) - 0.5, 0)``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``.
    Returns ``i0 [out]``, ``i1 [out]`` (int64) and ``lambda1 [out]`` (float32).
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float32)
    src = torch.clamp(scale * (dst + 0.5) - 0.5, min=0.0)
    i0 = torch.clamp(src.floor().to(torch.int64), max=in_size - 1)
    lam1 = torch.clamp(src - i0.to(torch.float32), 0.0, 1.0)
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    return i0.to(device), i1.to(device), lam1.to(device)


def _support(positive: torch.Tensor, i0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output index range ``[lo, hi)`` per mask whose pixels can be positive along one axis.

    Args:
        positive: ``[N, n_in]`` bool, grid cells above the threshold along this axis.
        i0: ``[n_out]`` first interpolation cell of every output pixel (non-decreasing).
    """
    n_in = positive.shape[1]
    idx = torch.arange(n_in, device=positive.device)
    any_pos = positive.any(dim=1)
    first = torch.where(positive, idx, n_in).amin(dim=1)  # [N]
    last = torch.where(positive, idx, -1).amax(dim=1)
    # an output pixel touches cells i0 and i0 + 1, so it can be positive iff first - 1 <= i0 <= last
    lo = torch.searchsorted(i0, first - 1, right=False)
    hi = torch.searchsorted(i0, last, right=True)
    lo = torch.where(any_pos, lo, 0)
    hi = torch.where(any_pos, hi, 0)
    return lo, hi


def runs_to_counts(starts: np.ndarray, ends: np.ndarray, total: int) -> list[int]:
    """COCO uncompressed RLE counts from sorted run starts and (exclusive) ends in column-major order."""
    if starts.size == 0:
        return [total]
    edges = np.empty(2 * starts.size + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, total
    edges[1:-1:2], edges[2:-1:2] = starts, ends
    counts = np.diff(edges)
    # a mask whose last pixel is set ends with a ones-run; pycocotools writes no empty zeros-run after it
    return (counts[:-1] if counts[-1] == 0 else counts).tolist()


def crop_runs(
    crop: torch.Tensor, row0: torch.Tensor, col0: torch.Tensor, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run boundaries of masks that are zero outside a crop, in the full image's column-major order.

    Args:
        crop: ``[N, hc, wc]`` bool, mask ``n`` covering source rows ``row0[n] + [0, hc)`` and columns
            ``col0[n] + [0, wc)`` (pixels past the mask's own crop must be False).
        row0, col0: ``[N]`` int64 crop origins; height: source image height.

    Returns:
        ``(start_mask, start_flat, end_mask, end_flat)``: per run start and end (exclusive), the mask
        index and the flat column-major offset ``col * height + row``, sorted by (mask, offset), with runs
        that continue from the bottom of one column into the top of the next merged.
    """
    n, hc, wc = crop.shape
    col_major = crop.transpose(1, 2).to(torch.int8)  # [N, wc, hc]: nonzero() walks masks in COCO order
    edges = torch.diff(
        col_major, dim=2, prepend=col_major.new_zeros(n, wc, 1), append=col_major.new_zeros(n, wc, 1)
    )
    nz = torch.nonzero(edges)  # [E, 3] (mask, col, row): +1 = a run starts at row, -1 = it ends before row
    sign = edges[nz[:, 0], nz[:, 1], nz[:, 2]].cpu().numpy()
    nz = nz.cpu().numpy()
    r0, c0 = row0.cpu().numpy(), col0.cpu().numpy()
    flat = (c0[nz[:, 0]] + nz[:, 1]) * height + r0[nz[:, 0]] + nz[:, 2]
    is_start = sign > 0
    s_mask, s_flat = nz[is_start, 0], flat[is_start]
    e_mask, e_flat = nz[~is_start, 0], flat[~is_start]
    # A run ending on a column's last row and one starting on the next column's first row are one run.
    if s_flat.size and hc == height:
        stride = np.int64(height) * (int(c0.max()) + wc + 1)
        joined = np.intersect1d(e_mask * stride + e_flat, s_mask * stride + s_flat, assume_unique=True)
        if joined.size:
            keep_s = ~np.isin(s_mask * stride + s_flat, joined, assume_unique=True)
            keep_e = ~np.isin(e_mask * stride + e_flat, joined, assume_unique=True)
            s_mask, s_flat, e_mask, e_flat = s_mask[keep_s], s_flat[keep_s], e_mask[keep_e], e_flat[keep_e]
    return s_mask, s_flat, e_mask, e_flat


def _interp_matrix(index0, index1, lam1, origin, size: int) -> torch.Tensor:
    """``[c, n_out, size]`` bilinear weights of a crop: row ``j`` holds ``1 - lam1`` at ``index0 - origin``
    and ``lam1`` at ``index1 - origin`` (the same cell twice at the image edge, weights adding to 1)."""
    c, n_out = index0.shape
    mat = torch.zeros((c, n_out, size), dtype=torch.float32, device=index0.device)
    mat.scatter_add_(2, (index0 - origin[:, None]).clamp(0, size - 1)[..., None], (1.0 - lam1)[..., None])
    mat.scatter_add_(2, (index1 - origin[:, None]).clamp(0, size - 1)[..., None], lam1[..., None])
    return mat


def _chunks(order: np.ndarray, hc: np.ndarray, wc: np.ndarray, budget: int):
    """Group crops (sorted by area) so that padding every crop of a group to the group's largest height and
    width costs at most about twice the real pixels, and a group stays within ``budget`` pixels."""
    i = 0
    while i < order.size:
        j, mh, mw, real = i, 0, 0, 0
        while j < order.size:
            k = order[j]
            nh, nw = max(mh, int(hc[k])), max(mw, int(wc[k]))
            padded = nh * nw * (j - i + 1)
            if j > i and (padded > budget or padded > 2 * (real + int(hc[k]) * int(wc[k])) + 65536):
                break
            mh, mw, real, j = nh, nw, real + int(hc[k]) * int(wc[k]), j + 1
        yield order[i:j], mh, mw
        i = j


def logits_to_rle(
    logits: torch.Tensor,
    out_size: tuple[int, int],
    threshold: float = 0.0,
    pixel_budget: int = 1 << 23,
    boundary: BoundaryFn | None = None,
    host_encode_large: bool = True,
) -> tuple[list[dict], np.ndarray, list[dict] | None]:
    """Upsample mask logits to ``out_size`` (bilinear), threshold and COCO-RLE-encode them, in chunks.

    Args:
        logits: ``[N, h, w]`` mask logits on the mask-head grid (any float dtype, any device).
        out_size: source ``(height, width)``.
        threshold: a pixel is in the mask when its interpolated logit is ``> threshold`` (must be ``>= 0``
            for the crop rule; upstream uses 0).
        pixel_budget: upper bound of ``masks x crop pixels`` processed at once (bounds peak memory).
        boundary: also return a derived mask per mask (e.g. rfdetr-train's inner boundary for Boundary AP):
            a function ``[c, hc, wc] bool -> [c, hc, wc] bool`` applied to crops while they are on the device.
            It must treat pixels outside the crop as background (they are: crops are the mask's support,
            padded with False).
        host_encode_large: on the CPU, encode masks whose crop covers more than a quarter of the image with
            :func:`encode_masks` on the full mask instead of extracting runs from the crop (faster there;
            both give the same RLE).

    Returns:
        ``(rles, areas, boundary_rles)``: ``N`` compressed RLE dicts at source size, ``[N]`` float64 areas,
        and ``N`` RLEs of ``boundary``'s masks (``None`` without ``boundary``).
    """
    if threshold < 0:
        raise ValueError("logits_to_rle needs threshold >= 0 (the support-crop rule relies on it)")
    height, width = int(out_size[0]), int(out_size[1])
    n, h, w = logits.shape
    device = logits.device
    if n == 0:
        return [], np.zeros(0), ([] if boundary is not None else None)
    x = logits.float()
    pos = x > threshold  # [N, h, w]
    yi0, yi1, ylam = _source_index(height, h, device)
    xi0, xi1, xlam = _source_index(width, w, device)
    r_lo, r_hi = _support(pos.any(dim=2), yi0)
    c_lo, c_hi = _support(pos.any(dim=1), xi0)
    hc, wc = (r_hi - r_lo).cpu().numpy(), (c_hi - c_lo).cpu().numpy()
    area_crop = hc * wc

    starts_all: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    ends_all: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    b_starts: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    b_ends: list[np.ndarray] = [np.zeros(0, np.int64)] * n
    order = np.argsort(area_crop, kind="stable")
    order = order[area_crop[order] > 0]
    # Crops covering much of the image go through F.interpolate at full size (its fast kernel, and no
    # padding); the matmul form costs O(crop side) per pixel and pays off only on smaller crops.
    large = order[area_crop[order] > LARGE_CROP_FRACTION * height * width]
    order = order[area_crop[order] <= LARGE_CROP_FRACTION * height * width]

    def store(members, crop, row0, col0, starts, ends):
        s_m, s_f, e_m, e_f = crop_runs(crop, row0, col0, height)
        s_split = np.searchsorted(s_m, np.arange(len(members) + 1))
        e_split = np.searchsorted(e_m, np.arange(len(members) + 1))
        for k, m in enumerate(members):
            starts[m] = s_f[s_split[k] : s_split[k + 1]]
            ends[m] = e_f[e_split[k] : e_split[k + 1]]

    def finish(members, crop, row0, col0):
        store(members, crop, row0, col0, starts_all, ends_all)
        if boundary is not None:
            # outside the crop is background, and so is the padding of smaller crops
            store(members, boundary(crop), row0, col0, b_starts, b_ends)

    direct: dict[int, tuple[dict, dict | None]] = {}  # large masks encoded whole on the CPU
    step = max(1, pixel_budget // (height * width))
    for s0 in range(0, large.size, step):
        members = large[s0 : s0 + step]
        idx = torch.as_tensor(members, device=device)
        up = F.interpolate(x[idx, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        full = up > threshold  # [c, H, W]
        del up
        if device.type == "cpu" and host_encode_large:
            enc = encode_masks(full)
            bnd = encode_masks(boundary(full)) if boundary is not None else [None] * len(enc)
            direct.update({int(m): (e, b) for m, e, b in zip(members, enc, bnd, strict=True)})
            continue
        zeros = torch.zeros(idx.numel(), dtype=torch.int64, device=device)
        finish(members, full, zeros, zeros)
    for members, mh, mw in _chunks(order, hc, wc, pixel_budget):
        idx = torch.as_tensor(members, device=device)
        # [c, mh] source rows, [c, mw] source columns of each crop
        rows = (r_lo[idx, None] + torch.arange(mh, device=device)).clamp(max=height - 1)
        cols = (c_lo[idx, None] + torch.arange(mw, device=device)).clamp(max=width - 1)  # [c, mw]
        row_ok = (r_lo[idx, None] + torch.arange(mh, device=device)) < r_hi[idx, None]
        col_ok = (c_lo[idx, None] + torch.arange(mw, device=device)) < c_hi[idx, None]
        # the grid cells a crop reads: rows gy0 .. gy0 + hs - 1, columns gx0 .. gx0 + ws - 1
        gy0, gx0 = yi0[rows[:, 0]], xi0[cols[:, 0]]  # [c]
        hs = int((yi1[rows[:, -1]] - gy0).max()) + 1
        ws = int((xi1[cols[:, -1]] - gx0).max()) + 1
        gy = (gy0[:, None] + torch.arange(hs, device=device)).clamp(max=h - 1)  # [c, hs]
        gx = (gx0[:, None] + torch.arange(ws, device=device)).clamp(max=w - 1)  # [c, ws]
        sub = x[idx[:, None, None], gy[:, :, None], gx[:, None, :]]  # [c, hs, ws]
        wy = _interp_matrix(yi0[rows], yi1[rows], ylam[rows], gy0, hs)  # [c, mh, hs]
        wx = _interp_matrix(xi0[cols], xi1[cols], xlam[cols], gx0, ws)  # [c, mw, ws]
        # columns interpolated first, then rows, as PyTorch's bilinear kernel associates them
        val = torch.bmm(wy, torch.bmm(sub, wx.transpose(1, 2)))  # [c, mh, mw]
        crop = (val > threshold) & row_ok[:, :, None] & col_ok[:, None, :]
        finish(members, crop, r_lo[idx], c_lo[idx])
    total = height * width
    counts = [runs_to_counts(s, e, total) for s, e in zip(starts_all, ends_all, strict=True)]
    areas = np.array([float((e - s).sum()) for s, e in zip(starts_all, ends_all, strict=True)])
    rles = compress_counts(counts, height, width)
    bounds = None
    if boundary is not None:
        b_counts = [runs_to_counts(s, e, total) for s, e in zip(b_starts, b_ends, strict=True)]
        bounds = compress_counts(b_counts, height, width)
    if direct:
        keys = sorted(direct)
        areas[keys] = rle_area([direct[m][0] for m in keys])
        for m in keys:
            rles[m] = direct[m][0]
            if bounds is not None:
                bounds[m] = direct[m][1]
    return rles, areas, bounds
