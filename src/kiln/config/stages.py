"""Configuration of the tokenizer, model, training, evaluation and generation stages, and the whole `Config`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln.config.base import ConfigError, round_up
from kiln.config.base import non_negative as _non_negative
from kiln.config.base import positive as _positive
from kiln.config.data import DataConfig
from kiln.config.deepspeed import check_user_config
from kiln.config.eval import EvalConfig
from kiln.config.patterns import check_pattern
from kiln.config.post import DPOConfig, GRPOConfig, SFTConfig
from kiln.config.train import VOLATILE, TrainConfig, volatile_fields  # noqa: F401  (re-exported)


@dataclass
class TokenizerConfig:
    """Tokenizer stage: train a byte-level BPE on the training split."""

    vocab_size: int = 4096
    """Total vocabulary size, special and reserved tokens included."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    n_reserved: int = 16
    """Spare reserved special tokens `<|reserved_0|>`... kept for later use (e.g. new chat roles)."""
    max_train_bytes: int = 0
    """Train on at most this many bytes of text, sampled evenly across the split; 0 = all of it."""
    vocab_multiple: int = 64
    """Round vocab_size up to a multiple of this (matmul efficiency; 128 suits tensor cores best); 1 = as given."""
    pattern: str = "gpt4"
    """Pre-tokenisation split: `gpt4` (cl100k / Llama 3: digits in groups of 1-3), `gpt4-digits` (every digit
    alone), `gpt2`, or a regex of your own."""
    eval_reference: list[str] = field(default_factory=list)
    """Reference tokenizers for `kiln tokenizer eval`: tokenizer.json paths (or folders holding one), tiktoken
    BPE files (base64 token + rank per line), or folders with GPT-2's encoder.json + vocab.bpe."""

    def validate(self) -> None:
        _positive("tokenizer.vocab_multiple", self.vocab_multiple)
        try:
            check_pattern(self.pattern)
        except ValueError as e:
            raise ConfigError(f"tokenizer.pattern: {e}") from None
        if self.vocab_size < 256 + 8 + self.n_reserved:
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} is too small: a byte-level BPE needs 256 byte "
                f"tokens plus {7 + self.n_reserved} special tokens; use at least {256 + 8 + self.n_reserved}")
        _non_negative("tokenizer.n_reserved", self.n_reserved)
        _positive("tokenizer.min_frequency", self.min_frequency)
        _non_negative("tokenizer.max_train_bytes", self.max_train_bytes)


@dataclass
class TokenizeConfig:
    """Tokenize stage: encode the train/val splits into Parquet token shards."""

    workers: int = 0
    """Processes encoding shards in parallel; 0 = automatic (tokenizers already encodes on several threads,
    so one process per 4 cores, capped by the shard count)."""
    batch_docs: int = 1000
    """Documents encoded per batch (bounds memory per worker)."""

    def validate(self) -> None:
        _non_negative("tokenize.workers", self.workers)
        _positive("tokenize.batch_docs", self.batch_docs)


