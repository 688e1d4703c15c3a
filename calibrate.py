"""Data-free post-training quantization: statistics from the FP model's own sampling, then a recipe.

Recipes (docs/design.md), all built on the one `QuantLinear`:
    rtn          quantize W and x directly
    smoothquant  x / s, W diag(s), s_j = max|x_j|^α / max|W_:,j|^(1-α)
    hadamard     x Hᵀ online, W Hᵀ offline (QuaRot-style, per linear: adaLN blocks a residual rotation)
    hadanorm     ((x − μ) / s) Hᵀ with μ the per-sample token mean (dynamic), s from the centred range
                 ablations: hadanorm-nomean, hadanorm-static (calibrated μ), hadanorm-noscale
    ditas        temporal-aggregated max, per-layer α grid search on output MSE, s folded into adaLN
                 (qkv, fc1) and V rows (proj), fc2 online; weight LoRA by alternating quantize / SVD
    svdquant     SmoothQuant's migration, then the smoothed weight's best rank-r part runs in float and
                 only the residual is quantized (Li et al., SVDQuant); svdquant-hadanorm: the same
                 branch under HadaNorm's centring + scale + Hadamard
    METHOD+a8    any of them with the layers whose 8-bit activations lower the guided ε error most per
                 MAC kept at A8, within a budget: 10% of the linear MACs, or METHOD+a8:0.2 for 20%

    python calibrate.py --method hadanorm --wbits 4 --abits 4 --out runs/dit_t4_w4a4_hadanorm.pt
"""
import copy
import dataclasses
import time

import torch
from tqdm import tqdm

import common
import dit
import integer
import quant
from quant import QConfig, QuantLinear
from diffusion import Diffusion, class_labels, guided, make_noise, sample_states

# each recipe as data: its Hadamard form, centring, the statistic its channel scale smooths (None: no
# scale; "search": DiTAS's per-layer α search), and whether it takes SVDQuant's low-rank branch
METHOD_TABLE = {
    "rtn": dict(hadamard="none", center="none", scale=None, lowrank=False),
    "smoothquant": dict(hadamard="none", center="none", scale="absmax", lowrank=False),
    "hadamard": dict(hadamard="double", center="none", scale=None, lowrank=False),
    "hadanorm": dict(hadamard="double", center="dynamic", scale="cabsmax", lowrank=False),
    "hadanorm-nomean": dict(hadamard="double", center="none", scale="absmax", lowrank=False),
    "hadanorm-static": dict(hadamard="double", center="static", scale="cabsmax", lowrank=False),
    "hadanorm-noscale": dict(hadamard="double", center="dynamic", scale=None, lowrank=False),
    "ditas": dict(hadamard="none", center="none", scale="search", lowrank=False),
    "svdquant": dict(hadamard="none", center="none", scale="absmax", lowrank=True),
    "svdquant-hadanorm": dict(hadamard="double", center="dynamic", scale="cabsmax", lowrank=True),
}
METHODS = tuple(METHOD_TABLE)
# "hadanorm+a8": the most sensitive layers at 8-bit activations, within a share of the MACs
# (10% by default, "hadanorm+a8:0.2" for 20%)
A8_SUFFIX, A8_BUDGET = "+a8", 0.1


#################################################################################
#                       Statistics from the model's own sampling                #
#################################################################################

