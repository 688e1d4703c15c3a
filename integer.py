"""The integer path: `IntLinear`, the packed-int4 layer that sampling runs, and the int8 GEMM under
it.

    codes = quantize(transform(x))      one fused pass per token row (kernels.py)
    y = (codes · R_codesᵀ) ⊙ (s_tok ⊗ s_ch) + bias + mean term + low-rank branch

The product of the codes is an exact integer GEMM whichever backend runs it: `torch._int_mm`
(oneDNN's int8 x int8 -> int32) or oneDNN's int8 linear (`torch.ops.onednn.qlinear_pointwise`,
prepacked weights, AMX where the CPU has it); the faster is chosen by timing both on each layer
shape, once per process. Weights are stored packed (two int4 per byte, quant.py) and unpacked once,
when a model is loaded, into the int8 operand the GEMM wants; no float copy of a quantized weight is
kept. `IntMlp` runs an MLP's fc1 -> GELU -> fc2 with the float activation between them never written
to memory.

    python integer.py        # one layer of the shipped model, simulated vs integer: codes, outputs, bytes, time
"""
import os
import statistics
import time

import torch
import torch.nn as nn

import common
import dit
import hadamard
import kernels
import quant



#################################################################################
#                                 Integer GEMM                                   #
#################################################################################

GEMMS = ("int_mm", "onednn")
_CHOSEN = {}  # (K, N) -> the backend measured fastest at that shape, in this process


def prepare_weight(w, backend):
    """int8 weight codes (N, K) -> the operand the backend wants (made once, at load)."""
    if backend == "int_mm":
        # (K, N) view: oneDNN reads the (N, K) rows as a transposed operand, at full speed
        return w.t()
    if backend == "onednn":
        return torch.ops.onednn.qlinear_prepack(w, None)  # blocked layout, AMX / VNNI tiles
    raise ValueError(f"unknown GEMM backend {backend!r}: choose one of {', '.join(GEMMS)}")


def int_gemm(q, w, backend, n):
    """Codes (M, K) x prepared weight -> the exact integer product (M, n): int32 from _int_mm,
    float32 from oneDNN (whose unsigned activations q + 128 with zero point 128 give the same sums;
    exact
    while |sums| < 2^24, which `IntLinear` checks before it picks it)."""
    if backend == "int_mm":
        # exercise int_matmul: the exact int8 x int8 -> int32 product of the codes, with torch._int_mm
        return torch._int_mm(q, w)
        # end exercise int_matmul
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, w, ones, zeros, None, 1.0, 0,
                                              torch.float32, "none", [], "")


def choose_gemm(k, n, m=8192, repeats=7):
    """The faster exact backend for (m, k) x (k, n), timed once per shape and process, the two
    backends taking turns (both give the same integers, so the choice changes speed, never
    results)."""
    if (k, n) not in _CHOSEN:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        q = torch.randint(-8, 8, (m, k), generator=g, dtype=torch.int8)
        runs = {}
        for backend in GEMMS:
            try:
                op, x = prepare_weight(w, backend), q if backend == "int_mm" else (q.to(torch.int16) + 128).to(torch.uint8)
                for _ in range(2):
                    int_gemm(x, op, backend, n)
                runs[backend] = (lambda op=op, x=x, b=backend: int_gemm(x, op, b, n), [])
            # not built into this torch / not on this CPU
            except (RuntimeError, NotImplementedError):
                continue
        for _ in range(repeats):
            for f, ts in runs.values():
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
        times = {b: statistics.median(ts) for b, (_, ts) in runs.items()}
        # oneDNN only where it is clearly faster (AMX: 1.9-3.9x): a near tie flips from run to run
        # on a busy machine; the results never do
        _CHOSEN[(k, n)] = "onednn" if times.get("onednn", 1e9) < 0.75 * times["int_mm"] else "int_mm"
    return _CHOSEN[(k, n)]


#################################################################################
#                                  IntLinear                                     #
#################################################################################