@dataclass
class ModelConfig:
    """Decoder-only transformer (Llama layout). `depth` is the one size dial; the rest follows."""

    depth: int = 4
    """Number of transformer blocks: the size dial. Width, heads and FFN follow from it."""
    aspect_ratio: int = 64
    """d_model = depth * aspect_ratio, unless d_model is set."""
    d_model: int | None = None
    """Residual stream width (derived from depth when None)."""
    head_dim: int = 64
    """Width of one attention head. n_heads * head_dim may differ from d_model (Qwen3 does that)."""
    n_heads: int | None = None
    """Query heads (derived: d_model // head_dim)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; must divide n_heads (derived: n_heads, i.e. MHA)."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width (derived: 8/3 * d_model rounded up to ffn_multiple_of)."""
    ffn_multiple_of: int = 64
    """Round the derived FFN width up to a multiple of this (matmul efficiency)."""
    vocab_size: int | None = None
    """Embedding rows (derived: the trained tokenizer's vocabulary size rounded up to a multiple of 64)."""
    max_seq_len: int = 256
    """Context length: the training sequence length and the longest generation context."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output head."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head before RoPE (stabilises training at scale)."""
    qkv_bias: bool = False
    """A bias on the query, key and value projections (Qwen2 / Qwen2.5 have one; the output projection none)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of weight matrices (see Transformer.init_weights)."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling as Hugging Face writes it (`rope_scaling` in config.json), e.g. Llama 3.1's
    {rope_type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings:
    8192}; `linear` ({rope_type: linear, factor}) too. None: plain RoPE."""

    def resolved(self) -> ModelConfig:
        """A copy with every derived field filled in (vocab_size may stay None until a tokenizer exists)."""
        d_model = self.d_model or self.depth * self.aspect_ratio
        n_heads = self.n_heads or max(1, d_model // self.head_dim)
        n_kv_heads = self.n_kv_heads or n_heads
        ffn = self.ffn_hidden or round_up(int(8 * d_model / 3), self.ffn_multiple_of)
        return dataclasses.replace(self, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_hidden=ffn)

    def num_params(self) -> int:
        """Parameters of the model this config builds (a tied matrix once), by arithmetic: the size the plan
        and the training horizon use before any weight exists. Equals Transformer(cfg).num_params()."""
        c = self.resolved()
        if c.vocab_size is None:
            raise ValueError("model.vocab_size is not set: the parameter count needs the vocabulary")
        attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + (2 * c.head_dim if c.qk_norm else 0) \
            + (c.head_dim * (c.n_heads + 2 * c.n_kv_heads) if c.qkv_bias else 0)
        block = attn + 3 * c.d_model * c.ffn_hidden + 2 * c.d_model
        embed = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
        return embed + c.depth * block + c.d_model

    def validate(self) -> None:
        _positive("model.depth", self.depth)
        _positive("model.head_dim", self.head_dim)
        _positive("model.max_seq_len", self.max_seq_len)
        r = self.resolved()
        if r.n_heads % r.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={r.n_kv_heads} must divide n_heads={r.n_heads}")
        if r.head_dim % 2:
            raise ConfigError(f"model.head_dim={r.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.qk_norm and self.qkv_bias:
            raise ConfigError("model.qk_norm and model.qkv_bias together match no published architecture (Qwen3 "
                              "has the norms, Qwen2 the biases), so the model could not be exported; choose one")


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
"""The RoPE scalings the model implements, and the keys each needs."""


def check_rope_scaling(rs: dict) -> None:
    kind = rs.get("rope_type", rs.get("type"))
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"model.rope_scaling: rope_type {kind!r} is not supported; supported: "
                          f"{', '.join(ROPE_SCALING_KEYS)} (or null for plain RoPE)")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(rs.get(k), (int, float))]
    if missing:
        raise ConfigError(f"model.rope_scaling ({kind}) lacks numeric {', '.join(missing)}")


def model_diff(saved: ModelConfig, now: ModelConfig) -> list[str]:
    """`field: saved -> now` for each field two model configs differ in: the one comparison of model configs
    (a resume, `kiln run` deciding whether training can continue)."""
    return [f"model.{f.name}: {getattr(saved, f.name)!r} -> {getattr(now, f.name)!r}"
            for f in dataclasses.fields(ModelConfig) if getattr(saved, f.name) != getattr(now, f.name)]


@dataclass
class GenerateConfig:
    """`kiln generate`: sample text from a checkpoint with KV-cache decoding."""

    prompt: str = "def "
    """Text to continue."""
    checkpoint: str = "latest"
    """`latest` (newest complete checkpoint of the run), `best` (lowest validation loss during training) or a
    checkpoint directory."""
    max_new_tokens: int = 200
    """Stop after this many new tokens."""
    temperature: float = 0.8
    """Softmax temperature; 0 = greedy."""
    top_k: int | None = 50
    """Keep only the k most likely tokens (None = off)."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens with this much probability (None = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop when one of these strings is generated (the EOS token always stops)."""
    seed: int = 0
    """Sampling seed."""
    num_samples: int = 1
    """Independent samples to draw."""
    chat: bool = False
    """Treat the prompt as a user message: render it with the tokenizer's chat template (kiln's own or an
    imported model's), generate the assistant's reply, stop at its end-of-turn token."""
    system: str | None = None
    """With `chat`: a system message before the user's."""

    def validate(self) -> None:
        _positive("generate.max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"generate.temperature={self.temperature} must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"generate.top_k={self.top_k} must be >= 1 (or None)")


@dataclass
class ImportConfig:
    """`kiln import SRC`: a Hugging Face folder or a .gguf file made into a run directory."""

    source: str | None = None
    """The model to import: a local Hugging Face folder (config.json, safetensors, tokenizer.json +
    tokenizer_config.json) or a .gguf file. Given as the first argument of `kiln import`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the weights are stored in: auto = the folder's own (config.json torch_dtype), float32 for GGUF
    (dequantised exactly)."""
    max_shard_gb: float = 5.0
    """Weights larger than this are written as shards with an index (as transformers does)."""

    def validate(self) -> None:
        if self.max_shard_gb <= 0:
            raise ConfigError(f"importing.max_shard_gb={self.max_shard_gb} must be > 0")


