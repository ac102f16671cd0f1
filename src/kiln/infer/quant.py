"""Weight-only int8 quantisation of a kiln Transformer for inference, applied from outside the model.

`quantize_int8(model)` replaces each targeted `nn.Linear` (the attention and MLP projections) under its own name
by an `Int8Linear` holding, per weight W (O, I):

    weight_int8   (O, I) int8     q = round(W / s), in [-127, 127]
    weight_scale  (O,)   float32  s = max_i |W[o, i]| / 127   (per output channel, symmetric; 0 for a zero row)

so q * s[:, None] is within half a step (s / 2) of W, the largest |W| of a row exactly. Activations stay in the
model's dtype (fp32 or bf16): y = (x q^T) * s.

Which layers: q/k/v/o_proj and gate/up/down_proj (79% of SmolLM2-135M's weights, every matmul of a step but the
head). The embedding and the output head stay as they are. A tied head *is* the embedding (one Parameter):
quantising it in place would change every input embedding too, and an int8 copy for the head alone would add
memory, not save it; the head is also the one layer whose error reaches the logits undamped. An untied head can be
added (`targets=(*TARGETS, "lm_head")`); a tied one is refused. Norm gains are tiny and stay.

Kernels, chosen per call from the activation (`kernel_name` says which; `describe` prints it once at load):
- CPU, bf16: PyTorch's `torch._weight_int8pack_mm` (AVX2 / AVX-512 / NEON, fp32 accumulation, the scale cast to
  bf16 as the op requires), 2-3x faster than a bf16 nn.Linear here. Its AVX-512 kernel steps through a row 16
  values at a time with aligned loads and checks neither: in_features not a multiple of 16 gave garbage (K=72) or
  a crash (K=100), a 2-byte-misaligned input crashed (torch 2.13). So it runs only for in_features % 16 == 0, and a
  misaligned input is copied first.
- CPU, fp32 / fp16: the op's kernel for these dtypes is a scalar loop (5x slower than an fp32 nn.Linear at one
  row, 60x at 64 rows on this machine), so dequantise-then-matmul.
- CUDA: dequantise-then-matmul. PyTorch's CUDA `_weight_int8pack_mm` (aten/src/ATen/native/cuda/int8mm.cu, added
  mid-2025 by pytorch#159325, so present in 2.11 though not checked there) is a one-thread-per-output fp32 loop
  that first copies x to fp32: no tensor cores and uncoalesced weight reads, far slower than cuBLAS for prefill
  and, by others' figures, several times slower than a bf16 GEMV for decode. Nothing here has run on CUDA.
- dequantise-then-matmul: F.linear(x, q.to(x.dtype)) * s. The int8 -> float cast is exact; the scale goes on the
  output (O multiplies, not O x I; an int8 x float32 product is not vectorised on CPU and was 8x slower). In fp16
  the unscaled x q^T can pass 65504 (|q| is up to 127 where |W| is ~0.05), so there the weight is dequantised
  first. It saves memory only: each call makes a transient x.dtype copy of one layer's weight, so a CUDA decode
  step reads more bytes than plain bf16 does (torch.compile could fuse the cast; not tried).

torchao's `Int8WeightOnlyConfig` (0.18) was the alternative: in eager mode its linear is the same arithmetic as
dequantise-then-matmul (mm with q.to(x.dtype), scale on the output; it relies on torch.compile to fuse, and in
CPU bf16 a SmolLM2-sized layer ran 2-5x slower than int8pack here, with the same error); its weights become
`Int8Tensor` subclasses that safetensors cannot store and `state_dict()` would hand out; `quantize_` changes
global inductor settings unless told not to; and its version 1 API was removed one release ago. A hundred lines over a PyTorch op are the smaller dependency.
Whole-model figures (perplexity, KL, memory, CPU decode speed): bench/int8_quality.py.

State dict: names unchanged (`...q_proj.weight`); `state_dict()` holds the dequantised weight q * s in the dtype
the model had, and `load_state_dict` quantises what it is given (a dequantised weight gives back the same codes).
The int8 tensors are non-persistent buffers: `.to(device)` moves them; `.to(dtype)` leaves the codes alone but
rounds the float32 scales to that dtype, so quantise after choosing the dtype (the serve loader does).

Shape legend: N tokens (any leading dims), I in_features, O out_features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QMAX = 127            # symmetric: -128 is never used, so q and -q are both codes
PACK_MULTIPLE = 16    # _weight_int8pack_mm's AVX-512 step (AVX2 and NEON step by 8)
PACK_ALIGN = 32       # bytes: its aligned 256-bit loads of a bf16 row


@torch.no_grad()
def quantize_weight(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (O, I), s float32 (O,)): per-output-channel symmetric int8, computed in fp32 on w's device."""
    w = w_OI.detach().float()
    s_O = w.abs().amax(dim=1) / QMAX
    q_OI = torch.round(w / s_O.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-QMAX, QMAX)
    return q_OI.to(torch.int8), s_O


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and a float32 scale per output channel (see the module docstring).
    Made by `quantize_int8` / `from_linear`, never trained."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.orig_dtype = dtype   # of the weight it replaced: state_dict() gives it back in this dtype
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                             persistent=False)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device),
                             persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        m.set_weight(w)
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone()
        return m

    @torch.no_grad()
    def set_weight(self, w_OI: torch.Tensor) -> None:
        q, s = quantize_weight(w_OI.to(self.weight_int8.device))
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(s)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q * s (O, I) in `dtype` (default: the replaced weight's)."""
        return (self.weight_int8.float() * self.weight_scale.float()[:, None]).to(dtype or self.orig_dtype)

    def kernel_name(self, device: torch.device, dtype: torch.dtype) -> str:
        if device.type == "cpu" and dtype == torch.bfloat16 and self.in_features % PACK_MULTIPLE == 0:
            return "int8pack"
        return "dequantise"

    def forward(self, x_NI: torch.Tensor) -> torch.Tensor:
        lead = x_NI.shape[:-1]
        x_MI = x_NI.reshape(-1, self.in_features)
        s_O = self.weight_scale.to(x_NI.dtype)
        if self.kernel_name(x_NI.device, x_NI.dtype) == "int8pack":
            x_MI = x_MI.contiguous()
            # The kernel's aligned loads would fault (see the module docstring). A traced step cannot read a
            # pointer: it copies, into a fresh (aligned) buffer.
            if torch.compiler.is_compiling() or x_MI.data_ptr() % PACK_ALIGN:
                x_MI = x_MI.clone()
            y_MO = torch._weight_int8pack_mm(x_MI, self.weight_int8, s_O)
        elif x_NI.dtype == torch.float16:       # x q^T unscaled could overflow fp16: scale the weight first
            y_MO = F.linear(x_MI, self.weight_int8.to(x_NI.dtype) * s_O[:, None])
        else:
            y_MO = F.linear(x_MI, self.weight_int8.to(x_NI.dtype)) * s_O
        if self.bias is not None:
            y_MO = y_MO + self.bias.to(y_MO.dtype)
        return y_MO.view(*lead, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantize()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the "
                                  f"int8 weight is {(self.out_features, self.in_features)}")
            else:
                self.set_weight(w)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "int8 weight, per-channel scale")


