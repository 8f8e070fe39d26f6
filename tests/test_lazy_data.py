"""Data larger than memory: memory-mapped .npy and image folders read on demand give the in-memory results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harden.io.data import load_data
from harden.io.lazy import LazyImages


@pytest.fixture(scope="module")
def npy_folder(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path_factory.mktemp("npy")
    np.save(folder / "x.npy", (digits.images * 15.9375).round().astype(np.uint8)[:, None])   # 0..16 -> 0..255
    np.save(folder / "y.npy", digits.target.astype(np.int64))
    return folder


def test_a_memory_mapped_npy_is_read_on_demand_with_the_same_split_and_fingerprint(npy_folder, monkeypatch):
    eager = load_data(str(npy_folder), seed=0)
    monkeypatch.setenv("HARDEN_IN_MEMORY_LIMIT", "100000")   # bytes: the 1797 digits (460 KB) no longer fit
    lazy = load_data(str(npy_folder / "x.npy"), seed=0)
    assert isinstance(lazy.train.x, LazyImages) and isinstance(eager.train.x, torch.Tensor)
    assert lazy.split["fingerprint"] == eager.split["fingerprint"]
    assert lazy.input_shape == eager.input_shape == (1, 8, 8)
    for name in ("train", "calibration", "test"):
        a, b = getattr(eager, name), getattr(lazy, name)
        assert torch.equal(a.y, b.y) and len(a) == len(b)
        assert torch.equal(a.x[5:40], b.x[5:40])
        idx = torch.tensor([7, 3, 3, 0])
        assert torch.equal(a.x[idx], b.x[idx])
    with pytest.raises(Exception, match="HARDEN_IN_MEMORY_LIMIT"):
        lazy.train.x.numpy()   # never a silent load of the whole split


def test_an_image_folder_is_read_on_demand(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    eager = load_data(str(tmp_path), seed=1)
    monkeypatch.setenv("HARDEN_IN_MEMORY_LIMIT", "100")
    lazy = load_data(str(tmp_path), seed=1)
    assert isinstance(lazy.test.x, LazyImages) and lazy.split["fingerprint"] == eager.split["fingerprint"]
    assert torch.equal(lazy.train.x[0:len(lazy.train)], eager.train.x)


def test_instrument_certify_and_evaluate_read_in_batches_and_agree(npy_folder, tiny_model, monkeypatch, one_thread):
    from harden.api import certify, evaluate
    from harden.bundle.manifest import build_manifest
    from harden.instrumentation.pipeline import instrument
    from harden.methods.base import MethodSpec, Options

    results = []
    for limit in (None, "100000"):
        if limit:
            monkeypatch.setenv("HARDEN_IN_MEMORY_LIMIT", limit)
        data = load_data(str(npy_folder), seed=0)
        hardened = instrument(tiny_model, data, [MethodSpec.of("ctt-lite", mask_ratio=0.05)], Options(key="lazy"))
        manifest = build_manifest(hardened)
        manifest["data"]["name"] = str(npy_folder)
        certificates = certify(hardened, manifest, [0.01], limit=60, check=2)
        attacked = evaluate(hardened, manifest, ["fgsm:eps=0.1"], limit=60).to_dict()
        results.append((hardened.facts["thresholds"], hardened.facts["metrics"]["test_fpr"], certificates,
                        [{k: v for k, v in r.items() if k != "seconds"} for r in attacked["rows"]],
                        attacked["clean_fpr"]))
    assert results[0] == results[1]
