"""Quality of generated samples, measured by our own Fashion-MNIST classifier (DESIGN §6).

- FD: Fréchet distance of classifier features (128-d), samples vs the 10k test images,
- class accuracy: does the classifier agree with the label we asked for?
- precision / recall: k-NN manifolds (k = 3, Kynkäänniemi et al. 2019) in the same space,
- PSNR of samples against reference samples drawn from the same noise (quantized vs FP).

    python evaluate.py --train-classifier     # trains the CNN, writes checkpoints/fm_classifier.pt
    python evaluate.py --n 1000               # one row for the FP model (DDIM 50, CFG 1.5)
    python evaluate.py --real-floor           # 1000 real training images vs the test set
    python evaluate.py --npz samples.npz      # scores samples written by `sample.py --npz`
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import calibrate
import data
import dit
from diffusion import class_labels, make_noise
from sample import DEFAULT_CKPT, SETTINGS, generate, psnr

CLASSIFIER = "checkpoints/fm_classifier.pt"


#################################################################################
#                          The evaluation classifier                            #
#################################################################################

class Classifier(nn.Module):
    """A small CNN for 32x32 Fashion-MNIST; its 128-d penultimate layer is the feature space."""
    def __init__(self, feat_dim=128):
        super().__init__()
        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.convs = nn.Sequential(stage(1, 32), stage(32, 64), stage(64, 128))  # 32 -> 4
        self.fc = nn.Linear(128 * 4 * 4, feat_dim)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feat_dim, 10))

    def features(self, x):
        return F.relu(self.fc(self.convs(x).flatten(1)))  # (N, 128)

    def forward(self, x):
        return self.head(self.features(x))  # (N, 10)


def train_classifier(epochs=6, seed=0, data_dir=None, batch_size=128):
    """Trains the classifier (Adam, flips, cosine LR); returns (model, test accuracy)."""
    torch.manual_seed(seed)
    x, y = data.load("train", data_dir)
    xt, yt = data.load("test", data_dir)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    total = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=total)
    bar = tqdm(total=total, desc="classifier", disable=None)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, accuracy(model, xt, yt)


@torch.no_grad()
def features_and_logits(model, x, batch_size=500):
    model.eval()
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats).double(), torch.cat(logits)


def accuracy(model, x, y):
    return (features_and_logits(model, x)[1].argmax(1) == y).float().mean().item()


def save_classifier(model, test_acc, path=CLASSIFIER, data_dir=None):
    """Stores the classifier with the test set's feature statistics (so tests need no data set)."""
    xt, _ = data.load("test", data_dir)
    f, _ = features_and_logits(model, xt)
    ref = {"mu": f.mean(0), "sigma": torch.cov(f.T), "feats": f.half()}
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "test_acc": test_acc, "ref": ref}, tmp)
    import os
    os.replace(tmp, path)


def load_classifier(path=CLASSIFIER):
    """-> (classifier in eval mode, reference dict with mu, sigma, feats of the 10k test images)."""
    ck = dit.load_file(path, "evaluation classifier (python evaluate.py --train-classifier)")
    model = Classifier()
    dit.load_state_dict_checked(model, ck["model"], path)
    return model.eval(), ck["ref"], ck["test_acc"]


#################################################################################
#                                   Metrics                                     #
#################################################################################

