"""data.py: the IDX reader on small generated files, padding/scaling, and clear errors."""
import gzip

import numpy as np
import pytest
import torch

import data


def test_reads_padded_scaled_images(fake_fmnist):
    x, y = data.load("train", fake_fmnist)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert y.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert x.min() >= -1 and x.max() <= 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # 2-pixel black border
    raw = data.read_idx(f"{fake_fmnist}/{data.FILES['train'][0]}")
    torch.testing.assert_close(x[:, 0, 2:30, 2:30], torch.from_numpy(raw).float() / 127.5 - 1)
    assert (data.to_uint8(x)[:, 2:30, 2:30, 0].numpy() == raw).all()  # exact round trip


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load("test", str(tmp_path))


def test_bad_magic_and_truncated_files(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(str(p))
    data.write_idx(str(p), np.zeros((4, 3), np.uint8))
    raw = gzip.decompress(p.read_bytes())[:-2]
    p.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(str(p))
