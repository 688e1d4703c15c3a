"""The integer path: `IntLinear`, the packed-int4 layer that sampling runs, all in torch.

    x̃, μ̃ = transform(x)                       centre, scale, Hadamard: quant.transform_input, the
                                                simulation's own function
    q = round(x̃ / s_tok)                       per-token int8 codes (int4 values)
    y = _int_mm(q, W_int) ⊙ (s_tok ⊗ s_ch) + μ̃ Q(W̃)ᵀ + bias + x V_rawᵀ Uᵀ (low-rank branch)

The product of the codes is exact: torch._int_mm (int8 x int8 -> int32; oneDNN on the CPU). On a
VNNI or AMX CPU oneDNN's u8 x s8 int8 linear measured as fast at all but one layer shape (qkv:
1.46x). On an x86 CPU without them (torch's capability AVX2) torch._int_mm is a reference loop,
27x slower than that linear at the tiny model's qkv, so there the layer runs the u8 x s8 linear
on codes + 128 (zero point 128) wherever its float32 result holds the integer sum exactly
(4-bit weights; `gemm_for`; docs/speed.md).
Weights are stored packed (two int4 per byte, quant.py) and unpacked once, when a model is loaded,
into the int8 (K, N) operand _int_mm wants; no float copy of a quantized weight is kept. The
quantize / dequantize steps around the GEMM are plain torch, which torch.compile fuses (sample.py
compiles the DiT block once for all blocks).

    python integer.py        # one layer of the shipped model, simulated vs integer: codes, outputs, bytes, time
"""
import os
import time

import torch
import torch.nn as nn

import common
import dit
import hadamard
import quant


#################################################################################
#                                  IntLinear                                     #
#################################################################################

