"""Plumbing every script shares, written once: the CLI runner, safe file loading, hashing, atomic
writes, checks of numbers and output paths made before any slow work.

Every write goes to a temporary file in the destination's folder and is renamed over it, so a crash,
a kill or a full disk never leaves half a file where the old one was, and a failed write removes its
temporary file.

    python common.py         # nothing to teach here: prints what this file provides
"""
import argparse
import contextlib
import hashlib
import math
import os
import pickle
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one --help away) and config files: `@FILE` reads
    flags from FILE, whitespace-separated, `#` starting a comment (the runs the docs cite:
    config/)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, fromfile_prefix_chars="@", **kw)

    def convert_arg_line_to_args(self, line):
        return line.split("#", 1)[0].split()

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main):
    """A script's entry point: expected errors (bad input, missing or unreadable files) become one
    line on stderr and exit code 2, not a traceback."""
    try:
        main()
    except BrokenPipeError:  # `python x.py | head`: the reader left, nothing to report
        sys.stderr.close()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only folder, a folder where a file should be
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def load_file(path, what="checkpoint", allow=()):
    """torch.load(weights_only=True) on the CPU, with a readable error for a missing or corrupt
    file; `allow`: classes the file may hold besides tensors and plain data (e.g.
    argparse.Namespace)."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a file") from None
    # torch raises many kinds for a damaged file (RuntimeError, IndexError, ...)
    except Exception as e:
        why = "truncated or empty" if isinstance(e, EOFError) else (
            "holds objects other than tensors and plain data" if isinstance(e, pickle.UnpicklingError)
            else "corrupt or not a torch file")
        raise ValueError(f"cannot read {what} {path}: {why}") from None


def check_finite(obj, what):
    """Raises naming the first tensor of a (nested) checkpoint dict that holds NaN or Inf."""
    def walk(o, key):
        if torch.is_tensor(o):
            if o.is_floating_point() and not torch.isfinite(o).all():
                raise ValueError(f"{what}: {key or 'tensor'} holds NaN or Inf; refused")
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{key}[{i}]")
        elif isinstance(o, float) and not math.isfinite(o):
            raise ValueError(f"{what}: {key} is {o}; refused")
    walk(obj, "")
    return obj


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


def setup_distributed(device, batch_size=None):
    """-> (rank, world size, torch.device). One process unless launched by torchrun (RANK in the
    environment): then a process group (nccl on CUDA, gloo on the CPU) and, where a global batch
    is split over the processes, a batch size they divide."""
    check_device(device)
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    import torch.distributed as dist
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if batch_size is not None and batch_size % world:
        raise ValueError(f"--batch-size {batch_size} is not divisible by {world} processes")
    if not cuda:
        return rank, world, torch.device("cpu")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world, torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it is renamed over `path`, on failure
    removed."""
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
    """torch.save, atomically; a checkpoint holding NaN or Inf is never written."""
    check_finite(obj, f"not saving {path}")
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def save_image(img, path):
    """A PIL image, atomically, in the format its file name says (PNG by default)."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt)


def number(kind=float, lo=None, hi=None, above=None):
    """An argparse type: a finite `kind` with lo <= x <= hi and x > above (each optional)."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if kind is int and not -2 ** 63 <= x < 2 ** 63:
            raise argparse.ArgumentTypeError(f"{text} is out of the 64-bit range")
        if (lo is not None and x < lo) or (hi is not None and x > hi) or (above is not None and x <= above):
            rng = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "",
                   f"> {above}" if above is not None else ""]
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {' and '.join(r for r in rng if r)}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = number(int, lo=1)


def shipped_files(root=ROOT):
    """Real paths of the files under checkpoints/ that the project ships (git's tracked files;
    without git, every file there): outputs never replace them without --force."""
    folder = os.path.join(root, "checkpoints")
    files = None
    try:
        ls = subprocess.run(["git", "ls-files", "checkpoints"], cwd=root, capture_output=True,
                            text=True)
        if ls.returncode == 0 and ls.stdout.strip():
            files = [os.path.join(root, f) for f in ls.stdout.split()]
    except OSError:
        pass
    if files is None:
        files = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    return {os.path.realpath(f) for f in files}


def check_output(path, inputs=(), flag="--out", force=False):
    """Before any slow work: refuses an output file that is one of this run's inputs, a shipped file
    (unless force), a folder, or in a folder that is missing or not writable."""
    if not path:
        return
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    for i in inputs:
        if i and os.path.exists(i) and os.path.realpath(i) == real:
            raise ValueError(f"{flag} {path} is also this run's input; choose another path")
    if not force and os.path.exists(real) and real in shipped_files():
        raise ValueError(f"{flag} {path} would replace a shipped file; choose another path (or add --force)")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the folder {os.path.dirname(path) or '.'} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {os.path.dirname(path) or '.'} is not writable")


if __name__ == "__main__":
    print(__doc__.strip().splitlines()[0])
    print("run_cli, load_file, check_finite, file_sha256, check_device, atomic_path, atomic_save, atomic_write_text, number, shipped_files, check_output")
