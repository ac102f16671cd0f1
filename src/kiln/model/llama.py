"""Decoder-only transformer in the Hugging Face Llama layout (Llama-3 family).

Architecture only: parallelism, compile and mixed precision are applied
from outside. Parameter names match `transformers`' LlamaForCausalLM exactly
(`model.layers.N.self_attn.q_proj.weight`, ...) so export is a copy; with
`qk_norm` the extra `self_attn.{q,k}_norm.weight` match Qwen3ForCausalLM, with `qkv_bias` the
`self_attn.{q,k,v}_proj.bias` match Qwen2ForCausalLM.

Shape legend (suffixes such as `x_BTD`):
    B  batch                      D  d_model (residual width)
    T  new tokens in this forward F  SwiGLU hidden width
    S  keys attended: cached + new (S == T without a cache)
    H  query heads                K  key/value heads (H % K == 0)
    E  head_dim                   V  vocabulary
"""

from __future__ import annotations

import inspect
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kiln.config import ModelConfig


class KVCache(Protocol):
    """What the model asks of a key/value cache (kiln/infer/kv_cache.py has one): each layer calls
    `update(layer_idx, k, v)` to store its new keys/values at `pos` and read back everything cached; the
    model calls `advance(T)` once per forward, after the last layer."""

    pos: int

    def update(self, layer_idx: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def advance(self, n_tokens: int) -> None: ...

    # Optional: a cache may also offer `attend(layer_idx, q_BTHE, k_BTKE, v_BTKE, cos, sin) -> y_BHTE`, doing
    # RoPE, its own write and the attention at once (one new token per row; kiln/infer/attention.py's kernel);
    # the layer then calls it instead of `update` and SDPA.


try:   # flash attention over variable-length sequences (torch >= 2.10), on CUDA in fp16 / bf16
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _VARLEN_ARGS = inspect.signature(_varlen_attn).parameters
except ImportError:
    _varlen_attn, _VARLEN_ARGS = None, {}


def varlen_supported(device: torch.device) -> bool:
    """Whether `Documents` can take the flash kernel on `device` (the caller then passes the bounds): this
    torch has the op, and a CUDA card of Ampere (sm_80) or newer, as PyTorch's flash kernels need. Asked
    outside the compiled model, so that the capability query is never traced."""
    return (_varlen_attn is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 8)


class Documents:
    """Several documents packed in each row of a (B, T) batch, as the attention sees them: the block-diagonal
    causal mask (B, 1, T, T), True = may attend, and, when the caller has them, the documents' bounds in the
    B * T flattened tokens (`cu_seqlens_S`, int32, flash attention's convention: S = documents + 1, first 0,
    last B * T). With the bounds, on CUDA in 16-bit, each document is attended alone by the flash kernel for
    variable-length sequences: no work on masked-out keys (a masked dense kernel computes all T x T scores)."""

    def __init__(self, mask_B1TT: torch.Tensor, cu_seqlens_S: torch.Tensor | None):
        self.mask_B1TT, self.cu_seqlens_S = mask_B1TT, cu_seqlens_S

    def attend(self, q_BHTE, k_BKTE, v_BKTE) -> torch.Tensor | None:
        """(B, T, H, E), or None when the flash kernel cannot take these inputs (then the mask is used)."""
        B, H, T, E = q_BHTE.shape
        if (self.cu_seqlens_S is None or _varlen_attn is None or not q_BHTE.is_cuda
                or q_BHTE.dtype not in (torch.float16, torch.bfloat16) or E % 8 or E > 256):
            return None
        K = k_BKTE.size(1)
        q_NHE, k_NKE, v_NKE = (t.transpose(1, 2).reshape(B * T, t.size(1), E) for t in (q_BHTE, k_BKTE, v_BKTE))
        extra = {}
        if K != H:
            if "enable_gqa" in _VARLEN_ARGS:
                extra["enable_gqa"] = True
            else:
                k_NKE, v_NKE = k_NKE.repeat_interleave(H // K, 1), v_NKE.repeat_interleave(H // K, 1)
        if "window_size" in _VARLEN_ARGS:
            extra["window_size"] = (-1, 0)   # causal
        else:
            extra["is_causal"] = True
        cu = self.cu_seqlens_S
        return _varlen_attn(q_NHE, k_NKE, v_NKE, cu, cu, T, T, **extra).view(B, T, H, E)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back to the input dtype.

    HF's LlamaRMSNorm rounds to the input dtype *before* the gain; we apply the
    gain in fp32 and round once. Identical in fp32, at most 1 ulp apart in bf16,
    and the output dtype never silently widens to the gain's dtype.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def rope_tables(seq_len: int, head_dim: int, theta: float, device=None,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, E) in fp32, HF layout: the E/2 frequencies repeated twice (pairs i and i + E/2).

    `scaling` (config.json's `rope_scaling`): `linear` divides every frequency by `factor`; `llama3` (Llama
    3.1) divides only the low frequencies (wavelength above original_max / low_freq_factor) by `factor`, keeps
    the high ones (wavelength below original_max / high_freq_factor) and blends smoothly in between.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if scaling is not None:
        inv_freq = scale_inv_freq(inv_freq, scaling)
    angles_TE2 = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles_TE = torch.cat((angles_TE2, angles_TE2), dim=-1)
    return angles_TE.cos(), angles_TE.sin()


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    kind, factor = scaling.get("rope_type", scaling.get("type")), float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    assert kind == "llama3", kind  # ModelConfig.validate admits only these two
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > original / low, inv_freq / factor,
                       torch.where(wavelen < original / high, inv_freq, blended))


def apply_rope(x_BHTE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    """Rotate with HF's `rotate_half` convention (not the interleaved pairs of the original Llama code)."""
    cos, sin = cos_TE.to(x_BHTE.dtype), sin_TE.to(x_BHTE.dtype)  # like HF: tables rounded to the compute dtype
    x1, x2 = x_BHTE.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHTE * cos + rotated * sin


def project(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of linear layers that read the same input (q/k/v, gate/up), as one matmul where it can be:
    the input is read once, the backward's input gradient is one matmul instead of a sum, and the narrow k/v
    products stop being matmuls of their own. Weights are concatenated on the fly (each keeps its Parameter,
    name and gradient); a class of linear that knows better (LoRA's, kiln/train/lora.py) provides
    `group_forward(x, linears)`; any other mix runs one by one (fp8's linears, DeepSpeed ZeRO-3's gathered
    ones: callers switch grouping off there, `Transformer.group_projections`), as do plain linears without
    autocast (see below). Without autograd (evaluation, sampling during training) they also run one by one: a
    concatenation per forward would copy the weights once per decoded token."""
    kind = type(linears[0])
    if not torch.is_grad_enabled() or any(type(m) is not kind for m in linears):
        return tuple(m(x) for m in linears)
    group = getattr(kind, "group_forward", None)
    if group is not None:
        return group(x, linears)
    # Plain linears group under autocast only: backward keeps the weight it multiplied by, and under autocast
    # that is a bf16 cast either way (of each weight, or of the stack); without it, the stack would be a
    # second copy of these weights kept until backward (a whole unsharded one under FSDP2's bf16 params).
    if kind is not nn.Linear or not torch.is_autocast_enabled(x.device.type):
        return tuple(m(x) for m in linears)
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return tuple(m(x) for m in linears)
    weight = torch.cat([m.weight for m in linears])
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias).split([m.out_features for m in linears], -1)


class Attention(nn.Module):
    grouped = False   # training: q/k/v as one matmul (`project`); set by Transformer.group_projections

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache this layer writes
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        # Inference only (kiln/infer/fuse.py): q/k/v weights stacked in one matrix, the three projections' weights
        # being views of it, so one matmul replaces three (`qkv_bias` likewise, with qkv_bias). Not saved; None while
        # training.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def forward(self, x_BTD, cos_TE, sin_TE, cache: KVCache | None, mask_TS: torch.Tensor | Documents | None):
        B, T, _ = x_BTD.shape
        if self.qkv_weight is not None:
            q, k, v = F.linear(x_BTD, self.qkv_weight, self.qkv_bias).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1)
        elif self.grouped:
            q, k, v = project(x_BTD, (self.q_proj, self.k_proj, self.v_proj))
            # attention keeps v for its backward: as a view it would keep the whole q/k/v block (RoPE's outputs
            # are what it keeps of q and k); a copy of v alone lets the block go
            v = v.contiguous()
        else:
            q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q_BTHE = q.view(B, T, self.n_heads, self.head_dim)
        k_BTKE = k.view(B, T, self.n_kv_heads, self.head_dim)
        v_BTKE = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 order: per-head norm, then RoPE
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        attend = getattr(cache, "attend", None)
        if attend is not None:
            y_BHTE = attend(self.layer_idx, q_BTHE, k_BTKE, v_BTKE, cos_TE, sin_TE)
            return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))
        q_BHTE = apply_rope(q_BTHE.transpose(1, 2), cos_TE, sin_TE)
        k_BKSE = apply_rope(k_BTKE.transpose(1, 2), cos_TE, sin_TE)
        v_BKSE = v_BTKE.transpose(1, 2)
        if isinstance(mask_TS, Documents):
            y_BTHE = mask_TS.attend(q_BHTE, k_BKSE, v_BKSE)
            if y_BTHE is not None:
                return self.o_proj(y_BTHE.reshape(B, T, -1))
            mask_TS = mask_TS.mask_B1TT
        if cache is not None:
            k_BKSE, v_BKSE = cache.update(self.layer_idx, k_BKSE, v_BKSE)
        # No mask and S == T: plain causal (training, prefill). No mask and S > T: one new
        # query that may see every cached key. Otherwise mask_TS carries the offset.
        # (is_causal with S != T would align the triangle top-left: wrong for a cache.)
        # Without a cache the answer is a Python bool: comparing sizes would make it a symbolic one under
        # torch.compile with dynamic shapes (padded rows of varying length), which SDPA refuses (a graph break).
        is_causal = mask_TS is None and (cache is None or k_BKSE.size(2) == T)
        # enable_gqa lets the flash kernel share K heads across query groups without
        # materialising repeat_interleave copies of K and V. Only set when K < H: with the
        # flag, SDPA skips backends without GQA support (cuDNN) even for plain MHA.
        y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, attn_mask=mask_TS,
                                                is_causal=is_causal,
                                                enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    grouped = False   # training: gate/up as one matmul, as Attention.grouped

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)   # inference only, as Attention.qkv_weight

    def forward(self, x_BTD):
        if self.gate_up_weight is not None:
            gate, up = F.linear(x_BTD, self.gate_up_weight).chunk(2, dim=-1)
        elif self.grouped:
            gate, up = project(x_BTD, (self.gate_proj, self.up_proj))
        else:
            gate, up = self.gate_proj(x_BTD), self.up_proj(x_BTD)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # Declaration order = HF's, so state_dict() lists keys in the same order.
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x_BTD, cos_TE, sin_TE, cache, mask_TS):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TE, sin_TE, cache, mask_TS)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Backbone(nn.Module):
    """Everything under the `model.` prefix of HF's LlamaForCausalLM: embedding, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids_BT, cos_TE, sin_TE, cache=None, mask_TS=None) -> torch.Tensor:
        x_BTD = self.embed_tokens(input_ids_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_TE, sin_TE, cache, mask_TS)
        return self.norm(x_BTD)


class Transformer(nn.Module):
    """Llama-layout causal LM. `Transformer(cfg)` builds and initialises; see `from_config` for meta-device builds."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.resolved()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set: train the tokenizer first (it fills it in) "
                             "or set model.vocab_size explicitly")
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        # Non-persistent: recomputed by init_weights, never saved (HF recomputes its own).
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.init_weights()

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: torch.device | str | None = None) -> Transformer:
        """Build on the meta device, allocate directly on `device` (default CPU), then `init_weights()`.

        Skips the wasted default init and the CPU copy of a model headed for a GPU. Draws differ
        from `Transformer(cfg)` under the same seed (nn.Linear's own init consumes RNG there);
        each path is deterministic on its own.
        """
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device or "cpu")
        model.tie_weights()
        model.init_weights()
        return model

    def group_projections(self, on: bool = True) -> None:
        """Training: compute each layer's q/k/v, and its gate/up, as one matmul (`project`). Off by default, so
        that inference and evaluation run the plain layers (the inference engine stacks the weights once
        instead, kiln/infer/fuse.py); the training setup turns it on, except where each linear's weights are
        only gathered inside its own forward (DeepSpeed ZeRO-3)."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.grouped = on

    def tie_weights(self) -> None:
        """With tie_embeddings, make lm_head.weight the very Parameter model.embed_tokens.weight
        (one tensor, two names in state_dict). `to_empty()` unties them (it makes a new Parameter
        per module): call this again after it."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; the only place init happens.

        - model.embed_tokens.weight: N(0, init_std) (this is also lm_head.weight when tied)
        - self_attn.{q,k,v}_proj.weight, mlp.{gate,up}_proj.weight: N(0, init_std); their biases (qkv_bias): 0
        - self_attn.o_proj.weight, mlp.down_proj.weight: N(0, init_std / sqrt(2 * n_layers)):
          these write into the residual stream, 2 per layer; scaling keeps its variance at init
          independent of depth (GPT-2)
        - lm_head.weight (untied only): N(0, init_std)
        - every RMSNorm gain (input_layernorm, post_attention_layernorm, q_norm, k_norm, model.norm): 1
        - rope_cos, rope_sin buffers: recomputed (after `to_empty()` they hold garbage)
        """
        assert self.lm_head.weight is self.model.embed_tokens.weight or not self.cfg.tie_embeddings, \
            "tied embeddings came apart (to_empty() does that): call tie_weights() first"
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.depth)
        nn.init.normal_(self.model.embed_tokens.weight, 0.0, std)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.weight is not self.model.embed_tokens.weight:
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        """Compute the rope_cos, rope_sin buffers (after loading weights into a meta-built model, say)."""
        cos, sin = rope_tables(self.cfg.max_seq_len, self.cfg.head_dim, self.cfg.rope_theta, self.rope_cos.device,
                               self.cfg.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, reduction: str = "mean",
                segments_BT: torch.Tensor | None = None, rows_N: torch.Tensor | None = None,
                cu_seqlens_S: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) in fp32 when `targets_BT` is None, else the fp32 cross-entropy.

        reduction: "mean" (scalar over non-ignored tokens; NaN if all are ignored), "sum", or
        "none" ((B, T), 0 where the target is -100). With a `cache`, the T tokens sit at
        positions cache.pos .. cache.pos + T - 1 and the cache advances by T.

        segments_BT (no cache): several documents packed in a row, each token labelled with its
        document's id. Attention stays inside a document (a block-diagonal causal mask) and positions
        restart at 0 in each, so every document is computed exactly as if it were alone in its row.
        Ids must be non-decreasing along a row (documents are contiguous). With `cu_seqlens_S` (the same
        documents' bounds in the flattened batch, `Documents`), CUDA runs them through variable-length flash
        attention instead of the mask.

        rows_N (with targets): the flat indices into B * T of every position whose target counts (all others
        must be -100). The head and the loss then run on those N positions only: the same loss, without the
        head's matmuls and the (N, V) logits for positions nothing is trained on (a chat row's user turns); with
        reduction "none" the result is then (N,), the loss at each of those positions. The caller knows them
        without a host sync (kiln.post.sft.ChatBatches, kiln.post.dpo.PairBatches).
        """
        T = input_ids_BT.shape[1]
        pos = 0 if cache is None else cache.pos  # a Python int: no host sync
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if segments_BT is not None:
            assert cache is None, "packed documents (segments_BT) are a training / scoring input, not a cache's"
            cos, sin, mask = self._document_rope_and_mask(segments_BT)
            if cu_seqlens_S is not None:
                mask = Documents(mask, cu_seqlens_S)
            h_BTD = self.model(input_ids_BT, cos, sin, None, mask)
        else:
            mask_TS = None
            if pos > 0 and T > 1:  # several new queries after a cached prefix: query i sits at pos + i
                q_pos_T1 = torch.arange(pos, pos + T, device=input_ids_BT.device)[:, None]
                mask_TS = torch.arange(pos + T, device=input_ids_BT.device)[None, :] <= q_pos_T1
            h_BTD = self.model(input_ids_BT, self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T], cache, mask_TS)
        if cache is not None:
            cache.advance(T)  # once per forward, after every layer has written its slot
        if targets_BT is None:
            return self.lm_head(h_BTD).float()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none'")
        if rows_N is not None:
            h_BTD = h_BTD.flatten(0, 1).index_select(0, rows_N).unsqueeze(0)       # (1, N, D)
            targets_BT = targets_BT.reshape(-1).index_select(0, rows_N).unsqueeze(0)
            loss = self.loss(h_BTD, targets_BT, reduction)
            return loss.squeeze(0) if reduction == "none" else loss
        return self.loss(h_BTD, targets_BT, reduction)

    def _document_rope_and_mask(self, seg_BT: torch.Tensor):
        """RoPE tables at each token's position inside its document, and the block-diagonal causal mask
        (B, 1, T, T), True = may attend."""
        B, T = seg_BT.shape
        idx_T = torch.arange(T, device=seg_BT.device)
        starts_BT = torch.ones_like(seg_BT, dtype=torch.bool)
        starts_BT[:, 1:] = seg_BT[:, 1:] != seg_BT[:, :-1]
        # position = index - index of the document's first token (a running max of start indices)
        first_BT = torch.cummax(torch.where(starts_BT, idx_T, 0), dim=1).values
        positions_BT = idx_T - first_BT
        cos_B1TE = self.rope_cos[positions_BT].unsqueeze(1)
        sin_B1TE = self.rope_sin[positions_BT].unsqueeze(1)
        same_BTT = seg_BT[:, :, None] == seg_BT[:, None, :]
        causal_TT = idx_T[None, :] <= idx_T[:, None]
        return cos_B1TE, sin_B1TE, (same_BTT & causal_TT).unsqueeze(1)

    def hidden(self, input_ids_BT: torch.Tensor, positions_BT: torch.Tensor, cache: KVCache | None = None,
               mask_B1TS: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D), each token at its own position (a ragged batch).

        The batched engine's entry point (kiln/infer/engine.py): it applies `lm_head` to the positions it
        needs only, and the cache tracks each row's length itself, so nothing is advanced here. `mask_B1TS`
        (True = may attend) is needed whenever a row must not see every key S; without it S == T is causal.
        """
        cos_B1TE = self.rope_cos[positions_BT].unsqueeze(1)   # broadcasts over heads in apply_rope
        sin_B1TE = self.rope_sin[positions_BT].unsqueeze(1)
        return self.model(input_ids_BT, cos_B1TE, sin_B1TE, cache, mask_B1TS)

    def loss(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """fp32 cross-entropy of the head's logits against `targets_BT` (-100: ignored). Training may
        replace this on the instance with a fused head (kiln/train/cross_entropy.py)."""
        B, T, _ = h_BTD.shape
        logits_BTV = self.lm_head(h_BTD).float()
        loss = F.cross_entropy(logits_BTV.view(B * T, -1), targets_BT.reshape(B * T),
                               ignore_index=-100, reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied matrix once. non_embedding drops the token-embedding table
        (when tied, that is also the output head; when untied, lm_head stays counted)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT MFU estimate:

            6 * N_matmul + 12 * n_layers * n_heads * head_dim * seq_len

        N_matmul counts every matmul weight, lm_head included even when tied (the output matmul
        happens either way); the embedding lookup and norm gains do no matmul. The second term is
        QK^T and attention-times-V over the full seq_len (causal masking is not discounted).
        """
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.cfg
        return 6.0 * n_matmul + 12.0 * c.depth * c.n_heads * c.head_dim * seq_len