@torch.no_grad()
def collect_stats(model, n=16, steps=25, cfg_scale=1.5, seed=1234, keep=8, keep_rows=4,
                  keep_tokens=64):
    """Runs DDIM from fixed noise and records, for every quantized layer's input x (B, T, K):
    absmax[k] per step (temporal), per-channel mean, the range after per-sample centering, and a
    few inputs at `keep` spread-out steps (for α search and SQNR), at most `keep_tokens` evenly
    spaced tokens each, on the CPU. Running statistics only: no activation history is held
    (DiT-XL/2: ~1.9 GB kept instead of ~7.4 GB for whole inputs)."""
    layers = quant.quant_layers(model)
    stats = {name: dict(absmax_t=[], sum=0, count=0, cabsmax=None, samples=[], samples_t=[])
             for name, *_ in layers}
    keep_at = set(torch.linspace(0, steps - 1, keep).round().long().tolist())
    state = {"i": 0}  # the sampler's step, for the hooks

    def record(st, x):  # x: (B, T, K), one input of the layer whose statistics st are
        st["absmax_t"].append(x.abs().amax(dim=(0, 1)))
        st["sum"] = st["sum"] + x.sum(dim=(0, 1))
        st["count"] += x.shape[0] * x.shape[1]
        c = (x - x.mean(dim=1, keepdim=True)).abs().amax(dim=(0, 1))
        st["cabsmax"] = c if st["cabsmax"] is None else torch.maximum(st["cabsmax"], c)
        if state["i"] in keep_at:
            stride = max(1, x.shape[1] // keep_tokens)
            st["samples"].append(x[:keep_rows, ::stride][:, :keep_tokens].cpu().clone())
            st["samples_t"].append(torch.full((min(keep_rows, len(x)),), state["t"]))
    hook = lambda st: lambda mod, inp: record(st, inp[0].float())
    handles = [lin.register_forward_pre_hook(hook(stats[name])) for name, _, _, lin in layers]
    diffusion, device = Diffusion.make(steps=steps), next(model.parameters()).device
    labels = class_labels(n, list(range(model.num_classes))).to(device)
    x, fn = make_noise(n, model, seed).to(device), guided(model, labels, cfg_scale)
    try:
        for i in tqdm(range(steps)[::-1], desc="calibration sampling", leave=False, disable=None):
            state["i"], state["t"] = steps - 1 - i, int(diffusion.timestep_map[i])
            x = diffusion.ddim_step(fn, x, i, clip=model.in_channels != 4)  # latents: no clipping
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        st["absmax_t"] = torch.stack(st["absmax_t"]).cpu()  # (steps, K)
        st["absmax"] = st["absmax_t"].amax(0)  # temporal aggregation: max over steps
        st["mean"] = (st.pop("sum") / st.pop("count")).cpu()
        st["cabsmax"] = st["cabsmax"].cpu()
        st["samples"] = torch.cat(st["samples"])  # (keep * rows, T, K)
        st["samples_t"] = torch.cat(st["samples_t"])  # (keep * rows,) the timestep of each
    return stats


#################################################################################
#                                    Recipes                                    #
#################################################################################

def smooth_scale(act_max, w, alpha):
    """SmoothQuant's s_j = a_j^α / max|W_:,j|^(1-α), guarded against zeros."""
    # exercise smooth_scale: per input channel j, s_j = max|x_j|^α / max|W_:,j|^(1-α)
    a = act_max.to(w.device).clamp(min=1e-5)
    wmax = w.abs().amax(0).clamp(min=1e-5)
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
    # end exercise smooth_scale


def layer_mse(lin, recipe_kw, samples, ref):
    q = QuantLinear(lin, **recipe_kw)
    return (q(samples) - ref).pow(2).mean().item()


@torch.no_grad()
def search_alpha(lin, absmax, x, wq, aq):
    """DiTAS's per-layer search of the smoothing factor on calibration inputs x -> (layer MSE, α,
    s): α on a 21-point grid in [0, 1], or None when not smoothing at all (s = 1) is best."""
    ref = lin(x)
    wq_lin = quant.fake_quant(lin.weight.detach(), wq) if wq else lin.weight.detach()
    # exercise ditas_alpha: grid-search α in [0, 1] (21 points) and "no smoothing" for the lowest layer MSE
    best = None
    # None: s = 1, so DiTAS can fall back to RTN
    for a in [None] + torch.linspace(0, 1, 21).tolist():
        s = torch.ones_like(wq_lin[0]) if a is None else smooth_scale(absmax, wq_lin, a)
        err = layer_mse(lin, dict(wq=wq, aq=aq, channel_scale=s), x, ref)
        if best is None or err < best[0]:
            best = (err, a, s)
    # end exercise ditas_alpha
    return best


def lora_correct(q, rank, iters):
    """Training-free weight LoRA: alternate Q = quant(W̃ − L), L = rank-r SVD of (W̃ − Q).
    Scales stay those of W̃, so both half-steps are exact minimisers and the error
    ‖W̃ − Q − L‖ (returned per iteration) never increases."""
    W = q.weight.detach().clone()
    L = torch.zeros_like(W)
    errs = []
    # exercise lowrank: DiTAS: alternate Q = quant(W̃ − L) and L = best rank-r approximation of W̃ − Q
    for _ in range(iters):
        q.weight.data = W - L
        Q = q.qweight()  # nearest levels of W̃ − L on the fixed grid
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        L = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        errs.append((W - Q - L).norm().item())
    # end exercise lowrank
    q.set_lora(U[:, :rank] * S[:rank], Vh[:rank])  # weight stays W̃ − L_prev, whose levels are Q
    return errs


def fold_ditas(model, scales):
    """Folds x / s into the producer where exact: adaLN shift/scale rows (qkv, fc1), V rows (proj).
    Afterwards those layers receive pre-scaled inputs; fc2 (after GELU) must divide online."""
    for i, blk in enumerate(model.blocks):
        D = blk.attn.qkv.in_features
        # rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        ada = blk.adaLN_modulation[1]
        for name, (sh, sc) in ((f"blocks.{i}.attn.qkv", (0, 1)), (f"blocks.{i}.mlp.fc1", (3, 4))):
            s = scales[name]
            rs, rc = slice(sh * D, (sh + 1) * D), slice(sc * D, (sc + 1) * D)
            # modulate: n (1 + scale) + shift;  divided by s: n (1 + scale') + shift' with
            # shift' = shift / s and 1 + scale' = (1 + scale) / s  ->  scale' = scale / s + 1 / s - 1
            ada.weight.data[rs] /= s[:, None]
            ada.bias.data[rs] /= s
            ada.weight.data[rc] /= s[:, None]
            ada.bias.data[rc] = ada.bias.data[rc] / s + 1 / s - 1
        # attention output channel j is a mix of V channel j only
        s = scales[f"blocks.{i}.attn.proj"]
        blk.attn.qkv.weight.data[2 * D:] /= s[:, None]
        blk.attn.qkv.bias.data[2 * D:] /= s


def lowrank_branch(q, rank, W=None, target=None):
    """SVDQuant: the best rank-r part L = U S Vᵀ of the (smoothed, transformed) weight W̃ runs in
    float as the low-rank branch, and only the residual W̃ − L is quantized, with its own, narrower
    scales. `target` (default W̃) is what L fits: W̃ − Q when `refine_branch` iterates. Returns
    (share of W̃'s energy ‖L‖² / ‖W̃‖², max|W̃ − L| / max|W̃|): how much of the weight, and of
    its outliers, the branch takes."""
    W = q.weight.detach().clone() if W is None else W
    U, S, Vh = torch.linalg.svd(W if target is None else target, full_matrices=False)
    # exercise lowrank: SVDQuant: W̃'s best rank-r part L runs in float, only the residual W̃ − L is quantized
    L = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    q.weight.data = W - L
    q.refresh_weight_quant()  # the residual's own per-channel scales
    q.set_lora(U[:, :rank] * S[:rank], Vh[:rank])
    # end exercise lowrank
    return (L.pow(2).sum() / W.pow(2).sum()).item(), ((W - L).abs().max() / W.abs().max()).item()


@torch.no_grad()
def refine_branch(q, rank, iters, x):
    """SVDQuant's code refines the branch: L = best rank-r part of W̃ − Q, Q = quant(W̃ − L) with
    the residual's own scales, repeated; the round whose layer output on calibration inputs x
    (activations quantized) is closest to the float layer's is kept (round 1: `lowrank_branch`).
    -> (the kept round's `lowrank_branch` trace, the output MSE of every round)."""
    W = q.weight.detach().clone()
    q.quantize_enabled = False
    ref = q(x)  # the float layer: every transform is exact
    q.quantize_enabled = True
    target, errs, best = W, [], None
    for _ in range(iters):
        trace = lowrank_branch(q, rank, W, target)
        errs.append((q(x) - ref).pow(2).mean().item())
        if best is None or errs[-1] < best[0]:
            best = (errs[-1], trace, {k: v.clone() for k, v in q.state_dict().items()})
        target = W - q.qweight()  # what the 4-bit residual missed, for the next branch to take
    q.load_state_dict(best[2])
    return best[1], errs


@torch.no_grad()
def search_branch_alpha(lin, spec, act_max, x, wq, aq, rank, block=None):
    """SVDQuant's per-layer smoothing exponent: α on an 11-point grid in [0, 1], each scored by
    the layer's output MSE on calibration inputs x with its transform, branch and quantizers in
    place. -> (MSE, α, s)."""
    ref, best = lin(x), None
    for a in torch.linspace(0, 1, 11).tolist():
        s = smooth_scale(act_max, lin.weight, a)
        q = QuantLinear(lin, wq, aq, spec["center"], s, spec["hadamard"], block)
        if rank:
            lowrank_branch(q, rank)
        err = (q(x) - ref).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, a, s)
    return best


