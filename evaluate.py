"""Quality of generated samples, measured by our own Fashion-MNIST classifier.

- FD: Fréchet distance of classifier features (128-d), samples vs the 10k test images, with its
  standard error (bootstrap over the samples),
- class accuracy: does the classifier agree with the label we asked for?
- precision / recall: k-NN manifolds (k = 3, Kynkäänniemi et al. 2019) in the same space,
- paired distance: the mean distance, in the same features, between each sample and the FP
  model's sample from the same noise and label (the screen that picks QAT snapshots and settings:
  it sees the pictures, not the per-step ε error),
- PSNR of samples against the FP model's samples from the same noise (a diagnostic only: 4-bit
  sampling is chaotic, a change of 1e-6 in x_T moves a W4A4 sample as far as quantization does).
FD has a floor: n real training images score FD > 0 against the test set (the table prints it,
and FD − floor beside FD).

    python evaluate.py table --settings w4a4 --methods hadanorm,svdquant-hadanorm --cfg 1.5,4.0
    python evaluate.py table --settings "" --methods "" --qckpt checkpoints/dit_t4_w4a4_hqdm.pt --n 1000
    python evaluate.py screen runs/qat/w4a4_iter150.pt runs/qat/w4a4_iter300.pt   # n = 100, seed 3
    python evaluate.py fp --n 1000              # the FP model alone (torchrun splits the samples)
    python evaluate.py floor                    # 1000 real training images vs the test set
    python evaluate.py npz samples.npz          # samples written by `sample.py --npz`
    python evaluate.py train-classifier         # trains the CNN, writes checkpoints/fm_classifier.pt
"""
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import calibrate
import data
import dit
import integer
import sample
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
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                 nn.ReLU(), nn.MaxPool2d(2))
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
    common.atomic_save({"model": model.state_dict(), "test_acc": test_acc, "ref": ref}, path)


def load_classifier(path=CLASSIFIER):
    """-> (classifier in eval mode, reference dict with mu, sigma, feats of the 10k test images)."""
    ck = common.load_file(path, "evaluation classifier (python evaluate.py --train-classifier)")
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


def fd_of(f, ref):
    return frechet_distance(f.mean(0), torch.cov(f.T), ref["mu"].double(), ref["sigma"].double())


def fd_standard_error(f, ref, rounds=20, seed=0):
    """The spread of FD over bootstrap resamples of the samples' features (their standard
    deviation)."""
    g = torch.Generator().manual_seed(seed)
    fds = [fd_of(f[torch.randint(0, len(f), (len(f),), generator=g)], ref) for _ in range(rounds)]
    return float(np.std(fds))


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
    """All metrics for one set of samples -> dict. P/R use an equal-size subset of the test
    features; PSNR and the paired feature distance need ref_images (FP's, from the same noise)."""
    f, logits = features_and_logits(clf, images.float())
    n = len(f)
    sub = ref["feats"][torch.randperm(len(ref["feats"]), generator=torch.Generator().manual_seed(seed))[:n]]
    prec, rec = precision_recall(sub.double(), f)
    out = {"n": n, "fd": fd_of(f, ref), "fd_se": fd_standard_error(f, ref, seed=seed),
           "acc": (logits.argmax(1) == labels).float().mean().item(), "precision": prec,
           "recall": rec}
    if ref_images is not None:
        out["psnr"] = psnr(images, ref_images)
        out["pair"] = paired_distance(f, features_and_logits(clf, ref_images.float())[0])
    return out


def paired_distance(f, f_ref):
    """Mean feature distance between sample i and reference sample i (same noise and label)."""
    return (f - f_ref).norm(dim=1).mean().item()


def floor(n, clf, ref, seed=0, data_dir=None):
    """The FD floor: n real training images (not in the reference set) scored like samples."""
    x, y = data.load("train", data_dir)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return dict(score(x[idx], y[idx], clf, ref, seed=seed), sample_s=0)


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