@dataclass
class ExportConfig:
    """`kiln export --format hf|gguf|peft`: a checkpoint as a Hugging Face folder or a GGUF file (a LoRA run's
    merged), or a LoRA run's adapter in the PEFT format."""

    format: Literal["hf", "gguf", "peft"] = "hf"
    """hf: a folder that transformers, vLLM and SGLang load; gguf: one file for llama.cpp and Ollama; peft: the
    adapter of a LoRA run (adapter_config.json + adapter_model.safetensors) for PEFT on the base model."""
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k_m"] | None = None
    """Weight type. hf: f32, f16 or bf16 (default: as stored); gguf: f32 … q4_k_m (default f16)."""
    out: str | None = None
    """Output folder (hf, peft) or file (gguf); default <run_dir>/export/hf, <run_dir>/export/model-<quant>.gguf
    or <run_dir>/export/adapter."""
    checkpoint: str = "latest"
    """`latest`, `best` or a checkpoint directory."""
    max_shard_gb: float = 5.0
    """hf: weights larger than this are sharded with a model.safetensors.index.json."""

    def validate(self) -> None:
        if self.format == "hf" and self.quant not in (None, "f32", "f16", "bf16"):
            raise ConfigError(f"export.quant={self.quant} is a GGUF type; the hf format stores f32, f16 or bf16 "
                              "(use --format gguf to quantise)")
        if self.format == "peft" and self.quant is not None:
            raise ConfigError(f"export.quant={self.quant}: --format peft writes the adapter as trained (fp32); "
                              "drop --quant, or export the merged model with --format hf or gguf")
        if self.max_shard_gb <= 0:
            raise ConfigError(f"export.max_shard_gb={self.max_shard_gb} must be > 0")


@dataclass
class EstimateConfig:
    """`kiln estimate`: parameters, memory, tokens, FLOPs, time and cost by arithmetic (kiln/plan/), before any
    run. Left at None/auto, a setting follows the recipe's model and train sections."""

    model: str | None = None
    """A preset (124m, 350m, 1b, 3b, 7b/8b, 13b, 70b), a Hugging Face folder or config.json, or None for the
    recipe's model (`kiln estimate 7b` sets this)."""
    seq_len: int | None = None
    """Training sequence length (default: the model's max_seq_len)."""
    micro_batch: int | None = None
    """Sequences per GPU per forward (default: train.micro_batch_size; the largest that fits is reported too)."""
    batch_tokens: int | None = None
    """Tokens per optimizer step over all GPUs, reached by accumulation (default: train.batch_tokens)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 (autocast over fp32 weights, or bf16 weights under FSDP2 / ZeRO / LoRA) or fp32."""
    optimizer: Literal["auto", "adamw", "muon", "adamw8bit"] = "auto"
    """auto = train.optimizer; adamw8bit = bitsandbytes-style 8-bit states (estimate only: kiln trains with adamw/muon)."""
    parallel: Literal["auto", "none", "ddp", "fsdp", "zero1", "zero2", "zero3"] = "auto"
    """Sharding over `gpus`: ddp replicates; fsdp (FSDP2) and zero3 shard weights, gradients and optimizer
    state; zero2 gradients and optimizer state; zero1 the optimizer state. auto = train.parallel."""
    gpus: int = 1
    """GPUs in the job (data parallel)."""
    cpu_offload: bool | None = None
    """Keep parameters, gradients and optimizer state in CPU memory (FSDP2 / ZeRO offload); None = train.cpu_offload."""
    activation_checkpointing: Literal["auto", "off", "block", "selective"] = "auto"
    """auto = train.activation_checkpointing; all three are reported, this one decides the peak."""
    finetune: Literal["full", "lora", "qlora"] = "full"
    """full (every weight trained), lora (bf16 base frozen, adapters trained) or qlora (NF4 base)."""
    lora_rank: int = 16
    """LoRA rank r: r x (in + out) adapter weights per targeted linear."""
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    """Linears that get adapters: q, k, v, o, gate, up, down."""
    loss_share: float = 1.0
    """Share of each sequence's positions the loss is computed on, in (0, 1]: 1 for pretraining; for SFT, DPO and
    GRPO, which run the output head on the trained tokens only, the assistant (answer, completion) tokens' share
    (`kiln sft` prints its count of assistant tokens). Scales the head's logits memory and FLOPs."""
    gpu: str = "h100"
    """Hardware from kiln's table (h100, h100-pcie, h200, a100-80gb, a100-40gb, l40s, l4, rtx-4090, rtx-3090,
    apple-m4-max, apple-m3-ultra, apple-m2-ultra) or any name with gpu_memory_gb and gpu_tflops."""
    gpu_memory_gb: float | None = None
    """Memory per GPU in GiB (overrides the table; required for hardware it lacks)."""
    gpu_tflops: float | None = None
    """Dense bf16 TFLOP/s per GPU (overrides the table; required for hardware without a published figure)."""
    mfu: float | None = None
    """Model FLOPs utilisation for the time estimate (default: kiln's measured MFU at the nearest size, BENCHMARKS.md)."""
    price_per_gpu_hour: float = 2.0
    """Price of one GPU-hour in your currency (an assumption: set your provider's)."""
    tokens: float | None = None
    """Training tokens; None = tokens_per_param x parameters."""
    tokens_per_param: float | None = None
    """Training tokens per parameter (default: train.tokens_per_param; Chinchilla's compute-optimal is 20)."""
    context: int | None = None
    """Inference context for the KV cache (default: seq_len)."""
    infer_batch: int = 1
    """Sequences decoded at once (KV cache and prefill scale with it)."""
    json: bool = False
    """Print the estimate as JSON instead of the table (`--json`)."""

    def validate(self) -> None:
        for key in ("seq_len", "micro_batch", "batch_tokens", "context", "gpu_memory_gb", "gpu_tflops", "tokens",
                    "tokens_per_param"):
            if getattr(self, key) is not None:
                _positive(f"estimate.{key}", getattr(self, key))
        _positive("estimate.gpus", self.gpus)
        _positive("estimate.lora_rank", self.lora_rank)
        _positive("estimate.infer_batch", self.infer_batch)
        _non_negative("estimate.price_per_gpu_hour", self.price_per_gpu_hour)
        if not 0 < self.loss_share <= 1:
            raise ConfigError(f"estimate.loss_share={self.loss_share} must be in (0, 1] (0.3 = the loss on 30% of "
                              "the positions, an SFT set's assistant tokens say)")
        if self.mfu is not None and not 0 < self.mfu <= 1:
            raise ConfigError(f"estimate.mfu={self.mfu} must be in (0, 1] (0.4 = 40% of the peak)")
        bad = [t for t in self.lora_targets if t not in ("q", "k", "v", "o", "gate", "up", "down")]
        if bad:
            raise ConfigError(f"estimate.lora_targets: {bad} unknown; choose among q, k, v, o, gate, up, down")


