"""The data a bundle was instrumented on, split exactly as then (or other data, split with the same seed)."""

from __future__ import annotations

from harden.core.arguments import check_choice
from harden.errors import HardenError
from harden.io.data import Dataset, load_data

SPLITS = ("train", "calibration", "test")


def bundle_data(manifest: dict, data: str | None = None) -> Dataset:
    """The bundle's own data when ``data`` is None (refused if it no longer splits as recorded), else ``data``
    split with the bundle's seed and fractions."""
    split = manifest["data"]["split"]
    spec = data or manifest["data"]["name"]
    kwargs = {"seed": split.get("seed", 0), "input_range": tuple(manifest["input"]["range"])}
    if "fractions" in split:
        kwargs["fractions"] = tuple(split["fractions"])
    if data is None and split.get("limit"):
        kwargs["limit"] = split["limit"]
    dataset = load_data(spec, **kwargs)
    if dataset.num_classes > manifest["num_classes"]:
        raise HardenError(f"data {spec!r} has labels up to {dataset.num_classes - 1}; the bundle's model knows "
                          f"classes 0..{manifest['num_classes'] - 1}")
    if list(dataset.input_shape) != list(manifest["input"]["shape"]):
        raise HardenError(f"data {spec!r} has input shape {dataset.input_shape}; the bundle expects {tuple(manifest['input']['shape'])}")
    if data is None and dataset.split.get("fingerprint") != split.get("fingerprint"):
        raise HardenError(f"data {spec!r} no longer splits as it did when the bundle was made (fingerprint differs)")
    return dataset


def split_of(dataset: Dataset, name: str):
    check_choice(name, SPLITS, "--split")
    return getattr(dataset, name)