def evaluate_model(model, n=1000, steps=50, cfg_scale=1.5, seed=0, clf_path=CLASSIFIER,
                   ref_images=None):
    """Samples n images (balanced classes, fixed noise) and scores them -> (metrics, images,
    labels)."""
    clf, ref, _ = load_classifier(clf_path)
    labels = class_labels(n, list(range(model.num_classes)))
    t0 = time.time()
    images = sample_all(model, labels, steps, cfg_scale, seed)
    metrics = score(images, labels, clf, ref, ref_images, seed)
    metrics["sample_s"] = time.time() - t0
    return metrics, images, labels


HEADER = ("| model | path | CFG | n | FD ↓ (± s.e.) | FD − floor | class acc % ↑ | precision ↑ | recall ↑ | paired dist ↓ | PSNR vs FP (dB) | calib (s) | sampling (s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(name, path, cfg_scale, m, calib="-", fd_floor=None):
    ps = f"{m['psnr']:.2f}" if "psnr" in m else "-"
    pair = f"{m['pair']:.3f}" if "pair" in m else "-"
    above = "-" if fd_floor is None else f"{m['fd'] - fd_floor:.2f}"
    return (f"| {name} | {path} | {cfg_scale:g} | {m['n']} | {m['fd']:.2f} ± {m['fd_se']:.2f} | {above} | {100 * m['acc']:.1f} | {m['precision']:.3f} | {m['recall']:.3f} | {pair} | {ps} | {calib} | {m['sample_s']:.0f} |")


def quantized_models(ckpt, settings, methods, qckpts, simulate, compile="auto"):
    """(name, path, builder) for every row after FP: saved quantized checkpoints (integer), then
    each setting x method calibrated from the FP checkpoint, on the integer path as `sample.py` runs
    it
    (compiled) unless simulate. A builder returns (model, calibration seconds or None)."""
    for p in qckpts:
        def load(p=p):
            model = integer.load_quantized(p)[0]
            integer.to_integer(model)  # a file calibrate.py wrote holds the simulated form
            sample.accelerate(model, compile)
            return model, None
        rec = integer.load_quantized(p)[2]
        yield f"W{rec.wq.bits}A{rec.aq.bits} {rec.method} ({os.path.basename(p)})", "integer", load
    for setting in settings:
        for method in methods:
            def build(setting=setting, method=method):
                model, _ = dit.load_checkpoint(ckpt)
                t0 = time.time()
                calibrate.quantize_fp(model, method, *SETTINGS[setting])
                seconds = time.time() - t0
                if not simulate:
                    integer.to_integer(model)
                    sample.accelerate(model, compile)
                return model, seconds
            yield f"{setting.upper()} {method}", "simulated" if simulate else "integer", build


def table(ckpt, n, steps, cfg_scales, seed, settings, methods, out=None, device="cpu", qckpts=(),
          simulate=False, compile="auto", data_dir=None, with_floor=True, with_fp=True):
    """The method x bits table, at each CFG scale: every row from the same noise and labels, PSNR
    and paired distance against the FP model's samples, each row says which path ran it; first
    the floor (n real training images) unless with_floor is off; without with_fp no FP row (nor
    PSNR or paired distance). -> (lines, [(name, metrics)])."""
    lines, results = [HEADER], []

    def emit(line):
        print(line, flush=True)
        lines.append(line)
        if out:
            common.atomic_write_text(out, "\n".join(lines) + "\n")
    print(HEADER, flush=True)
    fd_floor = None
    if with_floor:
        clf, ref, _ = load_classifier()
        m = floor(n, clf, ref, seed, data_dir)
        fd_floor = m["fd"]
        emit(row("real training images (the floor)", "-", 0, m, fd_floor=fd_floor))
    rows = list(quantized_models(ckpt, settings, methods, qckpts, simulate, compile))
    for cfg_scale in cfg_scales:
        ref_images = None
        if with_fp:
            fp, _ = dit.load_checkpoint(ckpt)
            m, ref_images, _ = evaluate_model(fp.to(device), n, steps, cfg_scale, seed)
            emit(row("FP32", "fp32 (eager)", cfg_scale, m, fd_floor=fd_floor))
            results.append(("FP32", m))
        for name, path, build in rows:
            model, seconds = build()
            m, _, _ = evaluate_model(model.to(device), n, steps, cfg_scale, seed,
                                     ref_images=ref_images)
            emit(row(name, path, cfg_scale, m, "-" if seconds is None else f"{seconds:.0f}",
                     fd_floor))
            results.append((name, m))
    return lines, results


def plot_budget(tables, path):
    """PNG: FD (± s.e.) against the mixed-precision budget (the share of linear MACs allowed 8-bit
    activations) for the rows of `evaluate.py table` files whose method is METHOD or METHOD+a8[:S];
    FP's FD as a line. -> the points plotted, [(budget, FD, s.e., name)]."""
    from PIL import Image, ImageDraw, ImageFont
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for t in tables
            for line in open(t, encoding="utf-8") if line.startswith("| ") and "±" in line]
    fd = lambda r: [float(v) for v in r[4].split("±")]
    fp = [fd(r) for r in rows if r[0] == "FP32"]
    def key(r):  # (bit setting, base method) of a row; ("FP32", "-") for FP
        bits, method = (r[0] + " -").split()[:2]
        return bits, method.split(calibrate.A8_SUFFIX)[0]
    keys = {key(r) for r in rows if calibrate.A8_SUFFIX in r[0]}
    pts, seen = [], set()
    for r in rows:
        if r[0] != "FP32" and key(r) in keys and r[0] not in seen:
            seen.add(r[0])
            pts.append((calibrate.parse_method(r[0].split()[1])[1] or 0.0, *fd(r), r[0]))
    if not pts or not fp:
        raise ValueError(f"{', '.join(tables)}: no FP row, or no METHOD / METHOD+a8 rows to plot")
    pts.sort()
    W, H, pad = 520, 320, 60
    lo = min([p[1] - p[2] for p in pts] + [fp[0][0] - fp[0][1]]) * 0.95
    hi = max([p[1] + p[2] for p in pts] + [fp[0][0] + fp[0][1]]) * 1.05
    X = lambda b: pad + b * (W - 2 * pad)
    Y = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    d.rectangle([pad, pad, W - pad, H - pad], outline="black")
    d.line([pad, Y(fp[0][0]), W - pad, Y(fp[0][0])], fill="red")
    d.text((W - pad - 90, Y(fp[0][0]) - 14), f"FP {fp[0][0]:.1f}", fill="red", font=font)
    for b, f, se, _ in pts:
        d.line([X(b), Y(f - se), X(b), Y(f + se)], fill=(90, 90, 90))
        d.ellipse([X(b) - 4, Y(f) - 4, X(b) + 4, Y(f) + 4], fill=(40, 90, 160))
        d.text((X(b) + 6, Y(f) - 6), f"{f:.1f}", fill="black", font=font)
    d.line([(X(b), Y(f)) for b, f, _, _ in pts], fill=(40, 90, 160))
    for v in (0, 0.25, 0.5, 0.75, 1):
        d.text((X(v) - 8, H - pad + 6), f"{100 * v:.0f}%", fill="black", font=font)
    d.text((pad, H - pad + 22), "budget: share of the linear MACs at 8-bit activations",
           fill="black", font=font)
    d.text((pad, pad - 34), f"FD (± s.e.) vs mixed-precision budget: {pts[0][3].split(' (')[0]}",
           fill="black", font=font)
    common.save_image(img, path)
    return pts


