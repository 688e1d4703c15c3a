"""Plumbing every script shares, written once: the CLI runner, safe file loading, hashing, atomic writes.

Every write goes to a temporary file in the destination's folder and is renamed over it, so a crash,
a kill or a full disk never leaves half a file where the old one was, and a failed write removes its
temporary file.

    python common.py         # nothing to teach here: prints what this file provides
"""
import contextlib
import hashlib
import os
import sys
import tempfile

import torch


def run_cli(main):
    """A script's entry point: expected errors (bad input, missing or unreadable files) become one line
    on stderr and exit code 2, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `python x.py | head`: the reader left, nothing to report
        sys.stderr.close()


def load_file(path, what="checkpoint"):
    """torch.load(weights_only=True) on the CPU, with a readable error for a missing or corrupt file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {str(e)[:120]}") from None


def file_sha256(path):
    """SHA-256 of a file: ties a quantized checkpoint to the FP file it was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_device(name):
    """'cpu' / 'cuda' / 'cuda:N' -> torch.device, or a clear error when CUDA is missing."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"unknown --device {name!r}: cpu or cuda")
    return torch.device(name)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the final file private
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


if __name__ == "__main__":
    print(__doc__.strip().splitlines()[0])
    print("run_cli, load_file, file_sha256, check_device, atomic_path, atomic_save, atomic_write_text")