@dataclass
class ServeConfig:
    """`kiln serve` (OpenAI-compatible HTTP API and chat page) and `kiln chat` (terminal): a run's model behind
    the batched engine."""

    checkpoint: str = "latest"
    """`latest`, `best` or a checkpoint directory of the run (an imported run has one: step 0)."""
    adapter: str | None = None
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT's save_pretrained
    or `kiln export --format peft` writes it), merged into the run's model at load: a base model plus an
    adapter trained elsewhere."""
    lora_modules: list[str] = field(default_factory=list)
    """Several PEFT LoRA adapters served beside the base, each under its own model name, as `NAME=DIR`: a request
    whose `model` is NAME gets that adapter, one naming the base gets none, all in one batch (unmerged: two thin
    matmuls per adapted layer, no compiled step; kiln/infer/adapters.py)."""
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the server on this machine (`0.0.0.0` opens it to the network: set
    api_key then)."""
    port: int = 8000
    """TCP port."""
    model_name: str | None = None
    """The model's name in the API (`model` of requests, /v1/models); default: the run directory's name."""
    api_key: str | None = None
    """Require `Authorization: Bearer <key>` on /v1/*; default: the KILN_API_KEY environment variable, if set."""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cuda, cuda:N or cpu."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and KV cache dtype: auto = bfloat16 on CUDA, float32 on CPU."""
    quantize: Literal["none", "int8"] = "none"
    """int8: weight-only int8 (per-channel scales) of the attention and MLP projections, activations in `dtype`;
    the embedding and head stay (SmolLM2-135M in bf16: 257 -> 156 MiB of weights, perplexity +0.1%:
    bench/int8_quality.py). On CPU it is faster only with dtype bfloat16; on CUDA it saves memory, not time
    (kiln/infer/quant.py says why)."""
    max_batch: int = 16
    """Sequences decoded at once (engine slots; a request of n samples takes n)."""
    max_len: int | None = None
    """Context per sequence, prompt plus output (default: the model's max_seq_len); the KV cache holds
    max_batch x max_len positions."""
    max_queue: int = 64
    """Requests waiting for a slot beyond which new ones get 503."""
    max_tokens_limit: int | None = None
    """Largest `max_tokens` a request may ask for (default: the context)."""
    max_request_bytes: int = 4_000_000
    """Largest request body; a larger one gets 413."""
    cuda_graphs: bool = True
    """Capture the decode step in CUDA graphs (CUDA only)."""
    compile: bool = False
    """torch.compile the decode step (before capturing its CUDA graphs on a GPU): fewer, fused kernels per layer.
    Costs compilation time at start (minutes; more slots, more buckets). Measured: 1.85-2.7x decode on an H100;
    on a 2-core CPU 1.48x at batch 1 (a terminal chat) and ~1.1x at 8 (BENCHMARKS.md)."""
    system: str | None = None
    """`kiln chat`: a system message that starts every conversation."""
    temperature: float = 0.7
    """`kiln chat`: sampling temperature (0 = greedy)."""
    max_tokens: int = 512
    """`kiln chat`: most tokens per reply."""

    def validate(self) -> None:
        for key in ("port", "max_batch", "max_queue", "max_request_bytes", "max_tokens"):
            _positive(f"serve.{key}", getattr(self, key))
        for key in ("max_len", "max_tokens_limit"):
            if getattr(self, key) is not None:
                _positive(f"serve.{key}", getattr(self, key))
        if self.port > 65535:
            raise ConfigError(f"serve.port={self.port} must be at most 65535 (a TCP port)")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"serve.temperature={self.temperature} must be in [0, 2]")
        self.lora_dirs()

    def lora_dirs(self) -> dict[str, str]:
        """`lora_modules` as {name: directory}, each entry checked."""
        out: dict[str, str] = {}
        for entry in self.lora_modules:
            name, sep, folder = str(entry).partition("=")
            name, folder = name.strip(), folder.strip()
            if not sep or not name or not folder:
                raise ConfigError(f"serve.lora_modules: {entry!r} is not NAME=DIR (a model name for the API, then "
                                  "the PEFT adapter's directory)")
            if name in out or name == self.model_name:
                raise ConfigError(f"serve.lora_modules: the name {name!r} is used twice; each model name must be "
                                  "unique")
            out[name] = folder
        return out


