"""Official pretrained weights: name -> URL -> md5-checked, atomically cached file.

Names accepted by :func:`resolve_official_name`: a variant name or alias (``seg-medium``), upstream's local
file name (``rf-detr-seg-medium.pt``) or its remote name (``rf-detr-seg-m-ft.pth``). Files come from
``variant.weights.url(base)`` with ``base`` = ``$RFDETR_WEIGHTS_URL`` or upstream's bucket (``file://``
works), land in ``$RFDETR_HOME/weights/<file name>`` through a temporary file + rename (a crash or a
corrupt download never leaves a file that looks complete), and are md5-checked when upstream publishes a
sum. Weights under the Roboflow Platform Model License (PML-1.0) need ``accept_license=True``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from rfdetr_core.atomic_io import atomic_path
from rfdetr_core.errors import CheckpointError, RFDETRError
from rfdetr_core.paths import weights_base_url, weights_dir
from rfdetr_core.variants import WEIGHTS_BASE_URL, PretrainedWeights, Variant, get_variant, list_variants

_CHUNK = 1 << 20


class DownloadError(RFDETRError):
    """Official weights could not be fetched; the message names the URL and where to put the file."""


class LicenseNotAcceptedError(RFDETRError):
    """Weights under a licence that needs explicit acceptance were requested without it."""


def resolve_official_name(name: str) -> Variant | None:
    """The variant whose official weights ``name`` refers to, or ``None`` if it names none."""
    key = str(name).strip()
    if not key:
        return None
    try:
        v = get_variant(key)
        if v.weights is not None:
            return v
    except RFDETRError:
        pass
    low = key.lower()
    base = Path(low).name
    for vname in list_variants():
        w = get_variant(vname).weights
        if w is None:
            continue
        remote = w.remote.lower()
        # A remote's bare file name only counts when it is unique: "checkpoint_best_regular.pth" is shared
        # by several detection remotes ("nano_coco/...", "small_coco/..."), which need the full path.
        if base == w.filename.lower() or low == remote or ("/" not in remote and base == remote):
            return get_variant(vname)
    return None


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _license_message(variant: Variant, w: PretrainedWeights) -> str:
    return (
        f"The {variant.name} weights ({w.filename}) are published under the {w.license} licence (Roboflow "
        "Platform Model License), not Apache-2.0: using them requires an active Roboflow platform plan "
        "and agreeing to its terms. If you have read and accept them, pass accept_license=True "
        "(e.g. RFDETR.from_pretrained(name, accept_license=True)). All other official weights are Apache-2.0."
    )


def download_weights(
    name: str | Variant,
    accept_license: bool = False,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Path to the official weights ``name`` in ``$RFDETR_HOME/weights``, downloading them if needed.

    A cached file with the right md5 is used as is (no network). ``force`` downloads again.

    Raises:
        DownloadError: offline, HTTP error or md5 mismatch; the message names the URL and the exact path to
            put a manually downloaded file at.
        LicenseNotAcceptedError: PML-1.0 weights without ``accept_license=True``.
        CheckpointError: ``name`` names no official weights.
    """
    variant = name if isinstance(name, Variant) else resolve_official_name(name)
    if variant is None or variant.weights is None:
        known = ", ".join(v for v in list_variants() if get_variant(v).weights is not None)
        raise CheckpointError(
            f"{name!r} is neither a weights file nor the name of official weights. Official names: {known} "
            "(or their upstream file names, e.g. rf-detr-seg-medium.pt)."
        )
    w = variant.weights
    if w.needs_license_acceptance and not accept_license:
        raise LicenseNotAcceptedError(_license_message(variant, w))
    dest = weights_dir(create=True) / w.filename
    if not force:
        for cached in cache_candidates(w):
            if cached.is_file() and (w.md5 is None or file_md5(cached) == w.md5):
                return cached
    url = w.url(weights_base_url(WEIGHTS_BASE_URL))
    _fetch(url, dest, w.md5, progress=progress, timeout=timeout, weights=w)
    return dest


def cache_candidates(w: PretrainedWeights) -> list[Path]:
    """Where a cached copy of ``w`` may be: ``$RFDETR_HOME/weights/<cache name>``, and the same folder under
    the name the URL itself gives (``rf-detr-seg-n-ft.pth``), so a file downloaded by hand needs no rename.
    A remote name shared by several weights (``checkpoint_best_regular.pth``) is not accepted."""
    folder = weights_dir()
    names = [w.filename]
    remote = Path(w.remote).name
    if "/" not in w.remote and remote != w.filename:
        names.append(remote)
    return [folder / n for n in names]


def _put_it_at(dest: Path, w: PretrainedWeights | None) -> str:
    """``dest``, plus the URL's own file name when that is accepted too (see :func:`cache_candidates`)."""
    if w is None or "/" in w.remote or Path(w.remote).name == dest.name:
        return str(dest)
    return f"{dest} (or keep the downloaded name: {dest.parent / Path(w.remote).name})"


def _fetch(
    url: str,
    dest: Path,
    md5: str | None,
    progress: bool,
    timeout: float,
    weights: PretrainedWeights | None = None,
) -> None:
    """Stream ``url`` to ``dest`` atomically, checking ``md5`` before the file takes its final name.

    On any failure (network, checksum) the temporary file is deleted and ``dest`` is left as it was.
    """
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(
            f"Could not download {url} ({_reason(exc)}). If this machine is offline, download that URL "
            f"elsewhere and put the file at {_put_it_at(dest, weights)}, or pass its path instead of the "
            "name; set RFDETR_WEIGHTS_URL to use a mirror (file:// works)."
        ) from exc
    h = hashlib.md5(usedforsecurity=False)
    bar = _progress_bar(_content_length(response), dest.name) if progress else None
    try:
        with response, atomic_path(dest) as tmp, open(tmp, "wb") as out:
            while True:
                try:
                    block = response.read(_CHUNK)
                except OSError as exc:
                    raise DownloadError(
                        f"Download of {url} broke off ({exc}). Try again, or download it by hand and put "
                        f"the file at {dest}."
                    ) from exc
                if not block:
                    break
                out.write(block)
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
            if md5 is not None and h.hexdigest() != md5:
                raise DownloadError(
                    f"Downloaded {url} but its md5 is {h.hexdigest()}, expected {md5}: the file is corrupt or "
                    f"was replaced, and was not kept. Try again, or download it by hand and put it at {dest}."
                )
    finally:
        if bar is not None:
            bar.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc)


def _content_length(response) -> int | None:
    try:
        value = response.headers.get("Content-Length")
        return int(value) if value else None
    except (AttributeError, TypeError, ValueError):
        return None


class _PlainProgress:
    """A one-line progress report on stderr, when tqdm is not installed."""

    def __init__(self, total: int | None, label: str):
        self.total, self.label, self.done, self._last = total, label, 0, -1

    def update(self, n: int) -> None:
        self.done += n
        pct = int(100 * self.done / self.total) if self.total else -1
        if pct != self._last and (pct % 10 == 0 or pct < 0):
            self._last = pct
            mb = self.done / 2**20
            msg = f"{pct:3d}% {mb:.1f} MiB" if pct >= 0 else f"{mb:.1f} MiB"
            sys.stderr.write(f"\rDownloading {self.label}: {msg}")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _progress_bar(total: int | None, label: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainProgress(total, label)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Downloading {label}")
