"""LoRA and QLoRA applied from outside the model (Hu et al. 2021; Dettmers et al. 2023), litgpt-style.

Each targeted `nn.Linear` of a kiln Transformer becomes a `LoRALinear` in place: the same module object with
its class swapped, so the frozen base keeps its `weight` and its name (`...q_proj.weight`), and gains two
small linears whose names are PEFT's suffixes:

    ...q_proj.weight           (out, in)   frozen base (fp32, bf16, or torchao's NF4 under QLoRA)
    ...q_proj.lora_A.weight    (r, in)     kaiming-uniform(a=sqrt(5)), as PEFT
    ...q_proj.lora_B.weight    (out, r)    zeros, so a fresh adapter changes nothing

    y = x W^T + (alpha / r) * dropout(x) A^T B^T

Checkpoints, `kiln export` and kiln/formats/peft.py all see these names; `lora_state_dict` is the adapter alone.

Storage of the frozen base (`lora.base_dtype`):
- float32 / bfloat16: every frozen floating weight is cast, the embedding, norms and head included, so the
  residual stream runs in that dtype even without autocast (the estimator, kiln/plan/memory.py, counts the
  whole frozen base at 2 bytes under LoRA). RMSNorm computes in fp32 whatever its gain's dtype.
- nf4: each *targeted* weight is torchao's NF4Tensor (4-bit NormalFloat, blocks of 64, double-quantised
  scales); everything else as under auto. The adapters are always fp32 parameters (the optimizer's master
  copy); under bf16 autocast their matmuls run in bf16 like every other.
- auto: bfloat16 on CUDA, float32 elsewhere.

Hazards:
- `adapters_disabled` flips a Python attribute: a compiled model recompiles once for the other state.
- Apply before sharding, compile and the fused head (kiln/train/setup.py's `prepare`). `train.fp8` does not
  combine with LoRA: torchao's float8 swap, before or after, takes the targeted linears (after: it would
  rebuild a LoRALinear as a Float8Linear without its adapters); apply_lora refuses non-plain linears.
- A QLoRA model's `state_dict()` holds the *dequantised* base weights (safetensors cannot store an NF4Tensor).
  Loading them into a QLoRA model of the same base keeps its codes (a resume is exact); into any other, they
  are quantised again (`NF4Tensor.copy_`), which moves the scales slightly (3e-4 on the test's logits).

Shape legend: N tokens (any leading dims), I in_features, O out_features, R rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import LoRAConfig

NF4_BLOCK = 64            # values per NF4 scale (QLoRA's block size)
NF4_SCALER_BLOCK = 256    # scales per second-level (double quantisation) scale, at most


class LoRALinear(nn.Linear):
    """An `nn.Linear` (frozen `weight`, optional `bias`) plus a low-rank adapter. Made by `apply_lora` from an
    existing Linear (its class swapped in place), never constructed directly."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    scaling: float
    lora_enabled: bool

    def forward(self, x_NI: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            fast = _project(x_NI, (self,))
            if fast is not None:
                return fast[0]
        y_NO = F.linear(x_NI, self.weight, self.bias)   # an NF4 weight dequantises in its __torch_function__
        if not self.lora_enabled:
            return y_NO
        a_dtype = self.lora_A.weight.dtype
        if not torch.is_autocast_enabled(x_NI.device.type) and x_NI.dtype != a_dtype:
            x_NI = x_NI.to(a_dtype)   # bf16 residual stream into fp32 adapters (autocast casts by itself)
        delta_NO = self.lora_B(self.lora_A(self.lora_dropout(x_NI))) * self.scaling
        return y_NO + delta_NO.to(y_NO.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scaling={self.scaling:g}"

    @staticmethod
    def group_forward(x_NI: torch.Tensor, linears: tuple[LoRALinear, ...]) -> tuple[torch.Tensor, ...]:
        """Adapted linears that read the same input (q/k/v, gate/up; kiln/model/llama.py's `project`)."""
        fast = _project(x_NI, linears)
        return fast if fast is not None else tuple(m(x_NI) for m in linears)


def _project(x_NI: torch.Tensor, linears: tuple[LoRALinear, ...]) -> tuple[torch.Tensor, ...] | None:
    """Adapted linears that read `x_NI` as one `_LoRAProjection`: the stacked base weights, the stacked A (the
    group's rank n r) and a block-diagonal B. None where that arithmetic does not hold: dropout while
    training, adapters off, a base that is neither a plain tensor nor QLoRA's NF4, a trainable base, unequal
    scalings, a bf16 base without autocast (the adapters' products then stay in fp32, `forward`)."""
    m0 = linears[0]
    if any(not (type(m.weight) is nn.Parameter or _is_nf4(m.weight)) or not m.lora_enabled or m.weight.requires_grad
           or m.scaling != m0.scaling or (m.training and not isinstance(m.lora_dropout, nn.Identity))
           for m in linears):
        return None
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    if torch.is_autocast_enabled(x_NI.device.type):   # the function runs in one dtype: autocast's
        dtype = torch.get_autocast_dtype(x_NI.device.type)
    elif m0.weight.dtype == m0.lora_A.weight.dtype:
        dtype = m0.weight.dtype
    else:
        return None
    if len(linears) == 1:   # the adapters themselves (no stacked copy kept for backward)
        a_RI, b_OR = m0.lora_A.weight.to(dtype), m0.lora_B.weight.to(dtype)
    else:
        a_RI = torch.cat([m.lora_A.weight for m in linears]).to(dtype)
        b_OR = torch.block_diag(*[m.lora_B.weight for m in linears]).to(dtype)
    frozen = [m.weight for m in linears] + ([] if biases[0] is None else biases)
    y_NO = _LoRAProjection.apply(x_NI.to(dtype), a_RI, b_OR, m0.scaling, len(linears), *frozen)
    return tuple(y_NO.split([m.out_features for m in linears], -1)) if len(linears) > 1 else (y_NO,)


def _is_nf4(w: torch.Tensor) -> bool:
    return hasattr(w, "get_original_weight")   # torchao's NF4Tensor (QLoRA's base)


def _stacked(weights, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weights of a group as one (O, I) matrix in `dtype`; NF4 ones dequantised (a transient, as
    torchao's own linear does in its forward and again in its backward)."""
    dense = [w.get_original_weight() if _is_nf4(w) else w for w in weights]
    return (torch.cat(dense) if len(dense) > 1 else dense[0]).to(dtype)


class _LoRAProjection(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T (+ bias) over a frozen W, with fewer passes over the activations than the
    three matmuls and the sum that autograd records one by one (which materialise s (x A^T) B^T at full width
    and add it). Forward: u = x A^T, then one matmul over [x | u] against [W | s B] where the output is wider
    than the input (q/k/v, gate/up), else x W^T with s u B^T added in the same matmul (addmm). Backward: the
    input gradient through the merged weight W + s B A in one matmul (a weight-sized product, not an
    activation-sized one), dB = s g^T u, dA = s (g B)^T x. Saved: x and u; the stacked W is rebuilt in the
    backward from the frozen weights, never kept (it would be a second copy of the base).
    Legend: N tokens, I in, O out (the group's), R the group's rank."""

    @staticmethod
    def forward(ctx, x, a_RI, b_OR, scaling: float, n: int, *frozen):
        weights, biases = frozen[:n], frozen[n:]
        w_OI = _stacked(weights, x.dtype)
        bias = (torch.cat(biases) if n > 1 else biases[0]).to(x.dtype) if biases else None
        x_NI = x.reshape(-1, x.shape[-1])
        u_NR = x_NI @ a_RI.t()
        if x_NI.shape[1] + u_NR.shape[1] <= w_OI.shape[0]:
            y_NO = F.linear(torch.cat([x_NI, u_NR], 1), torch.cat([w_OI, b_OR * scaling], 1), bias)
        else:
            y_NO = torch.addmm(x_NI @ w_OI.t() if bias is None else torch.addmm(bias, x_NI, w_OI.t()),
                               u_NR, b_OR.t(), alpha=scaling)
        ctx.save_for_backward(x_NI, u_NR, a_RI, b_OR, *weights)
        ctx.scaling = scaling
        return y_NO.view(*x.shape[:-1], y_NO.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x_NI, u_NR, a_RI, b_OR, *weights = ctx.saved_tensors
        s = ctx.scaling
        g_NO = g.reshape(-1, g.shape[-1])
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            w_OI = _stacked(weights, g.dtype)
            gx = (g_NO @ torch.addmm(w_OI, b_OR, a_RI, alpha=s)).view(*g.shape[:-1], x_NI.shape[1])
        if ctx.needs_input_grad[1]:
            ga = (g_NO @ b_OR).t() @ x_NI * s
        if ctx.needs_input_grad[2]:
            gb = g_NO.t() @ u_NR * s
        return (gx, ga, gb, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)   # the frozen tensors


def frozen_dtype(cfg: LoRAConfig, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base weights that are not NF4 (see the module docstring)."""
    if cfg.base_dtype == "float32":
        return torch.float32
    if cfg.base_dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32   # auto, and nf4's other weights


def targeted_linears(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module whose last name is a target (q_proj, ...)."""
    return [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets]


@torch.no_grad()
def apply_lora(model: nn.Module, cfg: LoRAConfig, device: torch.device | str) -> int:
    """Give every targeted linear of `model` (an unwrapped kiln Transformer) an adapter, freeze the rest, and put
    the model on `device` with the base in `cfg.base_dtype`; returns the number of trainable parameters.

    Call it on the model where it was loaded (CPU is fine): tensors are cast and moved one at a time, and NF4
    weights quantised as they arrive, so a base that fits `device` only as bf16 or NF4 still gets there.
    """
    device = torch.device(device)
    found = targeted_linears(model, cfg.targets)
    if not found:
        raise ValueError(f"lora.targets={cfg.targets}: no module of the model has these names")
    for name, m in found:
        if isinstance(m, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter: apply_lora was called twice")
        if type(m) is not nn.Linear:
            raise ValueError(f"{name} is a {type(m).__name__}, not a plain nn.Linear: apply LoRA before fp8 or "
                             "sharding (train.fp8 does not combine with LoRA)")
    dtype = frozen_dtype(cfg, device)
    to_nf4 = _nf4_converter() if cfg.base_dtype == "nf4" else None
    # NF4 weights are quantised one at a time on arrival below, so the device never holds the bf16 base whole.
    later = {id(m.weight) for _, m in found} if to_nf4 is not None else set()
    seen: set[int] = set()
    for p in model.parameters():   # a tied embedding/head is one Parameter: cast once, tie kept (same object)
        if id(p) not in seen:
            seen.add(id(p))
            p.requires_grad_(False)
            if id(p) not in later:
                p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else None)
    for mod in model.modules():    # buffers (RoPE tables) keep their dtype: only their device changes
        for key, buf in mod._buffers.items():
            if buf is not None:
                mod._buffers[key] = buf.to(device)
    for name, m in found:
        _make_lora(m, cfg, device)
        if to_nf4 is not None:
            w = m.weight.data.to(device=device, dtype=dtype)
            m.weight = nn.Parameter(to_nf4(w, name), requires_grad=False)
            m._lora_nf4_hooks = (m.register_state_dict_post_hook(_dequantised_weight),
                                 m.register_load_state_dict_pre_hook(_keep_codes_of_same_weight))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _make_lora(m: nn.Linear, cfg: LoRAConfig, device: torch.device) -> None:
    """Swap `m`'s class to LoRALinear and give it fp32 adapters initialised as PEFT does."""
    m.__class__ = LoRALinear
    m.lora_A = nn.Linear(m.in_features, cfg.rank, bias=False, device=device, dtype=torch.float32)
    m.lora_B = nn.Linear(cfg.rank, m.out_features, bias=False, device=device, dtype=torch.float32)
    nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(m.lora_B.weight)
    m.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
    m.scaling = cfg.alpha / cfg.rank
    m.lora_enabled = True


def _nf4_converter():
    """A function (weight, name) -> NF4Tensor, from whichever module this torchao has it in."""
    try:
        from torchao.quantization import to_nf4                  # torchao >= 0.13
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import to_nf4          # older torchao
        except ImportError as e:
            raise ValueError("lora.base_dtype=nf4 (QLoRA) needs torchao: pip install torchao, or use "
                             "lora.base_dtype=bfloat16") from e

    def convert(w: torch.Tensor, name: str):
        if w.numel() % NF4_BLOCK:
            raise ValueError(f"{name}.weight {tuple(w.shape)}: NF4 quantises blocks of {NF4_BLOCK} values and "
                             f"{w.numel()} is not a multiple; use lora.base_dtype=bfloat16 for this model")
        # torchao wants the scale count to be a multiple of its scaler block (256 by default); any divisor
        # works, smaller ones cost a little memory and lose nothing in accuracy.
        scaler_block = math.gcd(w.numel() // NF4_BLOCK, NF4_SCALER_BLOCK)
        return to_nf4(w.contiguous(), NF4_BLOCK, scaler_block)

    return convert


def _dequantised_weight(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict hook of an NF4 LoRALinear: the base weight as a plain tensor, in the dtype it was quantised
    from (the weights the adapter was trained against)."""
    w = module.weight
    if hasattr(w, "get_original_weight"):
        state_dict[prefix + "weight"] = w.get_original_weight()


def _keep_codes_of_same_weight(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of an NF4 LoRALinear. Quantising a dequantised weight again does not give back
    the same scales exactly (their mean moves), so a resume would drift; when the incoming weight is exactly
    what this NF4 weight dequantises to (a checkpoint of the same base), keep the codes as they are."""
    w, key = module.weight, prefix + "weight"
    incoming = state_dict.get(key)
    if incoming is not None and hasattr(w, "get_original_weight") and not hasattr(incoming, "get_original_weight"):
        if incoming.shape == w.shape and torch.equal(incoming.to(w.device, w.dtype), w.get_original_weight()):
            state_dict[key] = w   # NF4Tensor.copy_ from itself: nothing changes


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under kiln's (= the checkpoint's) names: `...q_proj.lora_A.weight`, ...
    `model` is the unwrapped Transformer (DDP and torch.compile add prefixes to names)."""
    out = {}
    for name, m in lora_modules(model):
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its frozen base inside the block (DPO's and GRPO's reference policy without a second
    copy of the weights). Restores each adapter's previous state on exit, exceptions included."""
    mods = [m for _, m in lora_modules(model)]
    if not mods:
        raise ValueError("adapters_disabled: the model has no LoRA adapters (apply_lora first)")
    before = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, was in zip(mods, before):
            m.lora_enabled = was


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight, in place: W <- W + (alpha / r) B A computed in fp32 and stored
    in the base's dtype, then make each LoRALinear a plain nn.Linear again (state_dict names = the base's).
    An NF4 base is dequantised first and stays dequantised (re-quantising would drown the adapter's update
    in NF4's rounding). Returns the number of merged layers."""
    n = 0
    for _, m in list(lora_modules(model)):
        w = m.weight
        plain = w.get_original_weight() if hasattr(w, "get_original_weight") else w.data
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling
        merged = (plain.float() + delta).to(plain.dtype)
        for key in ("lora_A", "lora_B", "lora_dropout"):
            delattr(m, key)
        for key in ("scaling", "lora_enabled"):
            m.__dict__.pop(key, None)
        for hook in m.__dict__.pop("_lora_nf4_hooks", ()):
            hook.remove()
        m.__class__ = nn.Linear
        m.weight = nn.Parameter(merged, requires_grad=False)
        n += 1
    return n