@dataclass
class Config:
    """A whole kiln run: every stage's settings."""

    name: str = "tiny"
    """Run name; the run directory defaults to runs/<name>."""
    run_dir: str | None = None
    """Directory holding every artifact of the run (default runs/<name>)."""
    overwrite: bool = False
    """Replace a stage's finished output (checkpoints included) when this run would redo it: without it a
    stage refuses and says what exists (`--overwrite true`)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    importing: ImportConfig = field(default_factory=ImportConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    post: list[Literal["sft", "dpo", "grpo"]] = field(default_factory=list)
    """Post-training stages `kiln run` runs after pretraining and eval, in order, each starting from the one
    before (dpo and grpo from <run_dir>/sft when it exists): e.g. [sft, grpo]."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- derived values

def derived_lr(d_model: int) -> float:
    """Peak AdamW learning rate from width: 6e-4 at GPT-2 small's 768, scaled by 1/sqrt(width)."""
    return 6e-4 * math.sqrt(768 / d_model)


def resolve_train(train: TrainConfig, model: ModelConfig, world_size: int = 1) -> TrainConfig:
    """Fill in the derived training values and check the batch divides into micro-batches."""
    m = model.resolved()
    tokens_per_micro = train.micro_batch_size * train.row_len(m.max_seq_len) * world_size
    batch_tokens = train.batch_tokens or tokens_per_micro
    if batch_tokens % tokens_per_micro:
        raise ConfigError(
            f"train.batch_tokens={batch_tokens} must be a multiple of micro_batch_size * seq_len * world_size"
            f" = {train.micro_batch_size} * {train.row_len(m.max_seq_len)} * {world_size} = {tokens_per_micro}")
    max_steps = train.max_steps
    if max_steps is None and m.vocab_size is not None:   # the horizon needs the parameter count
        max_steps = max(1, math.ceil(train.tokens_per_param * m.num_params() / batch_tokens))
    return dataclasses.replace(train, batch_tokens=batch_tokens, lr=train.lr or derived_lr(m.d_model),
                               max_steps=max_steps)


def grad_accum_steps(train: TrainConfig, model: ModelConfig, world_size: int = 1) -> int:
    t = resolve_train(train, model, world_size)
    return t.batch_tokens // (train.micro_batch_size * train.row_len(model.max_seq_len) * world_size)