@torch.no_grad()
def quantize_int8(model: nn.Module, targets: tuple[str, ...] = TARGETS) -> nn.Module:
    """Replace every targeted linear of `model` (a kiln Transformer, on the device and in the dtype it will run
    in) by an `Int8Linear`, in place, one layer at a time; returns `model`. Raises ValueError when a target is
    already int8 (called twice), is not a plain nn.Linear (a LoRA layer: merge it first), is the tied head, or
    when nothing matches."""
    names = _checked_targets(model, targets)
    for name in names:   # one at a time, holding no other reference: each float weight is freed as it goes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Int8Linear.from_linear(model.get_submodule(name)))
    return model


def _checked_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    found = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"quantize_int8: no module of the model is named one of {list(targets)}")
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    for name, m in found:
        if isinstance(m, Int8Linear):
            raise ValueError(f"{name} is already int8: quantize_int8 was called twice on this model")
        if type(m) is not nn.Linear:
            raise ValueError(f"{name} is a {type(m).__name__}, not a plain nn.Linear: int8 quantises plain linears "
                             "only (merge a LoRA adapter first)")
        if embed is not None and m.weight is embed.weight:
            raise ValueError(f"{name}.weight is tied to the token embedding: quantising it would change the "
                             "embedding too; leave it out of targets (the default does)")
    return [name for name, _ in found]


def int8_layers(model: nn.Module) -> list[tuple[str, Int8Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Int8Linear)]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as they sit in memory: parameters (a tied matrix once) plus the int8 codes and
    scales of its Int8Linear layers; buffers such as RoPE tables are not weights."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for _, m in int8_layers(model):
        n += m.weight_int8.nbytes + m.weight_scale.nbytes
    return n


def describe(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """One line on what quantisation `model` runs with on `device` in `dtype`: which layers and which kernel."""
    layers = int8_layers(model)
    if not layers:
        return "weights unquantised"
    kernels: dict[str, int] = {}
    for _, m in layers:
        kernels[m.kernel_name(device, dtype)] = kernels.get(m.kernel_name(device, dtype), 0) + 1
    how = {"int8pack": "torch._weight_int8pack_mm", "dequantise": "dequantise-then-matmul (saves memory only)"}
    used = ", ".join(f"{how[k]} in {n}" for k, n in kernels.items())
    if device.type == "cpu" and dtype != torch.bfloat16:
        used += "; in bfloat16 the CPU runs torch._weight_int8pack_mm, faster than an unquantised model"
    head = "head int8" if any(name.rsplit(".", 1)[-1] == "lm_head" for name, _ in layers) else "head unquantised"
    return f"int8 weight-only ({len(layers)} linear layers, per-channel scales; embedding unquantised, {head}): {used}"