@torch.no_grad()
def choose_a8_layers(model, recipe, states, budget, cfg_scale=4.0):
    """Mixed precision by sensitivity: each layer's score is how much the guided ε error (against
    the FP model, on its own trajectory states) falls when that layer alone gets 8-bit activations,
    each state's error relative to the all-4-bit model's there; layers are kept at A8 by score per
    MAC, greedily, while their MACs stay within `budget` of all linear MACs."""
    # important! t = 0 out: its ε is 1% of x_t and barely used by the sampler, yet its error is
    # 100-1000x the others' and would decide every choice
    states = [(x, t, y) for x, t, y in states if bool((t > 0).all())]
    q_model = copy.deepcopy(model)
    apply_recipe(q_model, dataclasses.replace(recipe, layer_abits={}))
    layers = [(n, q) for n, _, _, q in quant.quant_layers(q_model)]

    refs = [guided(model, y, cfg_scale)(x, t) for x, t, y in states]  # the FP model's, once
    errs = lambda: torch.tensor([(guided(q_model, y, cfg_scale)(x, t) - ref).pow(2).mean().item()
                                 for (x, t, y), ref in zip(states, refs)])
    base, scores = errs(), {}
    for name, q in layers:
        aq = q.aq
        q.aq = dataclasses.replace(aq, bits=8)
        # the share of the error this layer's 4-bit activations cost, averaged over states
        scores[name] = ((base - errs()) / base).mean().item() if states else 0.0
        q.aq = aq
    macs = {n: q.in_features * q.out_features for n, q in layers}
    chosen, used = {}, 0
    for name in sorted(scores, key=lambda n: -scores[n] / macs[n]):
        if scores[name] > 0 and used + macs[name] <= budget * sum(macs.values()):
            chosen[name], used = 8, used + macs[name]
    return chosen