def sqrtm_psd(a):
    """Square root of a symmetric PSD matrix by eigen-decomposition (float64, no scipy)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """||μ1-μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), with Tr((Σ1 Σ2)^½) = Σ sqrt(eig(√Σ1 Σ2 √Σ1))."""
    r1 = sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


def precision_recall(real, fake, k=3):
    """Improved precision/recall: fraction of fake inside the real k-NN balls, and vice versa."""
    def radii(f):
        d = torch.cdist(f, f)  # (N, N)
        return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0
    def coverage(a, ra, b):
        return (torch.cdist(b, a) <= ra[None, :]).any(dim=1).float().mean().item()
    real, fake = real.double(), fake.double()
    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


def score(images, labels, clf, ref, ref_images=None, seed=0):
    """All metrics for one set of samples -> dict. P/R use an equal-size subset of the test features."""
    f, logits = features_and_logits(clf, images.float())
    n = len(f)
    sub = ref["feats"][torch.randperm(len(ref["feats"]), generator=torch.Generator().manual_seed(seed))[:n]]
    prec, rec = precision_recall(sub.double(), f)
    out = {"n": n, "fd": frechet_distance(f.mean(0), torch.cov(f.T), ref["mu"].double(), ref["sigma"].double()),
           "acc": (logits.argmax(1) == labels).float().mean().item(), "precision": prec, "recall": rec}
    if ref_images is not None:
        out["psnr"] = psnr(images, ref_images)
    return out


def sample_all(model, labels, steps, cfg_scale, seed):
    """generate() for all labels; under torchrun each process samples its slice of the same fixed
    noise and labels, and every process gets the gathered result (same images as one process)."""
    import torch.distributed as dist
    noise = make_noise(len(labels), model, seed)
    if not (dist.is_available() and dist.is_initialized()):
        return generate(model, labels, steps, cfg_scale, seed, progress=True, noise=noise)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = -(-len(labels) // world)
    sl = slice(rank * per, (rank + 1) * per)
    part = generate(model, labels[sl], steps, cfg_scale, seed, noise=noise[sl]) if len(labels[sl]) else None
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return torch.cat([p for p in parts if p is not None])


def evaluate_model(model, n=1000, steps=50, cfg_scale=1.5, seed=0, clf_path=CLASSIFIER, ref_images=None):
    """Samples n images (balanced classes, fixed noise) and scores them -> (metrics, images, labels)."""
    clf, ref, _ = load_classifier(clf_path)
    labels = class_labels(n, list(range(model.num_classes)))
    t0 = time.time()
    images = sample_all(model, labels, steps, cfg_scale, seed)
    metrics = score(images, labels, clf, ref, ref_images, seed)
    metrics["sample_s"] = time.time() - t0
    return metrics, images, labels


def row(name, m, extra=()):
    ps = f"{m['psnr']:.2f}" if "psnr" in m else "-"
    return (f"| {name} | {m['n']} | {m['fd']:.2f} | {100 * m['acc']:.1f} | {m['precision']:.3f} | "
            f"{m['recall']:.3f} | {ps} |" + "".join(f" {e} |" for e in extra))


HEADER = "| model | n | FD ↓ | class acc % ↑ | precision ↑ | recall ↑ | PSNR vs FP (dB) ↑ |\n|---|---|---|---|---|---|---|"
TABLE_HEADER = HEADER.replace("↑ |\n", "↑ | calib (s) | sampling (s) |\n") + "---|---|"


def table(ckpt, n, steps, cfg_scale, seed, settings, methods, out=None, device="cpu", qckpts=()):
    """The method x bits table: every row from the same noise and labels; PSNR against FP's samples.
    `qckpts`: saved quantized checkpoints (e.g. QAT results), scored on their integer path."""
    lines = [TABLE_HEADER]
    def emit(line):
        print(line, flush=True)
        lines.append(line)
        if out:
            with open(out, "w") as f:
                f.write("\n".join(lines) + "\n")
    print(TABLE_HEADER, flush=True)
    fp, cfg = dit.load_checkpoint(ckpt)
    m, ref_images, _ = evaluate_model(fp.to(device), n, steps, cfg_scale, seed)
    emit(row("FP32", m, ("-", f"{m['sample_s']:.0f}")))
    for path in qckpts:
        model, _, recipe = calibrate.load_quantized(path)
        m, _, _ = evaluate_model(model.to(device), n, steps, cfg_scale, seed, ref_images=ref_images)
        name = f"W{recipe['wq'].bits}A{recipe['aq'].bits} {recipe['method']} ({os.path.basename(path)})"
        emit(row(name, m, ("-", f"{m['sample_s']:.0f}")))
    for setting in settings:
        for method in methods:
            model, _ = dit.load_checkpoint(ckpt)
            model.to(device)
            t0 = time.time()
            calibrate.quantize_fp(model, method, *SETTINGS[setting])
            calib_s = time.time() - t0
            m, _, _ = evaluate_model(model, n, steps, cfg_scale, seed, ref_images=ref_images)
            emit(row(f"{setting.upper()} {method}", m, (f"{calib_s:.0f}", f"{m['sample_s']:.0f}")))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score generated Fashion-MNIST samples with our classifier's features.")
    ap.add_argument("--ckpt", default=DEFAULT_CKPT, help="DiT checkpoint to sample from")
    ap.add_argument("--n", "--samples", dest="n", type=int, default=None,
                    help="number of samples (default 1000; 100 per row for --table); under torchrun write "
                         "--samples: torchrun's own parser swallows --n")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="guidance for metrics (papers' FID setting)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classifier", default=CLASSIFIER)
    ap.add_argument("--train-classifier", action="store_true", help="train the classifier and save it with test stats")
    ap.add_argument("--epochs", type=int, default=6, help="classifier epochs")
    ap.add_argument("--real-floor", action="store_true", help="score n real training images (the FD floor)")
    ap.add_argument("--npz", default=None, help="score samples from this file (arr_0 uint8 NHWC + labels)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--table", action="store_true", help="the method x bits table (FP + PTQ recipes)")
    ap.add_argument("--settings", default="w8a8,w4a8,w4a4,w4a3", help="bit settings for --table")
    ap.add_argument("--methods", default="rtn,smoothquant,hadamard,hadanorm,ditas", help="recipes for --table")
    ap.add_argument("--table-out", default=None, help="also write the table (markdown) here, row by row")
    ap.add_argument("--qckpt", nargs="+", default=[], help="--table: also score these quantized checkpoints "
                    "(qat.py / calibrate.py --out), on the integer path")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (sampling; the classifier runs on the CPU)")
    args = ap.parse_args(argv)
    device = dit.check_device(args.device)
    if args.n is None:
        args.n = 100 if args.table else 1000
    if args.n < 2:
        raise ValueError(f"--n must be at least 2 (FD needs a covariance), got {args.n}")

    if args.train_classifier:
        t0 = time.time()
        clf, acc = train_classifier(args.epochs, args.seed, args.data_dir)
        save_classifier(clf, acc, args.classifier, args.data_dir)
        print(f"classifier: test accuracy {100 * acc:.2f}% after {args.epochs} epochs "
              f"({time.time() - t0:.0f} s) -> {args.classifier}")
        return
    if args.table:
        settings, methods = [x for x in args.settings.split(",") if x], [x for x in args.methods.split(",") if x]
        for p in args.qckpt:
            if not os.path.exists(p):
                raise FileNotFoundError(f"--qckpt {p}: no such file")
        bad = [s for s in settings if s not in SETTINGS] + [m for m in methods if m not in calibrate.METHODS]
        if bad:
            raise ValueError(f"unknown setting/method {bad}: settings {list(SETTINGS)}, methods {calibrate.METHODS}")
        t0 = time.time()
        table(args.ckpt, args.n, args.steps, args.cfg_scale, args.seed, settings, methods, args.table_out, device,
              args.qckpt)
        print(f"(table: {time.time() - t0:.0f} s, n={args.n}, DDIM {args.steps}, cfg {args.cfg_scale})")
        return
    clf, ref, test_acc = load_classifier(args.classifier)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"classifier test accuracy {100 * test_acc:.2f}%")
        print(HEADER)
    if args.real_floor:
        x, y = data.load("train", args.data_dir)
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.n]
        print(row(f"real train images (floor)", score(x[idx], y[idx], clf, ref, seed=args.seed)))
        return
    if args.npz:
        z = np.load(args.npz)
        if "arr_0" not in z or "labels" not in z:
            raise ValueError(f"{args.npz} needs arr_0 (uint8 NHWC) and labels")
        x = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        print(row(args.npz, score(x, torch.from_numpy(z["labels"]).long(), clf, ref, seed=args.seed)))
        return
    import torch.distributed as dist
    if "RANK" in os.environ:  # torchrun: the samples are split over the processes (gloo, CPU)
        dist.init_process_group("gloo")
    model, cfg = dit.load_checkpoint(args.ckpt)
    model.to(device)
    m, _, _ = evaluate_model(model, args.n, args.steps, args.cfg_scale, args.seed, args.classifier)
    if int(os.environ.get("RANK", 0)) == 0:
        print(row(f"{cfg['model']} FP32, DDIM {args.steps}, cfg {args.cfg_scale}", m))
        print(f"(sampling + scoring {m['sample_s']:.0f} s)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    dit.run_cli(main)
