"""Fashion-MNIST from Debian's `dataset-fashion-mnist`: gz IDX files -> 32x32 tensors in [-1, 1].

    python data.py           # shapes, label counts and pixel range of both splits
"""
import gzip
import os
import struct

import numpy as np
import torch

import common

DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """Reads one (optionally gzipped) IDX file into a numpy array; checks the header."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read {path}: truncated or not gzip data") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or len(raw) < 4 + 4 * raw[3]:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} values (truncated?)")
    return data.reshape(dims).copy()  # writable, detached from the file buffer


def write_idx(path, arr):
    """Writes a uint8 array as a gzipped IDX file (used by the tests to fake the data set)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def load(split="train", data_dir=None):
    """(images, labels): images float32 (N, 1, 32, 32) in [-1, 1], zero-padded 28 -> 32; labels
    int64."""
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; choose train or test")
    data_dir = data_dir or os.environ.get("FASHION_MNIST_DIR", DATA_DIR)
    paths = [os.path.join(data_dir, f) for f in FILES[split]]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"Fashion-MNIST not found at {p}: install Debian's package 'dataset-fashion-mnist' (sudo apt-get install dataset-fashion-mnist)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST shapes: images {images.shape}, labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)  # (N, 1, 28, 28)
    pad = (32 - x.shape[-1]) // 2
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)  # background is black (-1)
    return x, torch.from_numpy(labels.astype(np.int64))


def to_uint8(x):
    """[-1, 1] float images (N, C, H, W) -> uint8 (N, H, W, C), the ADM/`sample_ddp.py` layout."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def main():
    ap = common.Parser(description="Read Fashion-MNIST and print what the model will see.")
    ap.add_argument("--data-dir", default=None,
                    help=f"folder with the gz IDX files (default {DATA_DIR})")
    args = ap.parse_args()
    for split in ("train", "test"):
        x, y = load(split, args.data_dir)
        print(f"{split}: images {tuple(x.shape)} in [{x.min():.1f}, {x.max():.1f}], labels per class {torch.bincount(y, minlength=10).tolist()}")


if __name__ == "__main__":
    common.run_cli(main)