@torch.no_grad()
def calibrate_static(model, n=8, steps=25, cfg_scale=1.5, seed=1234):
    """Static activation scales: run the sampler with quantization off and record max|x̃| per
    timestep bucket at every QuantLinear (after its transform); scale = max / qmax."""
    qs = [m for m in model.modules() if isinstance(m, QuantLinear) and m.a_scale is not None]
    amax = {q: torch.zeros_like(q.a_scale) for q in qs}

    def observe(q, inp):  # a pre-hook: max|x̃| of each sample into its timestep bucket
        xt = q.transform_input(inp[0])[0]
        b = q.t_bucket if q.t_bucket is not None else torch.zeros(xt.shape[0], dtype=torch.long)
        amax[q].scatter_reduce_(0, b.to(xt.device), xt.abs().flatten(1).amax(1), reduce="amax")
    hooks = [q.register_forward_pre_hook(observe) for q in qs]
    for q in qs:
        q.quantize_enabled = False
    device = next(model.parameters()).device
    labels = class_labels(n, list(range(model.num_classes))).to(device)
    Diffusion.make(steps=steps).sample(guided(model, labels, cfg_scale), make_noise(n, model, seed)
                                       .to(device), clip=model.in_channels != 4)
    for h in hooks:
        h.remove()
    for q in qs:
        filled = torch.where(amax[q] > 0, amax[q], amax[q].max())  # buckets no step hit
        q.a_scale.copy_(filled.clamp(min=1e-8) / quant.levels(q.aq)[1])
        q.quantize_enabled = True