class IntLinear(nn.Module):
    """A linear layer on integers: int4 (packed) or int8 weight codes, per-token int8 activation
    codes, the exact int8 x int8 -> int32 product of torch._int_mm, float scales."""
    def __init__(self, in_features, out_features, w_bits=4, a_bits=4, center="none",
                 hadamard="none", block=None, rank=0, bias=True, channel_scale=False, signs=False,
                 clip_buckets=0, static_buckets=0):
        super().__init__()
        if hadamard == "single" and a_bits > 4:
            raise ValueError("the integer form of HQ-DM's single Hadamard needs activations of at most 4 bits (16 q must fit int8); run it with --simulate")
        self.in_features, self.out_features, self.w_bits, self.a_bits = in_features, out_features, w_bits, a_bits
        self.center, self.hadamard, self.block = center, hadamard, block
        K, N = in_features, out_features
        for name, shape, dtype, on in [
                ("w_int", (N, K // 2 if w_bits <= 4 else K), torch.uint8 if w_bits <= 4 else torch.int8, True),
                ("w_scale", (N, 1), None, True),  # each output channel's weight step
                ("bias", (N,), None, bias),
                ("channel_scale", (K,), None, channel_scale),  # s (x / s; W diag(s) is in w_int)
                ("signs", (K,), None, signs),  # random ±1 before the Hadamard
                ("mu_static", (K,), None, center == "static"),
                ("a_clip", (clip_buckets,), None, clip_buckets > 0),  # QAT: ratio per t bucket
                ("a_scale", (static_buckets,), None, static_buckets > 0),  # static step per bucket
                ("lora_u", (N, rank), None, rank > 0), ("lora_v", (rank, K), None, rank > 0)]:
            self.register_buffer(name, torch.zeros(shape, dtype=dtype) if on else None)
        self.buckets = max(clip_buckets, static_buckets, 1)  # of the timesteps 0..999
        self.t_bucket = None  # (S,) timestep bucket of each sample, set by the model's hook
        self.cfg_pair, self.cfg_delta = False, quant.cfg_delta_default()  # CFG: quant.pair_codes
        self.register_load_state_dict_post_hook(lambda module, _: module.prepare())
        self.prepare()

    @torch.no_grad()
    def prepare(self):
        """The run-time operands, made from the stored state at build and after each load: the
        weight codes unpacked once into _int_mm's (K, N) operand; the branch moved onto the raw x."""
        b = self.block or self.in_features
        codes = quant.unpack_int4(self.w_int) if self.w_bits <= 4 else self.w_int  # (N, K) int8
        step = self.w_scale.reshape(-1).float()  # (N,)
        if self.hadamard == "single":  # HQ-DM: the codes of x Hᵀ meet the unrotated weight
            codes, step = hqdm_operand(codes, b, self.signs), step / b ** 0.5
        hk, hm = hadamard.kron_factors(b) if self.hadamard != "none" else (None, None)
        v = None if self.lora_v is None else raw_input_branch(self)  # (r, K)
        for name, t in [("w_t", codes.t()), ("w_step", step), ("hk", hk), ("hm", hm),  # (K', N)
                        ("lora_vt", v if v is None else v.t()),  # (K, r)
                        ("lora_ut", v if v is None else self.lora_u.t())]:  # (r, N)
            self.register_buffer(name, None if t is None else t.contiguous(), persistent=False)
        self.gemm, self.onednn = gemm_for(self.w_t, self.a_bits, self.hadamard == "single"), None

    def __getstate__(self):  # copies and pickles leave the prepacked oneDNN weight (a cache) out
        return dict(self.__dict__, onednn=None)

    def codes(self, xt, step):
        """x̃ (..., K) and its steps -> int8 codes (M, K')."""
        qmax = 2 ** (self.a_bits - 1) - 1
        # exercise act_codes: the activation codes clamp(round(x̃ / step)) on the signed levels of a_bits, as int8
        q = torch.clamp(torch.round(xt / step), -qmax - 1, qmax).to(torch.int8)
        # end exercise act_codes
        return self.widen(q.reshape(-1, self.in_features).contiguous())  # important! a strided operand slows _int_mm 5x

    def widen(self, v):
        """HQ-DM: [v, 16 v], against the weight's digits [d0, d1] (`hqdm_operand`); else v."""
        return torch.cat([v, 16 * v], dim=-1) if self.hadamard == "single" else v

    def forward(self, x):
        # (S, T, K): the transform runs in x's dtype (float32: exactly the simulation's codes;
        # bf16, where the float parts run in bf16: faster, codes within bf16 rounding)
        f = lambda t: None if t is None else t.to(x.dtype)
        xt, mu = quant.transform_input(x, self.center, f(self.mu_static), f(self.channel_scale),
                                       self.hk is not None, self.block, f(self.signs),
                                       (f(self.hk), f(self.hm)))
        xt = xt.float()  # (S, T, K)
        pair = quant.pair_codes(self)
        if pair:  # CFG: [x̃_c; x̃_u − x̃_c] coded, y_u = y_c + (x̃_u − x̃_c) W̃ᵀ below
            n = len(xt) // 2
            xt = torch.cat([xt[:n], xt[n:] - xt[:n]])
        st = quant.act_step(xt, self.a_bits, self.a_clip, self.a_scale, self.t_bucket)  # (S, T, 1)
        q = self.codes(xt, st)  # (M, K') int8
        if self.gemm == "onednn" and q.is_cpu:  # a CPU without VNNI/AMX (gemm_for)
            acc = onednn_int_mm(self, q)  # (M, N) float32 holding the exact integer sums
        else:
            # exercise int_matmul: the exact int8 x int8 -> int32 product q Wᵀ of the codes, with torch._int_mm
            acc = torch._int_mm(q, self.w_t)  # (M, N) int32
            # end exercise int_matmul
        y = acc.view(*x.shape[:-1], -1) * (st * self.w_step)  # (S, T, N): s_tok ⊗ s_ch
        if pair:
            y = torch.cat([y[:n], y[:n] + y[n:]])
        if mu is not None:  # HadaNorm: + μ̃ Q(W̃)ᵀ, against the codes (no float copy of W kept)
            y = y + (self.widen(mu.float()) @ self.w_t.float()) * self.w_step
        if self.bias is not None:
            y = y + self.bias
        if self.lora_vt is not None:  # the float low-rank branch, on the raw input
            y = y + (x @ f(self.lora_vt)) @ f(self.lora_ut)
        return y.to(x.dtype)

    def extra_repr(self):
        return f"{self.in_features}->{self.out_features}, W{self.w_bits}A{self.a_bits}, center={self.center}, hadamard={self.hadamard}"


# "auto": gemm_for decides; "int_mm" or "onednn" to force one. The tests pin "int_mm" (through
# DIT4BIT_GEMM, which their subprocesses inherit), so the exercise's _int_mm is what they grade on
# every CPU
GEMM = os.environ.get("DIT4BIT_GEMM", "auto")


def gemm_for(w_t, a_bits, widened):
    """The GEMM a layer runs on the CPU: "onednn" (u8 x s8 linear, float32 output) where torch's
    CPU capability is AVX2 or less (no VNNI/AMX: _int_mm is a reference loop there), if it is
    exact; else "int_mm". Exact: every sum below 2^24 (float32 holds it), and every pair of u8 x s8
    products below 2^15 (AVX2 adds them in saturating int16: 8-bit weights would overflow)."""
    qmax = 2 ** (a_bits - 1) * (16 if widened else 1)  # HQ-DM's operand is [q, 16 q]
    exact = (w_t.abs().sum(0).max().item() * qmax < 2 ** 24
             and 2 * (128 + qmax) * w_t.abs().max().item() < 2 ** 15)
    slow = torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")
    if GEMM not in ("auto", "int_mm", "onednn"):
        raise ValueError(f"DIT4BIT_GEMM={GEMM!r}: choose auto, int_mm or onednn")
    want = GEMM if GEMM != "auto" else ("onednn" if slow else "int_mm")
    ok = exact and hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()
    return "onednn" if want == "onednn" and ok else "int_mm"


@torch.compiler.disable  # important! the prepacked oneDNN weight is opaque to torch.compile
def onednn_int_mm(layer, q):
    """q Wᵀ by oneDNN's u8 x s8 int8 linear: codes + 128 with zero point 128 (oneDNN subtracts
    128 Σ w), output scale 1, so the float32 output is the integer sum. The weight is prepacked
    on first use."""
    if layer.onednn is None:
        n = layer.w_t.shape[1]
        layer.onednn = (torch.ops.onednn.qlinear_prepack(layer.w_t.t().contiguous(), None),
                        torch.ones(n), torch.zeros(n, dtype=torch.int64))
    packed, ones, zeros = layer.onednn
    qu = (q.to(torch.int16) + 128).to(torch.uint8)  # (M, K') u8
    return torch.ops.onednn.qlinear_pointwise(qu, 1.0, 128, packed, ones, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def raw_input_branch(layer):
    """The low-rank branch's V moved onto the raw input: x̃ Vᵀ on the transformed input (before
    quantization; centring left out, as the simulation's branch sees x̃ + μ̃) = x V_rawᵀ."""
    v = layer.lora_v
    if layer.hadamard == "double":
        v = hadamard.transform(v, inverse=True, block=layer.block, signs=layer.signs)
    return v if layer.channel_scale is None else v / layer.channel_scale


def hqdm_operand(codes, b, signs=None):
    """HQ-DM's integer weight: the codes q of x Hᵀ meet the unrotated W through the exact integer
    matrix R = W_int H_rawᵀ (H_raw = √b H, ±1 entries), which does not fit int8. Split as
    R = d0 + 16 d1 (d0 in [-8, 7]), one GEMM of width 2K, [q, 16 q] · [d0, d1]ᵀ, gives q Rᵀ in
    int8 operands. (N, K) codes -> (N, 2K) int8."""
    R = (hadamard.transform(codes.double(), block=b, signs=signs) * b ** 0.5).round().long()
    d0 = torch.remainder(R + 8, 16) - 8
    d1 = (R - d0) // 16
    if d1.abs().max() > 127:
        raise ValueError(f"a single-Hadamard block of {b} is too wide for the int8 split (|W_int H| > 2047): use a block of at most 128")
    return torch.cat([d0, d1], dim=1).to(torch.int8)


def from_quant(q):
    """A QuantLinear -> the IntLinear of the same layer: built from its shapes and filled with its
    state (weight codes packed, the weight's steps, transform, learned steps, branch)."""
    wq, aq = q.wq, q.aq
    if wq is None or aq is None or not (wq.symmetric and aq.symmetric) or wq.granularity != "row" \
            or (aq.dynamic and (aq.granularity != "row" or aq.range != "minmax")):
        raise ValueError("the integer path needs symmetric per-channel weights and symmetric activations: dynamic per-token min-max, or static per timestep bucket")
    scale = None if q.input_prescaled else q.channel_scale  # DiTAS: x / s is in the producer
    state = {"w_scale": q.w_scale, "bias": q.bias, "channel_scale": scale, "signs": q.signs,
             "mu_static": q.mu_static, "a_clip": q.a_clip, "a_scale": q.a_scale,
             "lora_u": q.lora_u, "lora_v": q.lora_v}
    state = {k: v.detach().float().clone() for k, v in state.items() if v is not None}
    codes = quant.quantize(q.weight.detach(), wq, (q.w_scale, q.w_zero))[0]  # (N, K) int8
    state["w_int"] = quant.pack_int4(codes) if wq.bits <= 4 else codes
    layer = IntLinear(q.in_features, q.out_features, wq.bits, aq.bits, q.center, q.hadamard,
                      q.block, 0 if q.lora_u is None else q.lora_u.shape[1], q.bias is not None,
                      scale is not None, q.signs is not None, *(len(state.get(k, ())) for k in
                                                                ("a_clip", "a_scale")))
    layer.t_bucket, layer.cfg_delta = q.t_bucket, q.cfg_delta
    layer.load_state_dict(state)
    return layer.to(q.weight.device)


def layer_for(recipe, name, linear):
    """The empty IntLinear that `recipe` makes of the model's layer `name` (a loaded file fills it)."""
    aq = recipe.aq
    bits = recipe.layer_abits.get(name, aq.bits)
    scaled = name in recipe.scales and name not in recipe.prescaled
    return IntLinear(linear.in_features, linear.out_features, recipe.wq.bits, bits, recipe.center,
                     recipe.hadamard, recipe.block, recipe.lora_rank or recipe.lowrank,
                     linear.bias is not None, scaled, recipe.signs_seed is not None,
                     aq.buckets if aq.clip else 0, 0 if aq.dynamic else aq.buckets)


def to_integer(obj):
    """A QuantLinear -> its IntLinear; a quantized model -> the same model with every QuantLinear
    replaced by its IntLinear (in place)."""
    if isinstance(obj, quant.QuantLinear):
        return from_quant(obj)
    for _, parent, attr, q in quant.quant_layers(obj):
        if isinstance(q, quant.QuantLinear):
            setattr(parent, attr, from_quant(q))
    quant.attach_timestep_hook(obj)
    return obj


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def save_quantized(path, model, cfg, recipe, calib):
    """A quantized checkpoint. Integer models store packed int4 (uint8) / int8 weight codes with
    fp32 scales; the layers kept in float are stored in fp16 (as the FP checkpoint)."""
    ser = dict(recipe.to_dict(), integer=any(isinstance(m, IntLinear) for m in model.modules()))
    qnames = {n for n, *_ in quant.quant_layers(model)}
    sd = {k: (v.half() if v.is_floating_point() and k.rsplit(".", 1)[0] not in qnames else v)
          for k, v in model.state_dict().items()}
    common.atomic_save({"config": dict(cfg), "recipe": ser, "calibration": calib, "model": sd},
                       path)


def load_quantized(path):
    """Rebuilds a quantized model saved by `save_quantized` (no calibration needed)."""
    ck = common.load_file(path, "quantized checkpoint")
    if not isinstance(ck, dict) or "recipe" not in ck or "model" not in ck or "config" not in ck:
        raise ValueError(f"{path} is not a quantized dit4bit checkpoint (needs config, recipe and model)")
    common.check_finite(ck["model"], path)
    cfg = dict(ck["config"])
    try:
        recipe = quant.Recipe.from_dict(ck["recipe"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its recipe is not valid: {e}") from None
    model = dit.build(cfg["model"], **{k: v for k, v in cfg.items() if k != "model"})
    if recipe.integer:  # built from the shapes the recipe gives; the file fills them
        for name, parent, attr, lin in quant.quant_layers(model):
            setattr(parent, attr, layer_for(recipe, name, lin))
        quant.attach_timestep_hook(model)
    else:  # calibrate.py's simulated form
        quant.quantize_model(model, recipe)
        for name, _, _, q in quant.quant_layers(model):
            r = recipe.lora_rank or recipe.lowrank
            if r and q.wq is not None:
                q.set_lora(torch.zeros(q.out_features, r), torch.zeros(r, q.in_features))
    own = model.state_dict()
    sd = dict(ck["model"])
    for k, v in own.items():  # a corrupted packed tensor fails here, not in a matmul
        if k in sd and (sd[k].dtype in (torch.uint8, torch.int8) or v.dtype in (torch.uint8, torch.int8)) \
                and (sd[k].dtype != v.dtype or sd[k].shape != v.shape):
            raise ValueError(f"{path}: {k} is {sd[k].dtype} {tuple(sd[k].shape)}, expected {v.dtype} {tuple(v.shape)}")
    dit.load_state_dict_checked(model, sd, path)  # IntLinear re-derives its GEMM operands on load
    return model.eval(), cfg, recipe


#################################################################################
#                                    Lesson                                      #
#################################################################################

def main():
    ap = common.Parser(description="Lesson: one W4A4 HadaNorm layer of the shipped model, simulated and on integers.")
    ap.add_argument("--layer", default="blocks.3.mlp.fc1", help="which quantized layer")
    ap.add_argument("--n", type=int, default=8, help="images sampled to collect its real inputs")
    args = ap.parse_args()
    if args.n < 1:
        raise ValueError("--n must be positive")
    name = args.layer.split(".", 2)
    if len(name) != 3 or name[2] not in quant.QUANT_LAYERS or not name[1].isdigit():
        raise ValueError(f"--layer takes blocks.I.{{{','.join(quant.QUANT_LAYERS)}}}, got {args.layer!r}")
    # (1, tokens, K): real inputs
    x = quant.lesson_activations(args.n, 10, int(name[1]))[name[2]].unsqueeze(0)
    lin = dit.load_checkpoint(dit.DEFAULT_CKPT)[0].get_submodule(args.layer)
    sim = quant.QuantLinear(lin, quant.QConfig(4, range="mse"), quant.QConfig(4), center="dynamic",
                            hadamard="double")
    x = x[:, : x.shape[1] // 64 * 64].reshape(-1, 64, lin.in_features)  # samples of 64 tokens
    with torch.no_grad():
        y_sim = sim(x)
        iq = to_integer(sim)
        y_int = iq(x)
        xt, _ = sim.transform_input(x)
        codes_sim = quant.quantize(xt.reshape(-1, lin.in_features), sim.aq)[0]
        codes_int = iq.codes(xt, quant.act_step(xt, 4))
    N, K = lin.weight.shape
    print(f"{args.layer} ({K} -> {N}), W4A4 HadaNorm, on {x.shape[0] * 64} real input tokens of {dit.DEFAULT_CKPT}:")
    print(f"  activation codes equal to the simulation's: {100 * (codes_int == codes_sim).float().mean():.2f}%")
    rel = ((y_int - y_sim).abs().max() / y_sim.abs().max()).item()
    print(f"  output, max |integer - simulated| / max |simulated|: {rel:.1e} (float rounding)")
    print(f"  weight bytes: fp32 {4 * N * K:,d}; stored packed {iq.w_int.numel() + 4 * N:,d} ({4 * N * K / (iq.w_int.numel() + 4 * N):.1f}x smaller); resident int8 codes {iq.w_t.numel():,d}")
    # the real batch of `python sample.py`: 80 images x 2 (CFG) x 64 tokens
    xb = torch.randn(10240 // 64, 64, K)
    lin16 = nn.Linear(K, N).bfloat16()
    for label, f, v in (("fp32 F.linear", lin, xb), ("bf16 F.linear", lin16, xb.bfloat16()),
                        ("integer layer", iq, xb)):
        c = torch.compile(f)  # as sample.py runs them (the quantize / dequantize steps fused)
        with torch.no_grad():
            c(v)
            t0 = time.perf_counter()
            for _ in range(10):
                c(v)
        print(f"  {label:14s} on (10240, {K}), compiled: {1e2 * (time.perf_counter() - t0):6.2f} ms")


if __name__ == "__main__":
    common.run_cli(main)