def parse_list(text, kind, allowed=None, cast=str):
    items = [cast(v) for v in text.split(",") if v.strip()] if text else []
    bad = [v for v in items if allowed is not None and v not in allowed]
    if bad:
        raise ValueError(f"unknown {kind} {bad}; choose from {', '.join(map(str, allowed))}")
    return items


def main(argv=None):
    ap = common.Parser(description="Score generated Fashion-MNIST samples with our classifier's features.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    shared = common.Parser(add_help=False)
    shared.add_argument("--ckpt", default=DEFAULT_CKPT, help="FP DiT checkpoint")
    shared.add_argument("--n", "--samples", dest="n", type=common.number(int, 4), default=None,
                        help="samples per row (table: 100, the fast screen; else 1000); under torchrun write --samples: torchrun's own parser swallows --n")
    shared.add_argument("--steps", type=common.number(int, 1, 1000), default=50, help="DDIM steps")
    shared.add_argument("--seed", type=common.number(int, 0), default=None,
                        help="noise seed, the rows share it (screen: 3, a seed of its own so that the final scores' seeds stay held out; else 0)")
    shared.add_argument("--classifier", default=CLASSIFIER)
    shared.add_argument("--device", default="cpu",
                        help="cpu or cuda (sampling; the classifier runs on the CPU)")
    t = sub.add_parser("table", parents=[shared],
                       help="FP and quantized rows at each CFG scale, same noise")
    t.add_argument("--cfg", default="1.5", help="CFG scales, comma-separated (1.5: the papers' metric; 4.0: the main job's pictures)")
    t.add_argument("--settings", default="w8a8,w4a8,w4a4,w4a3", help="bit settings")
    t.add_argument("--methods", default="rtn,smoothquant,hadamard,hadanorm,ditas",
                   help="PTQ recipes (see calibrate.py; METHOD+a8[:SHARE] for mixed precision)")
    t.add_argument("--qckpt", nargs="+", default=[],
                   help="also score these saved quantized checkpoints")
    t.add_argument("--simulate", action="store_true",
                   help="calibrated rows in fake-quant simulation instead of the integer path")
    t.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the integer rows (as sample.py; auto: where a C++ compiler is present)")
    t.add_argument("--out", default=None, help="also write the table (markdown) here, row by row")
    t.add_argument("--data-dir", default=None, help=f"Fashion-MNIST's gz IDX files, for the floor row (default {data.DATA_DIR})")
    t.add_argument("--no-floor", action="store_true", help="skip the floor row (n real training images; needs the data set)")
    t.add_argument("--no-fp", action="store_true", help="skip the FP row (an earlier table of the same n, seed and CFG has it; no PSNR or paired distance then)")
    s = sub.add_parser("screen", parents=[shared], help="rank quantized checkpoints by the paired distance of their samples to FP's (same noise; n 100, CFG 4.0, seed 3 unless given)")
    s.add_argument("qckpt", nargs="+")
    s.add_argument("--cfg", type=common.number(float, 0, 100), default=4.0, help="CFG scale")
    s.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="as table")
    s.add_argument("--out", default=None, help="also write the table (markdown) here, row by row")
    f = sub.add_parser("fp", parents=[shared], help="the FP model alone")
    f.add_argument("--cfg", type=common.number(float, 0, 100), default=1.5, help="CFG scale")
    sub.add_parser("floor", parents=[shared],
                   help="n real training images vs the test set (the FD floor)")
    z = sub.add_parser("npz", parents=[shared], help="score samples written by sample.py --npz")
    z.add_argument("path")
    c = sub.add_parser("train-classifier", parents=[shared],
                       help="train the classifier and save it with test stats")
    c.add_argument("--epochs", type=common.POSITIVE, default=6)
    c.add_argument("--data-dir", default=None)
    c.add_argument("--out", required=True, help=f"the classifier file to write (the shipped one, {CLASSIFIER}, only with --force)")
    c.add_argument("--force", action="store_true", help="let --out replace the shipped classifier")
    for p in (sub.choices["floor"], sub.choices["npz"]):
        p.add_argument("--data-dir", default=None)
    pl = sub.add_parser("plot", help="PNG of FD against the mixed-precision budget, from the markdown of `table --out` (rows METHOD and METHOD+a8[:SHARE], FP)")
    pl.add_argument("tables", nargs="+")
    pl.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    if args.cmd == "plot":
        common.check_output(args.out, args.tables, "--out")
        for budget, fd, se, name in plot_budget(args.tables, args.out):
            print(f"budget {100 * budget:5.1f}%  FD {fd:7.2f} ± {se:.2f}  {name}")
        return print(f"wrote {args.out}")
    device = common.check_device(args.device)
    if args.cmd == "train-classifier":
        common.check_output(args.out, (), "--out", args.force)
    elif args.cmd in ("table", "screen"):
        common.check_output(args.out, (args.ckpt, args.classifier, *args.qckpt), "--out")
        for p in args.qckpt:
            if not os.path.exists(p):
                raise FileNotFoundError(f"--qckpt {p}: no such file")
    if args.n is None:
        args.n = 100 if args.cmd in ("table", "screen") else 1000
    if args.seed is None:
        args.seed = 3 if args.cmd == "screen" else 0
    if args.n < 4:
        raise ValueError(f"--n must be at least 4 (precision/recall's 3-nearest neighbours), got {args.n}")

    if args.cmd == "train-classifier":
        t0 = time.time()
        clf, acc = train_classifier(args.epochs, args.seed, args.data_dir)
        save_classifier(clf, acc, args.out, args.data_dir)
        print(f"classifier: test accuracy {100 * acc:.2f}% after {args.epochs} epochs ({time.time() - t0:.0f} s) -> {args.out}")
        return
    if args.cmd == "table":
        cfgs = parse_list(args.cfg, "CFG scale", cast=float)
        settings = parse_list(args.settings, "setting", SETTINGS)
        methods = [m for m in parse_list(args.methods, "method") if calibrate.parse_method(m)]
        t0 = time.time()
        table(args.ckpt, args.n, args.steps, cfgs, args.seed, settings, methods, args.out, device,
              args.qckpt, args.simulate, args.compile, args.data_dir, not args.no_floor,
              not args.no_fp)
        print(f"(table: {time.time() - t0:.0f} s, n={args.n}, DDIM {args.steps}, seed {args.seed})")
        return
    if args.cmd == "screen":
        _, results = table(args.ckpt, args.n, args.steps, [args.cfg], args.seed, [], [], args.out,
                           device, args.qckpt, compile=args.compile, with_floor=False)
        print(f"ranked by paired distance to FP's samples (n={args.n}, CFG {args.cfg:g}, seed {args.seed}):")
        for name, m in sorted(results[1:], key=lambda r: r[1]["pair"]):
            print(f"  {m['pair']:.3f}  acc {100 * m['acc']:.1f}%  recall {m['recall']:.3f}  {name}")
        return
    clf, ref, test_acc = load_classifier(args.classifier)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if rank0:
        print(f"classifier test accuracy {100 * test_acc:.2f}%\n{HEADER}")
    if args.cmd == "floor":
        print(row("real training images (the floor)", "-", 0, floor(args.n, clf, ref, args.seed, args.data_dir)))
        return
    if args.cmd == "npz":
        try:
            z = np.load(args.path, allow_pickle=False)
            arr, labels = z["arr_0"], z["labels"]
        except (OSError, ValueError, KeyError, EOFError, TypeError):
            raise ValueError(f"{args.path} is not an npz of sample.py --npz (arr_0 uint8 NHWC and labels)") from None
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3) or labels.shape != arr.shape[:1] \
                or len(arr) < 4:
            raise ValueError(f"{args.path}: arr_0 {arr.dtype} {arr.shape} with labels {labels.shape}; wanted uint8 (N >= 4, H, W, 1 or 3) and N labels")
        z = {"arr_0": arr, "labels": labels}
        x = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        print(row(args.path, "-", 0,
                  dict(score(x, torch.from_numpy(z["labels"]).long(), clf, ref, seed=args.seed),
                       sample_s=0)))
        return
    import torch.distributed as dist
    device = common.setup_distributed(args.device)[2]  # torchrun: the samples are split
    model, cfg = dit.load_checkpoint(args.ckpt)
    m, _, _ = evaluate_model(model.to(device), args.n, args.steps, args.cfg, args.seed,
                             args.classifier)
    if rank0:
        print(row(f"{cfg['model']} FP32, DDIM {args.steps}", "fp32 (eager)", args.cfg, m))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sample.keep_freed_memory()  # as sample.py: freed activations stay in the process
    common.run_cli(main)