def parse_method(name):
    """'hadanorm' -> ('hadanorm', None); 'hadanorm+a8' -> ('hadanorm', 0.1), the share of linear
    MACs at A8; 'hadanorm+a8:0.2' -> ('hadanorm', 0.2). A clear error for an unknown recipe."""
    base, a8, budget = name.partition(A8_SUFFIX)
    try:  # -1: not a valid share
        share = None if not a8 else A8_BUDGET if not budget else \
            float(budget[1:]) if budget.startswith(":") else -1
    except ValueError:
        share = -1
    if base not in METHODS or (share is not None and not 0 < share <= 1):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}, each optionally + {A8_SUFFIX!r} or {A8_SUFFIX + ':SHARE'!r} (0 < SHARE <= 1)")
    return base, share


def check_options(method, alpha, lowrank_iters=1, static_buckets=0):
    """Refuses what `build_recipe` cannot do, before any calibration runs."""
    parse_method(method)  # an unknown recipe
    if alpha == "search" and METHOD_TABLE[parse_method(method)[0]]["scale"] not in ("absmax", "cabsmax"):
        raise ValueError(f"alpha='search' needs a recipe with SmoothQuant scales, not {method!r} (DiTAS searches its own)")
    if (alpha == "search" or lowrank_iters > 1) and static_buckets:
        raise ValueError("the α search and the branch refinement score layers with dynamic activations: not with static activation scales")


@torch.no_grad()
def build_recipe(model, stats, method, wbits, abits, alpha=0.5, lora_rank=32, lora_iters=10, lowrank=32,
                 block=None, static_buckets=0, lowrank_iters=1):
    """-> the `quant.Recipe` of `method` for `model`, from its calibration statistics (the model
    is left as it is: `apply_recipe` changes it). alpha="search": each layer's own smoothing
    exponent (`search_branch_alpha`) for the SmoothQuant-scaled recipes."""
    check_options(method, alpha, lowrank_iters, static_buckets)
    base, a8_budget = parse_method(method)
    wq = QConfig(wbits, range="mse") if wbits < 16 else None
    if abits >= 16:
        aq = None
    elif static_buckets:  # calibrated per-timestep-bucket scales instead of per-token dynamic ones
        aq = QConfig(abits, granularity="tensor", dynamic=False, buckets=static_buckets)
    else:
        aq = QConfig(abits)
    lins = {name: lin for name, _, _, lin in quant.quant_layers(model)}
    scales = lambda key: {n: smooth_scale(stats[n][key], lins[n].weight, alpha) for n in lins}
    spec = METHOD_TABLE[base]
    r = dict(method=method, wq=wq, aq=aq, block=block, alpha=alpha, hadamard=spec["hadamard"],
             center=spec["center"])
    if alpha == "search":
        r.update(scales={}, alphas={})
        for n, lin in tqdm(lins.items(), desc="α search", leave=False, disable=None):
            best = search_branch_alpha(lin, spec, stats[n][spec["scale"]], stats[n]["samples"].to(
                lin.weight.device), wq, aq, lowrank if spec["lowrank"] else 0, block)
            r["alphas"][n], r["scales"][n] = best[1], best[2]
    elif spec["scale"] in ("absmax", "cabsmax"):  # cabsmax: of the centred input
        r["scales"] = scales(spec["scale"])
    if spec["center"] == "static":
        r["means"] = {n: stats[n]["mean"] for n in lins}
    if spec["lowrank"]:
        r.update(lowrank=lowrank, lowrank_iters=lowrank_iters)
    if spec["scale"] == "search":  # DiTAS
        r.update(scales={}, alphas={}, prescaled=[n for n in lins if not n.endswith("fc2")],
                 lora_rank=lora_rank, lora_iters=lora_iters)
        for n, lin in tqdm(lins.items(), desc="DiTAS α search", leave=False, disable=None):
            best = search_alpha(lin, stats[n]["absmax"], stats[n]["samples"].to(lin.weight.device),
                                wq, aq)
            r["alphas"][n], r["scales"][n] = best[1], best[2]
    recipe = quant.Recipe(**r)
    if a8_budget:
        # every class once, on a seed of its own (not the calibration's)
        a8 = choose_a8_layers(model, recipe, sample_states(model, n=10, seed=4321), a8_budget)
        recipe = dataclasses.replace(recipe, layer_abits=a8)
    return recipe


