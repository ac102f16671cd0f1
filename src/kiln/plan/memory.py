"""Memory by arithmetic: parameters by kind, training memory per GPU by phase, inference memory.

Every term counts what kiln's own code holds, so that the prediction can be checked against
`torch.cuda.max_memory_allocated` (bench/estimate_memory.py). Shape legend as in kiln/model/llama.py:
D d_model, H query heads, K key/value heads, E head_dim, F SwiGLU width, V vocabulary, L layers,
N = micro-batch x sequence tokens. head_dim and the head counts are used on their own (H * E need not
be D).

Activations saved for backward, bytes per token per block (`block_activation_bytes`), from what each op of
kiln's Block keeps (checked on CPU with saved-tensor hooks, tests/plan/test_memory.py):
- each RMSNorm keeps its fp32 input (4D; the fp32 copy when the residual is bf16) and rstd (4); PyTorch's
  composite (CPU) rms_norm also keeps the normalised fp32 tensor (+4D), CUDA's fused kernel does not;
- the linear layers keep their input in the compute dtype: with fp32 weights under bf16 autocast every
  linear casts the norm's fp32 output itself (3 copies for q/k/v, 2 for gate/up: 10D bytes); with bf16
  weights (FSDP2, LoRA, DeepSpeed) one bf16 output is shared (2D + 2D);
- RoPE keeps only its cos/sin tables; SDPA (flash / cuDNN / efficient) keeps q, k, v, its output and the
  fp32 log-sum-exp: a(2HE + 2KE) + 4H, linear in T (the math backend's T x T weights are not modelled);
- QK-norm keeps the fp32 q and k (4HE + 4KE) and their rstd;
- SwiGLU keeps gate, silu(gate), up and their product: 4aF.
The output head (outside the blocks): the plain path keeps fp32 log-softmax (4 bytes per logit) and its
backward holds two more fp32 (N, V) blocks at once: 12 bytes per logit at the start of backward. The fused
head + cross-entropy (kiln/train/cross_entropy.py) keeps one (N, V) block in the compute dtype.

Activation checkpointing: `block` keeps only each block's input (the residual, 4D or 2D) and recomputes one
block at a time in backward; `selective` keeps the block input and the outputs of matmuls and attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict

from kiln.config import ModelConfig

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 absmax (double quant)
ADAM8BIT_BYTES = 2 * (1 + 4 / 256)            # bitsandbytes: m and v in 8 bits, an fp32 absmax per 256-block
CUDA_CONTEXT = 0.5 * 1024 ** 3                # CUDA context + cuBLAS/cuDNN handles: outside the allocator
ALLOCATOR_RESERVE = 0.05                      # the caching allocator's fragmentation: reserved over allocated


@dataclass
class ParamCounts:
    total: int
    embedding: int          # token embedding table (the head too when tied)
    head: int               # untied output head (0 when tied)
    blocks: int             # everything inside the transformer blocks
    matmul: int             # every nn.Linear weight, the head included even when tied
    hidden_matrices: int    # 2-D weights inside the blocks (Muon's share)
    per_layer: int
    vectors: int            # 1-D weights: norm gains (the final norm too) and biases

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    c = cfg.resolved()
    if c.vocab_size is None:
        raise ValueError("model.vocab_size is not set: the estimate needs the vocabulary size")
    D, E, H, K, F, V, L = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.vocab_size, c.depth
    attn = D * E * (2 * H + 2 * K)
    mlp = 3 * D * F
    vectors = 2 * D + (2 * E if c.qk_norm else 0) + (E * (H + 2 * K) if c.qkv_bias else 0)   # norm gains, biases
    per_layer = attn + mlp + vectors
    embedding = V * D
    head = 0 if c.tie_embeddings else V * D
    total = embedding + head + L * per_layer + D
    return ParamCounts(total=total, embedding=embedding, head=head, blocks=L * per_layer,
                       matmul=L * (attn + mlp) + V * D, hidden_matrices=L * (attn + mlp), per_layer=per_layer,
                       vectors=L * vectors + D)


def lora_params(cfg: ModelConfig, rank: int, targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> int:
    """Adapter parameters: rank x (in + out) per targeted linear per layer."""
    c = cfg.resolved()
    D, E, H, K, F = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_hidden
    shapes = {"q": (D, H * E), "k": (D, K * E), "v": (D, K * E), "o": (H * E, D),
              "gate": (D, F), "up": (D, F), "down": (F, D)}
    bad = [t for t in targets if t not in shapes]
    if bad:
        raise ValueError(f"LoRA targets {bad}: choose among {', '.join(shapes)}")
    return c.depth * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, bytes_per_value: float = 2) -> int:
    """Keys and values of every layer: 2 x L x K x E x context x batch x bytes (GQA: K heads, not H)."""
    c = cfg.resolved()
    return int(2 * c.depth * c.n_kv_heads * c.head_dim * context * batch * bytes_per_value)


# ---------------------------------------------------------------- activations

def block_activation_bytes(cfg: ModelConfig, compute_bytes: int = 2, residual_bytes: int = 4,
                           fused_norm: bool = True, lora_rank: int = 0, lora_targets=()) -> float:
    """Bytes per token one block saves for backward without checkpointing (see the module docstring)."""
    c = cfg.resolved()
    D, E, H, K, F = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_hidden
    a = compute_bytes
    norm = 4 * D + 4 + (0 if fused_norm else 4 * D)
    cast = residual_bytes != a          # fp32 residual under bf16 autocast: every linear casts its own input
    linear_inputs = (3 * a * D + 2 * a * D) if cast else 2 * a * D
    attn = a * (2 * H * E + 2 * K * E) + 4 * H
    qk = (4 * (H * E + K * E) + 4 * (H + K) + (0 if fused_norm else 4 * (H * E + K * E))) if c.qk_norm else 0
    mlp = 4 * a * F
    lora = a * lora_rank * len(lora_targets)   # each adapter keeps its (N, r) down-projection
    return 2 * norm + linear_inputs + attn + qk + mlp + lora


def selective_activation_bytes(cfg: ModelConfig, compute_bytes: int = 2, residual_bytes: int = 4) -> float:
    """Bytes per token per block under selective checkpointing: the block input and the outputs of the
    matmuls and of attention (kiln/train/memory.py's policy)."""
    c = cfg.resolved()
    D, E, H, K, F = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_hidden
    a = compute_bytes
    mm = a * (H * E + 2 * K * E + D + 2 * F + D)
    sdpa = a * H * E + 4 * H
    return residual_bytes * D + mm + sdpa


# ---------------------------------------------------------------- training

@dataclass
class TrainSetup:
    """Everything besides the model that decides training memory."""

    seq_len: int
    micro_batch: int = 1
    precision: str = "bf16"            # bf16 (autocast or bf16 parameters) | fp32
    optimizer: str = "adamw"           # adamw | muon | adamw8bit
    parallel: str = "none"             # none | ddp | fsdp | zero1 | zero2 | zero3
    gpus: int = 1
    cpu_offload: bool = False          # fsdp (and zero3): parameters, gradients, optimizer state in CPU memory
    checkpointing: str = "off"         # off | block | selective
    finetune: str = "full"             # full | lora | qlora
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS
    fused_head: bool = True            # kiln's fused head + cross-entropy (on by default on CUDA)
    accumulation: int = 1              # >1: gradients stay allocated through the next micro-batches
    loss_share: float = 1.0            # positions the head and loss run on (post-training: the trained tokens)
    fused_norm: bool = True            # CUDA's fused rms_norm (False: PyTorch's composite one, as on CPU)


@dataclass
class TrainMemory:
    """Bytes per GPU. The parts are their full sizes; they do not all live at once (gradients appear during
    backward as activations are freed), so `peak`, the largest phase, is less than their sum."""

    weights: float
    gradients: float
    optimizer: float
    activations: float                 # saved for backward by the blocks, at the chosen checkpointing
    head: float                        # output head + loss at their largest (logits and their gradient)
    head_saved: float                  # what the final norm, head and loss keep for backward (in `peak`'s phases)
    autocast_copies: float             # bf16 copies autocast makes of fp32 matmul weights
    phase: str                         # the phase of the peak
    peak: float                        # what torch.cuda.max_memory_allocated should read
    framework: float                   # CUDA context + allocator reserve: on the GPU, outside the allocator's count
    total: float                       # peak + framework: what must fit the GPU
    activations_by_mode: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    cpu: float = 0.0                   # host memory for offloaded state

    def as_dict(self) -> dict:
        return asdict(self)


def _dp_shards(s: TrainSetup) -> tuple[float, float, float]:
    """Fractions of (weights, gradients, optimizer state) each GPU holds."""
    n = max(1, s.gpus)
    return {"none": (1, 1, 1), "ddp": (1, 1, 1), "fsdp": (1 / n, 1 / n, 1 / n), "zero1": (1, 1, 1 / n),
            "zero2": (1, 1 / n, 1 / n), "zero3": (1 / n, 1 / n, 1 / n)}[s.parallel]


def train_memory(cfg: ModelConfig, s: TrainSetup) -> TrainMemory:
    c = cfg.resolved()
    pc = param_counts(c)
    if s.parallel not in ("none", "ddp", "fsdp", "zero1", "zero2", "zero3"):
        raise ValueError(f"parallel {s.parallel!r}: none, ddp, fsdp, zero1, zero2 or zero3")
    N = s.micro_batch * s.seq_len
    V, D, L = c.vocab_size, c.d_model, c.depth
    fp32 = s.precision == "fp32"
    a = 4 if fp32 else 2
    adapters = s.finetune in ("lora", "qlora")
    deepspeed = s.parallel.startswith("zero")
    bf16_params = not fp32 and (adapters or s.parallel == "fsdp" or deepspeed)
    r = a if (fp32 or bf16_params) else 4          # residual stream dtype: the embedding's
    fw, fg, fo = _dp_shards(s)

    # -- parameters, gradients, optimizer state (bytes per GPU)
    if adapters:
        trainable = lora_params(c, s.lora_rank, s.lora_targets)
        linear = pc.hidden_matrices
        base = (linear * NF4_BYTES if s.finetune == "qlora" else linear * a) + (pc.total - linear) * a
        weights = base * fw + trainable * 4 * fw
        muon_share = 0
    else:
        trainable = pc.total
        master = 4
        weights = trainable * (2 if deepspeed else master) * fw
        muon_share = pc.hidden_matrices if s.optimizer == "muon" else 0
    grad_bytes = 2 if deepspeed and not adapters else 4
    gradients = trainable * grad_bytes * fg
    if s.parallel == "ddp":
        gradients *= 2                                  # DDP's flat buckets hold a second copy
    if s.optimizer == "adamw8bit":
        opt_per = ADAM8BIT_BYTES
    else:
        opt_per = 8
    optimizer = ((trainable - muon_share) * opt_per + muon_share * 4) * fo
    if deepspeed and not adapters:
        optimizer += trainable * 4 * fo                 # ZeRO keeps the fp32 master copy in the optimizer
    cpu = 0.0
    if s.cpu_offload:
        cpu = weights + gradients + optimizer
        weights = gradients = optimizer = 0.0

    # -- gathered units (FSDP2 / ZeRO-3 / offload): the current block's bf16 weights and the next one prefetched,
    # plus the root unit (embedding, head) kept gathered from forward to backward
    gathered = 0.0
    if s.parallel in ("fsdp", "zero3") or s.cpu_offload:
        gathered = 2 * pc.per_layer * a + (pc.embedding + pc.head) * a

    # -- bf16 copies of fp32 weights made by autocast and saved for backward
    autocast = not fp32 and not bf16_params
    copies_all = pc.matmul * 2 if autocast else 0.0
    copies_head = V * D * 2 if autocast else 0.0

    # -- activations
    lora_r = s.lora_rank if adapters else 0
    lora_t = s.lora_targets if adapters else ()
    per_tok_full = block_activation_bytes(c, a, r, s.fused_norm, lora_r, lora_t)
    by_mode = {"off": L * N * per_tok_full,
               "selective": L * N * selective_activation_bytes(c, a, r),
               "block": L * N * r * D}
    acts = by_mode[s.checkpointing]
    layer_full = N * per_tok_full
    recompute = 0.0 if s.checkpointing == "off" else layer_full    # one block's activations rebuilt in backward
    # the final norm (its fp32 input + rstd) and the head's input in the compute dtype (the trained positions'
    # only, when the loss runs there: kiln.model.llama's rows_N); the embedding's ids
    Nh = N * s.loss_share
    head_in = N * (4 * D + 4 + (0 if s.fused_norm else 4 * D) + 8) + Nh * a * D
    if s.fused_head and not fp32:
        head_saved, head_bwd_extra, head_fwd_extra = Nh * V * a, Nh * 4, Nh * 4
    else:
        head_saved, head_bwd_extra, head_fwd_extra = Nh * V * 4, Nh * V * 8, Nh * V * 4
    grads_live = gradients if s.accumulation > 1 else 0.0
    grad_head = (0 if adapters else (pc.embedding + pc.head) * grad_bytes * fg)
    held_copies = copies_all if s.checkpointing == "off" else copies_head
    base_mem = weights + optimizer + gathered

    phases = {}
    phases["forward"] = (base_mem + grads_live + copies_all + acts + head_in + head_saved + head_fwd_extra)
    phases["backward start"] = (base_mem + max(grads_live, grad_head) + held_copies + acts + head_in
                                + head_saved + head_bwd_extra)
    # one block's backward: its recomputed activations (checkpointing), its gradients in the compute dtype and
    # the gradient of the residual stream, with every earlier block's activations still held
    layer_grad_tmp = pc.per_layer * (2 if autocast else 0) + N * (4 * D * 2 + a * c.ffn_hidden * 2)
    if gathered and not adapters:   # the block's unsharded gradient, in bf16 and as the fp32 copy reduce-scattered
        layer_grad_tmp += pc.per_layer * (a + 4)
    phases["backward"] = (base_mem + gradients + copies_head + acts / L + recompute + layer_grad_tmp
                          + (copies_all / L if s.checkpointing == "off" else pc.per_layer * 2 * autocast))
    # the optimizer step: Muon's lerps, Nesterov update and orthogonalised results, four fp32 copies of the
    # hidden matrices at once (kiln/train/muon.py) plus one stack of at most 2^27 elements in bf16 and fp32
    step_tmp = 0.0
    if muon_share:
        stack = min(pc.hidden_matrices, 1 << 27)
        step_tmp = 3 * muon_share * 4 * fo + stack * (4 + 2 * 3)
    phases["optimizer step"] = base_mem + gradients + step_tmp
    phase = max(phases, key=phases.get)
    peak = phases[phase]
    framework = CUDA_CONTEXT + ALLOCATOR_RESERVE * peak
    return TrainMemory(weights=weights, gradients=gradients, optimizer=optimizer, activations=acts,
                       head=head_saved + max(head_fwd_extra, head_bwd_extra), head_saved=head_in + head_saved,
                       autocast_copies=copies_all,
                       phase=phase, peak=peak, framework=framework, total=peak + framework, activations_by_mode=by_mode,
                       phases=phases, cpu=cpu)


def largest_micro_batch(cfg: ModelConfig, s: TrainSetup, budget: float, limit: int = 1 << 14) -> int:
    """The largest micro-batch whose total fits `budget` bytes (0 when even one sequence does not)."""
    from dataclasses import replace

    def fits(mb: int) -> bool:
        return train_memory(cfg, replace(s, micro_batch=mb)).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ---------------------------------------------------------------- inference

@dataclass
class InferMemory:
    weights: float
    kv_cache: float
    activations: float     # prefill's working memory: one block's intermediates and the prompt's logits
    peak: float
    framework: float
    total: float

    def as_dict(self) -> dict:
        return asdict(self)


def infer_memory(cfg: ModelConfig, weight_bytes: float, context: int, batch: int = 1, kv_bytes: float = 2,
                 prefill: int | None = None, compute_bytes: int = 2, all_logits: bool = True) -> InferMemory:
    """Weights + KV cache + the largest prefill transient. `prefill` tokens per sequence are processed in one
    forward (default: the whole context); kiln's forward returns fp32 logits for every position
    (`all_logits`), an engine that keeps only the last position's logits pays for one row."""
    c = cfg.resolved()
    T = context if prefill is None else prefill
    N = batch * T
    kv = kv_cache_bytes(c, context, batch, kv_bytes)
    D, F, V = c.d_model, c.ffn_hidden, c.vocab_size
    a = compute_bytes
    # one block at a time under inference_mode: residual + norm output + q/k/v/attention output + SwiGLU's
    # three F-wide intermediates, then the head's logits in the compute dtype and in fp32
    block = N * (a * D * 3 + a * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * a * F)
    logits = (N if all_logits else batch) * V * (a + 4)
    acts = max(block, logits)
    peak = weight_bytes + kv + acts
    framework = CUDA_CONTEXT + ALLOCATOR_RESERVE * peak
    return InferMemory(weights=weight_bytes, kv_cache=kv, activations=acts, peak=peak, framework=framework,
                       total=peak + framework)


def dtype_weight_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Resident weight bytes of the whole model in `dtype` (bf16/fp16/fp32: every tensor; int8: the matmul
    weights in 8 bits with an fp16 scale per output row, norms and embeddings in bf16)."""
    pc = param_counts(cfg)
    if dtype in ("bf16", "fp16", "f16"):
        return pc.total * 2
    if dtype in ("fp32", "f32"):
        return pc.total * 4
    if dtype == "int8":
        c = cfg.resolved()
        rows = c.depth * (c.n_heads * c.head_dim + 2 * c.n_kv_heads * c.head_dim + c.d_model + 2 * c.ffn_hidden
                          + c.d_model)
        return pc.hidden_matrices * 1 + rows * 2 + (pc.total - pc.hidden_matrices) * 2
    raise ValueError(f"dtype {dtype!r}: bf16, fp16, fp32 or int8")


