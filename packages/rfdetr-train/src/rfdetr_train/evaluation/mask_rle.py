"""Mask logits at H/4 -> COCO RLE at source resolution, without ever holding full-size masks.

The model's masks are logits on the mask-head grid; the reported mask is ``bilinear upsample to the source
size (align_corners=False), then logit > threshold`` (upstream's rule). A bilinear output pixel is a convex
combination of at most four grid cells, so it can exceed a threshold ``>= 0`` only next to a grid cell that
exceeds it. Each mask is therefore upsampled only inside the source-pixel rectangle served by its positive
cells (plus their interpolation neighbours); the rest of the image is zero without being computed. Crops of
similar size are batched up to a pixel budget, and only run boundaries (start/end offsets in COCO's
column-major order) leave the device, so GPU memory stays at one chunk and host traffic at a few bytes per
run. The result equals ``F.interpolate`` + threshold up to float rounding of pixels whose interpolated
logit is within an ulp of the threshold (checked in the tests).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rfdetr_train.evaluation.morphology import inner_boundary

# Above this share of the image, a crop is upsampled with F.interpolate at full size (see logits_to_rle).
LARGE_CROP_FRACTION = 0.25
# On the CPU, large masks are encoded by pycocotools (tests switch this off to cover the device path).
HOST_ENCODE_LARGE = True


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


def compress_counts(counts: list[list[int]], height: int, width: int) -> list[dict]:
    """Compressed COCO RLE dicts from uncompressed counts (pycocotools' C encoder)."""
    from pycocotools import mask as mask_utils

    if not counts:
        return []
    return mask_utils.frPyObjects([{"counts": c, "size": [height, width]} for c in counts], height, width)


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
    boundary_d: int | None = None,
) -> tuple[list[dict], np.ndarray, list[dict] | None]:
    """Upsample mask logits to ``out_size`` (bilinear), threshold and COCO-RLE-encode them, in chunks.

    Args:
        logits: ``[N, h, w]`` mask logits on the mask-head grid (any float dtype, any device).
        out_size: source ``(height, width)``.
        threshold: a pixel is in the mask when its interpolated logit is ``> threshold`` (must be ``>= 0``
            for the crop rule; upstream uses 0).
        pixel_budget: upper bound of ``masks x crop pixels`` processed at once (bounds peak memory).
        boundary_d: also return each mask's inner boundary of this width (Boundary AP), eroded on the crop
            while it is still on the device.

    Returns:
        ``(rles, areas, boundary_rles)``: ``N`` compressed RLE dicts at source size, ``[N]`` float64 areas,
        and ``N`` boundary RLEs (``None`` without ``boundary_d``).
    """
    if threshold < 0:
        raise ValueError("logits_to_rle needs threshold >= 0 (the support-crop rule relies on it)")
    height, width = int(out_size[0]), int(out_size[1])
    n, h, w = logits.shape
    device = logits.device
    if n == 0:
        return [], np.zeros(0), ([] if boundary_d else None)
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
        if boundary_d:
            # outside the crop is background, and so is the padding of smaller crops: erosion is exact here
            store(members, inner_boundary(crop, boundary_d), row0, col0, b_starts, b_ends)

    direct: dict[int, tuple[dict, dict | None]] = {}  # large masks encoded by pycocotools on the CPU
    step = max(1, pixel_budget // (height * width))
    for s0 in range(0, large.size, step):
        members = large[s0 : s0 + step]
        idx = torch.as_tensor(members, device=device)
        up = F.interpolate(x[idx, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        full = up > threshold  # [c, H, W]
        del up
        if device.type == "cpu" and HOST_ENCODE_LARGE:
            # the masks are already in host memory: pycocotools' encoder beats our run extraction there
            enc = _encode_full(full)
            bnd = _encode_full(inner_boundary(full, boundary_d)) if boundary_d else [None] * len(enc)
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
    if boundary_d:
        b_counts = [runs_to_counts(s, e, total) for s, e in zip(b_starts, b_ends, strict=True)]
        bounds = compress_counts(b_counts, height, width)
    if direct:
        from rfdetr_train.evaluation.coco_sets import rle_area

        keys = sorted(direct)
        areas[keys] = rle_area([direct[m][0] for m in keys])
        for m in keys:
            rles[m] = direct[m][0]
            if bounds is not None:
                bounds[m] = direct[m][1]
    return rles, areas, bounds


def _encode_full(masks: torch.Tensor) -> list[dict]:
    """``[c, H, W]`` bool CPU masks -> compressed RLEs (pycocotools wants Fortran-ordered ``[H, W, c]``)."""
    from pycocotools import mask as mask_utils

    return mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))


def logits_to_rle_naive(
    logits: torch.Tensor, out_size: tuple[int, int], threshold: float = 0.0, chunk: int = 32
) -> tuple[list[dict], np.ndarray]:
    """The straightforward path (upstream's): upsample every mask to full size, threshold, encode.

    ``[N, h, w]`` logits -> N RLEs and areas. Kept as the reference for tests and the speed benchmark.
    """
    import torch.nn.functional as F
    from pycocotools import mask as mask_utils

    from rfdetr_train.evaluation.coco_sets import rle_area

    rles: list[dict] = []
    for s in range(0, logits.shape[0], chunk):
        up = F.interpolate(logits[s : s + chunk, None].float(), size=tuple(out_size), mode="bilinear")
        m = (up[:, 0] > threshold).cpu().numpy()  # [c, H, W]
        rles.extend(mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8))))
    areas = rle_area(rles)
    return rles, areas