@torch.no_grad()
def apply_recipe(model, recipe, stats=None):
    """Quantizes `model` in place by `recipe`: DiTAS's fold of x / s into the producing layers,
    `quant.quantize_model`, then the low-rank parts (DiTAS's LoRA, SVDQuant's branch, refined on
    the calibration inputs in `stats` when recipe.lowrank_iters > 1). Returns their traces per
    layer (LoRA: error per alternation; SVDQuant: energy share and peak)."""
    if recipe.lowrank and recipe.lowrank_iters > 1 and stats is None:
        raise ValueError("refining the SVDQuant branch (lowrank_iters > 1) needs the calibration statistics")
    if recipe.prescaled:
        fold_ditas(model, recipe.scales)
    quant.quantize_model(model, recipe)
    traces = {}
    for name, _, _, q in quant.quant_layers(model):
        if recipe.lora_rank and q.wq is not None:
            traces[name] = lora_correct(q, recipe.lora_rank, recipe.lora_iters)
        if recipe.lowrank and q.wq is not None and recipe.lowrank_iters > 1:
            x = stats[name]["samples"].to(q.weight.device)
            traces[name] = refine_branch(q, recipe.lowrank, recipe.lowrank_iters, x)[0]
        elif recipe.lowrank and q.wq is not None:
            traces[name] = lowrank_branch(q, recipe.lowrank)
    return traces


#################################################################################
#                                 Reporting                                     #
#################################################################################