class IntLinear(nn.Module):
    """The integer form of a QuantLinear: int4/int8 weight codes, an int8 GEMM, float scales."""
    def __init__(self, q, gemm="auto"):
        super().__init__()
        wq, aq = q.wq, q.aq
        dyn_ok = aq is not None and aq.dynamic and aq.granularity == "row" and aq.range == "minmax"
        static_ok = aq is not None and not aq.dynamic
        if wq is None or not (dyn_ok or static_ok) or not (wq.symmetric and aq.symmetric) or wq.granularity != "row":
            raise ValueError("the integer path needs symmetric per-channel weights and symmetric "
                             "activations: "
                             "dynamic per-token min-max, or static per timestep bucket")
        if gemm != "auto" and gemm not in GEMMS:
            raise ValueError(f"unknown GEMM backend {gemm!r}: auto or one of {', '.join(GEMMS)}")
        self.in_features, self.out_features = q.in_features, q.out_features
        self.w_bits, self.a_bits, self.buckets = wq.bits, aq.bits, aq.buckets
        self.center, self.hadamard, self.block = q.center, q.hadamard, q.block
        self.rotate, self.single = q.rotate, q.single
        # DiTAS: x / s already folded into the producing layer
        self.input_prescaled = q.input_prescaled
        self.gemm_wanted = gemm
        # the fused C activation kernel, where it builds
        self.use_kernel = kernels.kernel_status()[0]
        # (N,) timestep bucket of each sample, set by the model's timestep hook
        self.t_bucket = None
        codes, _, _ = quant.quantize(q.weight.detach(), wq, (q.w_scale, q.w_zero))  # (N, K) int8
        # what is stored
        self.register_buffer("w_int", quant.pack_int4(codes) if wq.bits <= 4 else codes)
        self.register_buffer("w_scale", q.w_scale.detach().clone())  # (N, 1)
        for name in ("bias", "channel_scale", "signs", "mu_static", "a_scale", "a_clip", "lora_u", "lora_v"):
            t = getattr(q, name)
            self.register_buffer(name, None if t is None else t.detach().float().clone())
        self.register_load_state_dict_post_hook(lambda module, _: module.prepare())
        self.prepare()

    @torch.no_grad()
    def prepare(self):
        """The run-time operands, derived from the stored ones (when built and after every
        state-dict load): the codes unpacked once into the GEMM's layout, the LoRA branch moved
        onto the raw input."""
        K, b = self.in_features, self.block or self.in_features
        codes = quant.unpack_int4(self.w_int) if self.w_bits <= 4 else self.w_int  # (N, K) int8
        scale = self.w_scale.reshape(-1).float()  # (N,)
        self.dup16, self.digits, self.wide = False, 1, False
        if self.single:
            # HQ-DM: codes of x̃ = x Hᵀ meet the unrotated W through the exact integer matrix
            # R = W_int H_rawᵀ (H_raw = √b H, ±1 entries), which no longer fits int8.
            R = hadamard.transform(codes.double(), block=self.block, signs=self.signs)
            R = (R * b ** 0.5).round().long()
            d0 = torch.remainder(R + 8, 16) - 8  # R = d0 + 16 d1 with d0 in [-8, 7]
            d1 = (R - d0) // 16
            if self.a_bits <= 4 and d1.abs().max() <= 127:
                # one GEMM of width 2K: [q, 16 q] · [d0, d1]ᵀ = q Rᵀ exactly (16 q fits int8 for q
                # in [-8, 7])
                codes, self.dup16 = torch.cat([d0, d1], dim=1).to(torch.int8), True  # (N, 2K)
            # wider activations: signed base-128 digits stacked along N, recombined in int32 / int64
            else:
                # exercise hqdm_digits: split the integer matrix R into signed base-128 digits in [-64, 63]
                digits = []
                while not digits or R.abs().max() > 0:
                    d = torch.remainder(R + 64, 128) - 64
                    digits.append(d.to(torch.int8))
                    R = (R - d) // 128
                # end exercise hqdm_digits
                m_max = sum(d.long() * 128 ** p for p, d in enumerate(digits)).abs().max().item()
                # can |q Rᵀ| overflow int32?
                self.wide = 2 ** (self.a_bits - 1) * K * m_max >= 2 ** 31
                codes, self.digits = torch.cat(digits), len(digits)  # (P·N, K)
            scale = scale / b ** 0.5
        # (N', K') int8, the GEMM operand
        self.register_buffer("w_codes", codes.contiguous(), persistent=False)
        self.register_buffer("w_scale_eff", scale, persistent=False)
        # oneDNN's float result is exact only below 2^24: its bound is the largest row of |codes|
        # times max|q|
        row_max = codes.abs().sum(1, dtype=torch.int64).max().item()
        bound = 2 ** (self.a_bits - 1) * (16 if self.dup16 else 1) * row_max
        gemm = self.gemm_wanted if self.gemm_wanted != "auto" else choose_gemm(*codes.shape[::-1])
        self.gemm = "int_mm" if self.digits > 1 or bound >= 2 ** 24 or not codes.is_cpu else gemm
        self.offset_codes = 128 if self.gemm == "onednn" else 0
        self.w_gemm = prepare_weight(self.w_codes, self.gemm) if self.gemm == "onednn" else None
        vt = ut = None
        # x̃ Vᵀ on the unquantized transformed input = x V_rawᵀ on the raw one
        if self.lora_v is not None:
            v = self.lora_v
            if self.rotate and not self.single:
                v = hadamard.transform(v, inverse=True, block=self.block, signs=self.signs)
            if self.channel_scale is not None and not self.input_prescaled:
                v = v / self.channel_scale
            # (K, r) and (r, N): the kernel's layouts
            vt, ut = v.T.contiguous(), self.lora_u.T.contiguous()
        self.register_buffer("lora_vt", vt, persistent=False)
        self.register_buffer("lora_ut", ut, persistent=False)
        # the C kernel's Hadamard factors
        hk, self.hm = kernels.kernel_args(self.rotate, self.block, K)
        self.register_buffer("hk", hk, persistent=False)
        term = None
        # static centring: the mean term is a constant, computed once
        if self.mu_static is not None:
            mu_t = self.mu_static.view(1, K) / (1 if self.channel_scale is None or self.input_prescaled else self.channel_scale)
            term = self.mean_term(hadamard.transform(mu_t, block=self.block, signs=self.signs) if self.rotate else mu_t)
        self.register_buffer("static_term", term, persistent=False)

    def per_sample(self, v, n):
        """v[timestep bucket of each of the n samples] -> (n,)."""
        b = self.t_bucket if self.t_bucket is not None else torch.zeros(n, dtype=torch.long)
        return v[b.to(v.device)]

    def quant_args(self, S):
        """What the activation quantizer needs besides x: (center, static mean, scale, ratio,
        step)."""
        mu = self.mu_static.view(1, -1) if self.center == "static" else None
        s = None if self.input_prescaled else self.channel_scale
        ratio = None if self.a_clip is None else self.per_sample(self.a_clip.clamp(min=1e-3), S)
        step = None if self.a_scale is None else self.per_sample(self.a_scale.clamp(min=1e-8), S)
        return self.center == "dynamic", mu, s, ratio, step

    def quantize_input(self, x2, tokens):
        """x (M, K), `tokens` rows per sample -> codes (M, K'), steps (M, 1), μ̃ (S, K) with
        dynamic centring (else None), and the low-rank branch's x V_rawᵀ (M, r) or None: in one
        fused pass."""
        center, mu, s, ratio, step = self.quant_args(x2.shape[0] // tokens)
        if self.use_kernel and x2.is_cpu and x2.dtype == torch.float32:
            q, st, mu_t, lr = kernels.act_quant_c(x2, self.a_bits, tokens, center, mu, s,
                                                  self.signs, self.hk, self.hm,
                                                  ratio, step, self.dup16, self.offset_codes,
                                                      self.lora_vt)
        else:
            q, st, mu_t, lr = kernels.act_quant_torch(x2.float(), self.a_bits, tokens, center, mu,
                                                      s, self.signs,
                                                      self.rotate, self.block, ratio, step,
                                                          self.dup16,
                                                      self.offset_codes, self.lora_vt)
        return q, st, (mu_t if center else None), (lr if self.lora_vt is not None else None)

    def matmul(self, q):
        """Codes (M, K') -> q Rᵀ (M, N), exact (int32, int64, or float32 holding integers)."""
        n = self.out_features
        if self.digits == 1:
            if self.w_gemm is not None and q.is_cpu:
                return int_gemm(q, self.w_gemm, self.gemm, n)
            return int_gemm(q, self.w_codes.t(), "int_mm", n)  # (M, N) int32
        out = torch._int_mm(q, self.w_codes.t())  # (M, P·N): one GEMM against the stacked digits
        acc = out[:, :n].long() if self.wide else out[:, :n]
        for p in range(1, self.digits):
            part = out[:, p * n:(p + 1) * n]
            # important! may overflow int32 when wide
            acc = acc + (part.long() if self.wide else part) * 128 ** p
        return acc

    def mean_term(self, mu_t):
        """HadaNorm's μ̃ (S, K) -> μ̃ Q(W̃)ᵀ (S, N), against the integer weight codes: no float
        copy of W is kept (the codes are widened for this one small product, S rows, and
        dropped)."""
        w, n = self.w_codes, self.out_features
        if self.dup16:
            mu_t = torch.cat([mu_t, 16 * mu_t], dim=1)  # the same digit split as the GEMM
        out = sum(128 ** p * (mu_t @ w[p * n:(p + 1) * n].T.float()) for p in range(self.digits))
        return out * self.w_scale_eff

    def offset(self, mu_t):
        """What is added to every token of a sample: bias + mean term, (S, N) or (1, N), or None."""
        # static centring: a constant row
        t = self.mean_term(mu_t) if mu_t is not None else self.static_term
        if self.bias is not None:
            t = self.bias.view(1, -1) if t is None else t + self.bias
        return t

    def dequantize(self, q, st, mu_t, lr, tokens):
        """Codes -> integer GEMM -> float (S, T, N): per-token times per-channel steps, plus the
        offset and the low-rank branch's up-projection (lr @ Uᵀ)."""
        y = self.matmul(q) * st  # (M, N) float: the exact product times each token's step, one pass
        y = y * self.w_scale_eff  # times each channel's step
        if lr is not None:
            y = y.addmm_(lr, self.lora_ut)  # in place: one GEMM that accumulates into y
        y = y.view(-1, tokens, self.out_features)
        off = self.offset(mu_t)
        return y if off is None else y + off.unsqueeze(1)

    def forward(self, x):
        tokens = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        # (M, K), M = samples · tokens (bf16 float parts: cast)
        x2 = x.reshape(-1, self.in_features).float()
        # (M, K') codes, (M, 1) steps, μ̃, x V_rawᵀ
        q, st, mu_t, lr = self.quantize_input(x2, tokens)
        y = self.dequantize(q, st, mu_t, lr, tokens)  # (S, T, N)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        t = [f"center={self.center}"] * (self.center != "none") + \
            ["scale"] * (self.channel_scale is not None) + [f"hadamard={self.hadamard}"] * self.rotate
        return (f"{self.in_features}->{self.out_features}, W{self.w_bits}A{self.a_bits} integer "
                f"({self.gemm}), transform [{', '.join(t)}]")


class IntMlp(nn.Module):
    """An integer block's MLP: fc1's exact accumulator -> GELU -> fc2's codes in one pass (C
    kernel), so the (tokens x 4D) float activation between them is never written to memory."""
    def __init__(self, fc1, fc2):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.act = nn.GELU(approximate="tanh")  # the unfused path (no C kernel, or not on the CPU)

    @staticmethod
    def fusable(fc1, fc2):
        return isinstance(fc1, IntLinear) and isinstance(fc2, IntLinear) and fc1.digits == 1

    def forward(self, x):
        fc1, fc2 = self.fc1, self.fc2
        if not (fc1.use_kernel and fc2.use_kernel and x.is_cpu):
            return fc2(self.act(fc1(x)))
        tokens = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        x2 = x.reshape(-1, fc1.in_features).float()  # (M, D)
        q1, st1, mu1, lr1 = fc1.quantize_input(x2, tokens)
        acc = fc1.matmul(q1)  # (M, 4D), exact
        center, mu, s, ratio, step = fc2.quant_args(x2.shape[0] // tokens)
        q2, st2, mu2, lr2 = kernels.gelu_quant_c(acc, st1, fc1.w_scale_eff, fc1.offset(mu1),
                                                 fc2.a_bits, tokens, center,
                                                 mu, s, fc2.signs, fc2.hk, fc2.hm, ratio, step,
                                                     fc2.dup16,
                                                 fc2.offset_codes, lr1, fc1.lora_ut, fc2.lora_vt)
        y = fc2.dequantize(q2, st2, mu2 if center else None,
                           lr2 if fc2.lora_vt is not None else None, tokens)
        return y.view(*x.shape[:-1], fc2.out_features).to(x.dtype)


def to_integer(obj, gemm="auto"):
    """A QuantLinear -> its IntLinear; a quantized model -> the same model, every QuantLinear
    replaced by its IntLinear and every MLP whose two layers allow it by an IntMlp (changed in
    place)."""
    if isinstance(obj, quant.QuantLinear):
        return IntLinear(obj, gemm)
    for _, parent, attr, q in quant.quant_layers(obj):
        if isinstance(q, quant.QuantLinear):
            setattr(parent, attr, IntLinear(q, gemm))
    for blk in obj.blocks:
        if not isinstance(blk.mlp, IntMlp) and IntMlp.fusable(blk.mlp.fc1, blk.mlp.fc2):
            blk.mlp = IntMlp(blk.mlp.fc1, blk.mlp.fc2)
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
        raise ValueError(f"{path} is not a quantized dit4bit checkpoint (needs config, recipe and "
                         f"model)")
    common.check_finite(ck["model"], path)
    cfg = dict(ck["config"])
    try:
        recipe = quant.Recipe.from_dict(ck["recipe"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its recipe is not valid: {e}") from None
    model = dit.build(cfg["model"], **{k: v for k, v in cfg.items() if k != "model"})
    quant.quantize_model(model, recipe)
    for name, _, _, q in quant.quant_layers(model):
        r = recipe.lora_rank or recipe.lowrank
        if r and q.wq is not None:
            q.set_lora(torch.zeros(q.out_features, r), torch.zeros(r, q.in_features))
    if recipe.integer:
        to_integer(model)
    own = model.state_dict()
    # older files: the channel scale was the buffer `s`
    sd = {(k[:-2] + ".channel_scale" if k.endswith(".s") else k): v for k, v in ck["model"].items()}
    # older integer files: zero points
    for k in [k for k in sd if k.endswith(".w_zero") and k not in own]:
        if sd[k].abs().max() != 0:
            raise ValueError(f"{path}: {k} is not zero; the integer path is symmetric")
        del sd[k]
    for k, v in own.items():  # a corrupted packed tensor fails here, not in a matmul
        if k in sd and (sd[k].dtype in (torch.uint8, torch.int8) or v.dtype in (torch.uint8, torch.int8)) \
                and (sd[k].dtype != v.dtype or sd[k].shape != v.shape):
            raise ValueError(f"{path}: {k} is {sd[k].dtype} {tuple(sd[k].shape)}, expected "
                             f"{v.dtype} {tuple(v.shape)}")
    dit.load_state_dict_checked(model, sd, path)  # IntLinear re-derives its GEMM operands on load
    return model.eval(), cfg, recipe


#################################################################################
#                                    Lesson                                      #
#################################################################################

def main():
    ap = common.Parser(description="Lesson: one W4A4 HadaNorm layer of the shipped model, "
                                   "simulated "
                                             "(fake-quant, float) and integer (packed int4, int8 "
                                             "GEMM).")
    ap.add_argument("--layer", default="blocks.3.mlp.fc1", help="which quantized layer")
    ap.add_argument("--n", type=int, default=8, help="images sampled to collect its real inputs")
    args = ap.parse_args()
    if args.n < 1:
        raise ValueError("--n must be positive")
    name = args.layer.split(".", 2)
    if len(name) != 3 or name[2] not in quant.QUANT_LAYERS or not name[1].isdigit():
        raise ValueError(f"--layer takes blocks.I.{{{','.join(quant.QUANT_LAYERS)}}}, got "
                         f"{args.layer!r}")
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
        codes_sim = quant.quantize(sim.transform_input(x)[0].reshape(-1, lin.in_features),
                                   sim.aq)[0]
        codes_int = iq.quantize_input(x.reshape(-1, lin.in_features), 64)[0]
    N, K = lin.weight.shape
    same = (codes_int == codes_sim).all(-1).view(y_sim.shape[:-1])  # tokens whose codes all agree
    rel = lambda m: ((y_int - y_sim).abs()[m].max() / y_sim.abs().max()).item() if m.any() else 0.0
    print(f"{args.layer} ({K} -> {N}), W4A4 HadaNorm, on {x.shape[0] * 64} real input tokens of "
          f"{dit.DEFAULT_CKPT}:")
    print(f"  activation codes equal to the simulation's: "
          f"{100 * (codes_int == codes_sim).float().mean():.4f}% "
          f"(the rest sit on a rounding tie; the kernel sums in another order)")
    print(f"  output, max |integer - simulated| / max |simulated|: {rel(same):.1e} where every "
          f"code agrees "
          f"(float rounding), {rel(~same):.1e} on the {(~same).sum().item()} tokens with a code "
          f"one step off")
    print(f"  weight bytes: fp32 {4 * N * K:,d}; stored packed {iq.w_int.numel() + 4 * N:,d} "
          f"({4 * N * K / (iq.w_int.numel() + 4 * N):.1f}x smaller); resident int8 codes "
          f"{iq.w_codes.numel():,d}")
    # the real batch of `python sample.py`: 80 images x 2 (CFG) x 64 tokens
    xb = torch.randn(10240 // 64, 64, K)
    for label, f in (("fp32 F.linear", lin), ("integer layer", iq)):
        c = torch.compile(f)  # as sample.py runs them (the quantize / dequantize passes fused)
        with torch.no_grad():
            c(xb)
            t0 = time.perf_counter()
            for _ in range(10):
                c(xb)
        print(f"  {label:14s} on (10240, {K}), compiled: {1e2 * (time.perf_counter() - t0):6.2f} ms")
    print(f"  GEMM backend chosen by measurement here: {iq.gemm}")

if __name__ == "__main__":
    common.run_cli(main)