@torch.no_grad()
def layer_report(fp_model, q_model, stats):
    """Per layer: SQNR of the quantized activations (raw vs transformed) and of the layer output."""
    fp = {n: lin for n, _, _, lin in quant.quant_layers(fp_model)}
    rows = []
    for name, _, _, q in quant.quant_layers(q_model):
        x = stats[name]["samples"].to(q.bias.device if q.bias is not None else "cpu")
        if q.a_scale is not None:  # static scales: each stored input's own timestep bucket
            q.t_bucket = (stats[name]["samples_t"] * q.aq.buckets // 1000).clamp(max=q.aq.buckets - 1)
        ref = fp[name](x)
        proj = q_model.get_submodule(name.replace("qkv", "proj"))
        if name.endswith("qkv") and proj.input_prescaled:  # DiTAS folded proj's 1/s into V rows
            ref[..., 2 * x.shape[-1]:] /= proj.channel_scale  # compare like with like
        xin = x / q.channel_scale if q.input_prescaled else x
        xt, _ = q.transform_input(xin)
        a_raw = quant.sqnr(x, quant.fake_quant(x, q.aq)) if q.aq else float("inf")
        a_t = quant.sqnr(xt, quant.fake_quant(xt, q.aq)) if q.aq else float("inf")
        rows.append((name, a_raw, a_t, quant.sqnr(ref, q(xin))))
    return rows


def plot_ranges(model, stats, path, block=None, alpha=0.5):
    """PNG: per-channel range (min..max, grey bars) and a value histogram (log counts) of one fc1
    and one fc2 input of a middle block: raw, after SmoothQuant, after Hadamard, after HadaNorm."""
    from PIL import Image, ImageDraw, ImageFont
    block = len(model.blocks) // 2 if block is None else block
    lins = {n: lin for n, _, _, lin in quant.quant_layers(model)}
    names = [f"blocks.{block}.mlp.fc1", f"blocks.{block}.mlp.fc2"]
    rot = {"hadamard": "double"}
    cols = [("raw", {}, None), ("SmoothQuant", {}, "absmax"), ("Hadamard", rot, None),
            ("HadaNorm", dict(rot, center="dynamic"), "cabsmax")]
    W, H, pad = 300, 240, 28
    img = Image.new("RGB", (pad + len(cols) * (W + pad), pad + len(names) * (H + pad) + 10), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    for r, name in enumerate(names):
        x = stats[name]["samples"]  # (B, T, K)
        for c, (title, kw, key) in enumerate(cols):
            s = key and smooth_scale(stats[name][key], lins[name].weight, alpha)
            xt, _ = QuantLinear(lins[name], channel_scale=s, **kw).transform_input(x)
            xt = xt.reshape(-1, xt.shape[-1])  # (rows, K)
            x0, y0 = pad + c * (W + pad), pad + r * (H + pad)
            lim = xt.abs().max().item()
            top, bot = H * 0.6, H * 0.35  # range panel, histogram panel
            d.rectangle([x0, y0, x0 + W, y0 + H], outline="black")
            d.text((x0 + 4, y0 - 14), f"{name.split('.', 2)[2]} in, {title}: max|x| {lim:.1f}", fill="black", font=font)
            lo, hi, K = xt.amin(0), xt.amax(0), xt.shape[1]
            for k in range(K):  # one vertical bar per channel, min..max
                px = x0 + 1 + k * (W - 2) / K
                ya, yb = y0 + top / 2 * (1 - hi[k].item() / lim), y0 + top / 2 * (1 - lo[k].item() / lim)
                d.line([px, ya, px, yb], fill=(90, 90, 90))
            d.line([x0, y0 + top / 2, x0 + W, y0 + top / 2], fill="red")
            hist = torch.histc(xt, bins=60, min=-lim, max=lim).clamp(min=1).log()
            for i, v in enumerate(hist.tolist()):
                bx = x0 + i * W / 60
                d.rectangle([bx, y0 + H - bot * v / hist.max().item(), bx + W / 60 - 1, y0 + H],
                            fill=(40, 90, 160))
    d.text((pad, img.height - 16), "grey: per-channel min..max (channel index ->), blue: histogram of all values (log count); scale = each panel's own max|x|", fill="black", font=font)
    common.save_image(img, path)


def quantize_fp(model, method, wbits, abits, calib_n=16, calib_steps=25, seed=1234, stats=None,
                **kw):
    """FP model -> quantized model (in place), the whole data-free pipeline: statistics (unless
    given), recipe, quantization, static scales if the recipe has them. -> (recipe, traces)."""
    stats = collect_stats(model, calib_n, calib_steps, seed=seed) if stats is None else stats
    recipe = build_recipe(model, stats, method, wbits, abits, **kw)
    traces = apply_recipe(model, recipe, stats)
    if recipe.aq is not None and not recipe.aq.dynamic:
        calibrate_static(model, calib_n, calib_steps, seed=seed)
    return recipe, traces


def alpha_arg(text):
    """--alpha: a number in [0, 1] or 'search'."""
    return text if text == "search" else common.number(float, 0, 1)(text)


def main(argv=None):
    ap = common.Parser(description="Calibrate (data-free) and quantize the DiT with one PTQ recipe.")
    ap.add_argument("--ckpt", default=dit.DEFAULT_CKPT)
    ap.add_argument("--method", default="hadanorm", help=f"one of {', '.join(METHODS)}")
    ap.add_argument("--wbits", type=int, default=4)  # 2..8, or 16 = float
    ap.add_argument("--abits", type=int, default=4)
    ap.add_argument("--alpha", type=alpha_arg, default=0.5,
                    help="smoothing exponent in [0, 1] (smoothquant, hadanorm, svdquant*), or 'search': each layer's own by its output error")
    ap.add_argument("--lora-rank", type=common.number(int, 0), default=32,
                    help="rank of DiTAS's weight LoRA (0 = off)")
    ap.add_argument("--lora-iters", type=common.POSITIVE, default=10,
                    help="DiTAS's alternations of quantize / refit the LoRA")
    ap.add_argument("--lowrank", type=common.number(int, 0), default=32,
                    help="rank of SVDQuant's float branch (svdquant, svdquant-hadanorm; 0 = off)")
    ap.add_argument("--lowrank-iters", type=common.POSITIVE, default=1,
                    help="SVDQuant: rounds of branch refinement, the best by layer output error kept (1 = plain SVD)")
    ap.add_argument("--static-act", type=common.number(int, 0), default=0, metavar="BUCKETS",
                    help="static activation scales per timestep bucket (0: dynamic per token)")
    ap.add_argument("--calib-n", type=common.POSITIVE, default=16, help="images for calibration")
    ap.add_argument("--calib-steps", type=common.number(int, 1, 1000), default=25)
    ap.add_argument("--seed", type=common.number(int, 0), default=1234)
    ap.add_argument("--out", default=None, help="write the quantized checkpoint here")
    ap.add_argument("--plot", default=None, help="write the activation-range PNG here and stop")
    ap.add_argument("--force", action="store_true", help="let --out replace a shipped checkpoint")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    if bad := sorted({args.wbits, args.abits} - {2, 3, 4, 5, 6, 7, 8, 16}):
        raise ValueError(f"unsupported bit width {bad[0]}: choose 2..8 (or 16 = float)")
    check_options(args.method, args.alpha, args.lowrank_iters, args.static_act)  # now, not after calibrating
    common.check_output(args.out, (args.ckpt,), "--out", args.force)
    common.check_output(args.plot, (args.ckpt,), "--plot", args.force)
    t0 = time.time()
    device = common.check_device(args.device)
    model, cfg = dit.load_checkpoint(args.ckpt)  # refuses an already-quantized checkpoint
    model, fp = model.to(device), dit.load_checkpoint(args.ckpt)[0].to(device)
    stats = collect_stats(model, args.calib_n, args.calib_steps, seed=args.seed)
    if args.plot:
        plot_ranges(model, stats, args.plot, alpha=0.5 if args.alpha == "search" else args.alpha)
        return print(f"wrote {args.plot}")
    recipe, traces = quantize_fp(model, args.method, args.wbits, args.abits, args.calib_n,
                                 args.calib_steps, args.seed, stats, alpha=args.alpha,
                                 lora_rank=args.lora_rank, lora_iters=args.lora_iters,
                                 lowrank=args.lowrank, static_buckets=args.static_act,
                                 lowrank_iters=args.lowrank_iters)
    dt = time.time() - t0
    print(f"{'layer':22s} {'act SQNR raw':>12s} {'act SQNR transf.':>16s} {'out SQNR':>9s}  (dB)")
    for name, a, b, o in layer_report(fp, model, stats):
        print(f"{name:22s} {a:12.2f} {b:16.2f} {o:9.2f}")
    print(f"{args.method} W{args.wbits}A{args.abits}: calibrated in {dt:.1f} s ({args.calib_n} images x {args.calib_steps} steps)")
    if recipe.lowrank and traces:  # SVDQuant: how much of the weight (and its peaks) it takes
        share, peak = zip(*traces.values())
        print(f"rank-{recipe.lowrank} branch: {100 * min(share):.0f}-{100 * max(share):.0f}% of each W̃'s energy (mean {100 * sum(share) / len(share):.0f}%); it lowers max|W̃| to {min(peak):.2f}-{max(peak):.2f}× for the 4-bit residual")
    if recipe.layer_abits:  # mixed precision: which layers the budget kept at A8
        macs = {n: lin.in_features * lin.out_features for n, _, _, lin in quant.quant_layers(model)}
        a8 = sorted(recipe.layer_abits, key=list(macs).index)
        share = sum(macs[n] for n in a8) / sum(macs.values())
        print(f"A8 layers: {len(a8)} of {len(macs)}, {100 * share:.1f}% of the linear MACs: {', '.join(a8)}")
    if args.out:
        integer.save_quantized(args.out, model, cfg, recipe, vars(args))
        print(f"saved {args.out}")


if __name__ == "__main__":
    common.run_cli(main)
