"""Typed configuration for every stage.

A recipe (YAML under `recipes/`) is a serialised `Config`: any field left out
keeps its default here. Field docstrings become the CLI's `--help` text.

Values that follow from the one size dial (`model.depth`) are left as `None`
and filled in by `resolve()`; the resolved config is what each stage writes
beside its output.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


CONTENT_TYPES = ("code", "prose")
DOC_STEPS = ("fix_unicode", "normalize", "length_filter", "language", "gopher_quality", "gopher_repetition",
             "c4", "fineweb", "code_quality", "quality_classifier", "pii", "decontaminate")
"""Per-document steps (run in the workers), in their default order; `data.steps` reorders or subsets them."""


@dataclass
class LanguageConfig:
    """Language identification (py3langid, which ships its model; prose only)."""

    enabled: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep."""
    min_score: float = 0.65
    """Drop documents whose top language scores below this (FineWeb: 0.65)."""


@dataclass
class GopherQualityConfig:
    """Gopher quality rules (Rae et al. 2021, as in datatrove), prose only."""

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_avg_word_length: float = 3.0
    max_avg_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    """Hash marks and ellipses per word."""
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    """At least this share of words must hold a letter (datatrove's name for the 80% rule)."""
    min_stop_words: int = 2


@dataclass
class GopherRepetitionConfig:
    """Gopher repetition rules (duplicated lines/paragraphs, top and duplicated n-grams), prose only."""

    enabled: bool = True
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    """Max character share of the most frequent 2-, 3-, 4-gram."""
    dup_n_grams: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])
    """Max character share of duplicated 5- .. 10-grams."""


@dataclass
class C4Config:
    """C4 rules (Raffel et al. 2020): lines without terminal punctuation / too few words / boilerplate are
    removed, documents with lorem ipsum, a curly brace or too few sentences dropped; prose only."""

    enabled: bool = True
    filter_no_terminal_punct: bool = True
    """Remove lines not ending in terminal punctuation (FineWeb turns this off)."""
    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    filter_javascript: bool = True
    filter_curly_brace: bool = True
    filter_lorem_ipsum: bool = True
    filter_policy: bool = True
    """Remove lines mentioning terms of use / privacy policy / cookies."""


@dataclass
class FineWebConfig:
    """FineWeb's own rules (Penedo et al. 2024), prose only."""

    enabled: bool = True
    line_punct_thr: float = 0.12
    """Drop when fewer than this share of lines end in punctuation."""
    short_line_thr: float = 0.67
    short_line_length: int = 30
    """Drop when more than short_line_thr of lines are shorter than this many characters."""
    char_duplicates_ratio: float = 0.01
    """Drop when duplicated lines hold more than this share of characters."""
    new_line_ratio: float = 0.3
    """Drop when there are more newlines than this per word (list-like text)."""


@dataclass
class CodeQualityConfig:
    """Rules for code (StarCoder / The Stack): minified, generated or data-only files; code only."""

    enabled: bool = True
    max_line_length: int = 1000
    max_avg_line_length: float = 100.0
    min_alnum_fraction: float = 0.25


@dataclass
class ClassifierConfig:
    """fastText quality classifier trained from example files (one document per line or .txt/.jsonl)."""

    enabled: bool = False
    positive: list[str] = field(default_factory=list)
    """Files of good examples (same formats as data.sources)."""
    negative: list[str] = field(default_factory=list)
    model_path: str | None = None
    """Load this model instead of training; when training, save it here (default: data/quality.bin)."""
    threshold: float = 0.5
    """Drop documents whose probability of the positive label is below this."""
    epochs: int = 5


@dataclass
class PIIConfig:
    """Replace emails, public IP addresses, phone numbers and Luhn-valid card numbers with placeholders."""

    enabled: bool = True
    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True
    """Prose only: numeric literals in code are too easily read as phone numbers."""
    credit_cards: bool = True
    phone_region: str = "US"
    """Region for phone numbers written without a +country prefix."""


@dataclass
class DecontaminateConfig:
    """Drop or excise documents sharing an n-gram with benchmark files (.jsonl: every string field)."""

    enabled: bool = True
    benchmarks: list[str] = field(default_factory=list)
    """Benchmark files (.txt .md .jsonl ...); empty = step does nothing."""
    n: int = 13
    action: Literal["drop", "excise"] = "drop"


@dataclass
class NearDedupConfig:
    """MinHash LSH near-duplicate removal over word 5-grams (FineWeb: 14 bands x 8 rows)."""

    enabled: bool = True
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    code: bool = False
    """Near-dedup code too. Off: templated code is near-identical by design (the stdlib's 65 encodings/cp*.py
    code pages form one cluster) and exact dedup already removes copies."""


@dataclass
class DataConfig:
    """Data stage: read raw text, clean, filter, dedup, scrub, decontaminate, split into train/val/test Parquet."""

    sources: list[str] = field(default_factory=lambda: ["python-stdlib"])
    """Inputs: files (.txt .md .jsonl .jsonl.gz .jsonl.zst .parquet), directories, globs, or built-in
    sources (`python-stdlib`: the .py files of this interpreter's standard library)."""
    code_sources: list[str] = field(default_factory=list)
    """Sources (as written in `sources`) holding code: prose rules are skipped, code rules applied.
    `python-stdlib` and .py files are code without being listed."""
    prose_sources: list[str] = field(default_factory=list)
    """Sources to treat as prose even where they would be detected as code."""
    text_key: str = "text"
    """Field holding the document text in .jsonl and .parquet inputs."""
    max_docs: int | None = None
    """Stop after this many input documents (quick runs); None reads everything."""
    min_chars: int = 1
    """Documents shorter than this after normalisation are dropped (reason `too_short`)."""
    max_doc_chars: int = 1_000_000
    """Documents longer than this are dropped (reason `too_long`); one huge record must not stall a run."""
    fix_unicode: bool = True
    """Repair mojibake with ftfy (conservative: quotes, widths, HTML entities left alone)."""
    normalize: bool = True
    """Unicode NFC and whitespace normalisation (line endings, trailing spaces, blank-line runs)."""
    steps: list[str] = field(default_factory=lambda: list(DOC_STEPS))
    """Per-document steps in order (a subset may be given); each is also switched on/off by its own section."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    code_quality: CodeQualityConfig = field(default_factory=CodeQualityConfig)
    quality_classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    dedup: bool = True
    """Drop exact duplicates (hash of the normalised text), keeping the first seen."""
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    val_fraction: float = 0.02
    """Share of documents sent to the validation split (by document-id hash)."""
    test_fraction: float = 0.01
    """Share of documents sent to the test split (by document-id hash)."""
    shard_docs: int = 20_000
    """Documents per output Parquet shard."""
    workers: int = 0
    """Processes for the per-file tasks; 0 = one per CPU core."""
    resume: bool = True
    """Reuse finished per-file tasks of an interrupted run with the same config (data/_work/)."""

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one file, directory, glob or `python-stdlib`")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(
                f"data.val_fraction ({self.val_fraction}) and data.test_fraction ({self.test_fraction}) "
                "must each be in [0, 1) and sum to less than 1")
        _positive("data.shard_docs", self.shard_docs)
        _non_negative("data.workers", self.workers)
        for i, name in enumerate(self.steps):
            if name not in DOC_STEPS:
                raise ConfigError(f"data.steps[{i}]={name!r} is not a step; choose from {', '.join(DOC_STEPS)}")
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"data.steps lists a step twice: {self.steps}")
        if not 0 <= self.language.min_score <= 1:
            raise ConfigError(f"data.language.min_score={self.language.min_score} must be in [0, 1]")
        if len(self.gopher_repetition.top_n_grams) != 3 or len(self.gopher_repetition.dup_n_grams) != 6:
            raise ConfigError("data.gopher_repetition.top_n_grams needs 3 values (2-4-grams) and "
                              "data.gopher_repetition.dup_n_grams 6 values (5-10-grams)")
        _positive("data.decontaminate.n", self.decontaminate.n)
        _positive("data.near_dedup.ngram", self.near_dedup.ngram)
        _positive("data.near_dedup.bands", self.near_dedup.bands)
        _positive("data.near_dedup.rows", self.near_dedup.rows)
        q = self.quality_classifier
        if q.enabled and not q.model_path and not (q.positive and q.negative):
            raise ConfigError("data.quality_classifier is enabled but has neither model_path nor both "
                              "positive and negative example files")


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
        from kiln.tokenizer.patterns import check_pattern   # lazy: config must not import tokenizers eagerly
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
    """Width of one attention head."""
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
    init_std: float = 0.02
    """Standard deviation of the normal init of weight matrices (see Transformer.init_weights)."""

    def resolved(self) -> ModelConfig:
        """A copy with every derived field filled in (vocab_size may stay None until a tokenizer exists)."""
        d_model = self.d_model or self.depth * self.aspect_ratio
        n_heads = self.n_heads or max(1, d_model // self.head_dim)
        n_kv_heads = self.n_kv_heads or n_heads
        ffn = self.ffn_hidden or round_up(int(8 * d_model / 3), self.ffn_multiple_of)
        return dataclasses.replace(self, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_hidden=ffn)

    def validate(self) -> None:
        _positive("model.depth", self.depth)
        _positive("model.head_dim", self.head_dim)
        _positive("model.max_seq_len", self.max_seq_len)
        r = self.resolved()
        if r.n_heads * r.head_dim != r.d_model:
            raise ConfigError(
                f"model: n_heads ({r.n_heads}) * head_dim ({r.head_dim}) = {r.n_heads * r.head_dim} "
                f"must equal d_model ({r.d_model}); set model.n_heads or model.head_dim to match")
        if r.n_heads % r.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={r.n_kv_heads} must divide n_heads={r.n_heads}")
        if r.head_dim % 2:
            raise ConfigError(f"model.head_dim={r.head_dim} must be even for RoPE")


@dataclass
class TrainConfig:
    """Pretraining: optimizer, schedule, batch, logging, checkpoints."""

    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one device."""
    batch_tokens: int | None = None
    """Tokens per optimizer step across all devices; reached by gradient accumulation
    (derived: micro_batch_size * seq_len * world_size, i.e. no accumulation)."""
    lr: float | None = None
    """Peak learning rate (derived from width: 6e-4 * sqrt(768 / d_model))."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rate."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """Decay after warmup: cosine, linear, wsd (warmup-stable-decay) or constant."""
    decay_frac: float = 0.2
    """wsd only: share of the steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to 2-D weight matrices only (not norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda`, `cuda:N`."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`bf16` autocast with fp32 master weights, or `fp32`; `auto` = bf16 on CUDA, fp32 on CPU."""
    compile: bool = False
    """Compile the model with torch.compile."""
    threads: int = 0
    """CPU threads for torch (0 = leave torch's default)."""
    eval_every: int = 100
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 20
    """Micro-batches of validation data per periodic evaluation (fixed across runs)."""
    sample_every: int = 0
    """Generate samples from `sample_prompts` every N steps; 0 = never during training."""
    sample_prompts: list[str] = field(default_factory=lambda: ["def ", "class "])
    """Prompts for periodic samples."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest N step checkpoints (the final one is always kept)."""
    log_every: int = 1
    """Log a metrics line every N steps (reading the loss is a host sync on GPU)."""
    seed: int = 1337
    """Seed for init, data order and sampling."""
    resume: bool = False
    """Continue from the newest complete checkpoint in the run directory (`--resume`)."""
    force_resume: bool = False
    """Resume even when the checkpoint was made from different tokens or a different tokenizer (its data
    fingerprint differs); the data loader then restarts at the beginning of the new data if it must."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Data parallelism under `torchrun --nproc_per_node=N -m kiln pretrain ...`: `ddp` (replicated weights,
    all-reduced gradients) or `fsdp` (PyTorch FSDP2 `fully_shard`: weights, gradients and optimizer state
    sharded; bf16 parameters with fp32 gradient reduction when precision is bf16). `none` = one process.
    The global batch (`batch_tokens`) is the same at any process count; each rank takes its share."""
    cpu_offload: bool = False
    """fsdp only: keep sharded parameters, gradients and optimizer state in CPU memory (slower, less VRAM)."""
    milestone_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, beyond `keep_checkpoints`; 0 = none."""
    skip_nonfinite: bool = True
    """Skip the optimizer update of a step whose loss or gradient norm is NaN/Inf (logged as `skipped`)."""
    spike_factor: float = 0.0
    """A logged loss above spike_factor x the running mean of earlier logged losses is a spike; 0 = off."""
    spike_patience: int = 3
    """This many consecutive logged spikes roll back to the newest checkpoint before them and skip the
    batches consumed since (logged as a `rollback` event in metrics.jsonl)."""
    max_rollbacks: int = 3
    """Stop with an error after this many spike rollbacks in one run (the problem is not transient)."""

    def validate(self) -> None:
        _positive("train.max_steps", self.max_steps)
        _positive("train.micro_batch_size", self.micro_batch_size)
        _non_negative("train.warmup_steps", self.warmup_steps)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0 < self.decay_frac <= 1:
            raise ConfigError(f"train.decay_frac={self.decay_frac} must be in (0, 1]")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        _positive("train.checkpoint_every", self.checkpoint_every)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _positive("train.log_every", self.log_every)
        _positive("train.eval_batches", self.eval_batches)
        _non_negative("train.milestone_every", self.milestone_every)
        _non_negative("train.spike_factor", self.spike_factor)
        if 0 < self.spike_factor <= 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be > 1 (a multiple of the running "
                              "mean loss), or 0 to turn spike rollback off")
        _positive("train.spike_patience", self.spike_patience)
        _non_negative("train.max_rollbacks", self.max_rollbacks)
        if self.cpu_offload and self.parallel != "fsdp":
            raise ConfigError(f"train.cpu_offload=true needs train.parallel=fsdp (got {self.parallel!r})")


@dataclass
class EvalConfig:
    """Evaluation of the final checkpoint: loss, perplexity, bits per byte, samples."""

    max_batches: int = 0
    """Validation micro-batches to score; 0 = the whole validation split."""
    batch_size: int = 16
    """Sequences per evaluation batch."""
    prompts: list[str] = field(default_factory=lambda: ["def ", "class ", "import ", "    for i in "])
    """Prompts for the sample generations in the report."""
    max_new_tokens: int = 128
    """Tokens generated per sample."""
    temperature: float = 0.8
    """Sampling temperature for the report's samples."""
    top_k: int | None = 50
    """Top-k filter for the report's samples (None = off)."""

    def validate(self) -> None:
        _non_negative("eval.max_batches", self.max_batches)
        _positive("eval.batch_size", self.batch_size)


@dataclass
class GenerateConfig:
    """`kiln generate`: sample text from a checkpoint with KV-cache decoding."""

    prompt: str = "def "
    """Text to continue."""
    checkpoint: str = "latest"
    """`latest` (newest complete checkpoint of the run) or a checkpoint directory."""
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

    def validate(self) -> None:
        _positive("generate.max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"generate.temperature={self.temperature} must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"generate.top_k={self.top_k} must be >= 1 (or None)")


@dataclass
class Config:
    """A whole kiln run: every stage's settings."""

    name: str = "tiny"
    """Run name; the run directory defaults to runs/<name>."""
    run_dir: str | None = None
    """Directory holding every artifact of the run (default runs/<name>)."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

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
    tokens_per_micro = train.micro_batch_size * m.max_seq_len * world_size
    batch_tokens = train.batch_tokens or tokens_per_micro
    if batch_tokens % tokens_per_micro:
        raise ConfigError(
            f"train.batch_tokens={batch_tokens} must be a multiple of micro_batch_size * max_seq_len * world_size"
            f" = {train.micro_batch_size} * {m.max_seq_len} * {world_size} = {tokens_per_micro}")
    return dataclasses.replace(train, batch_tokens=batch_tokens, lr=train.lr or derived_lr(m.d_model))


def grad_accum_steps(train: TrainConfig, model: ModelConfig, world_size: int = 1) -> int:
    t = resolve_train(train, model, world_size)
    return t.batch_tokens // (train.micro_batch_size * model.max_seq_len * world_size)


# ---------------------------------------------------------------- (de)serialisation

def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types raise ConfigError naming the key."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix + key, list(fields), prefix))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key} must be a mapping of {hint.__name__} fields, got {value!r}")
            kwargs[key] = from_dict(hint, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, hint, value)
    return cls(**kwargs)


def unknown_key_message(key: str, valid: list[str], prefix: str = "") -> str:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean `{prefix}{close[0]}`?" if close else ""
    where = prefix.rstrip(".") or "the top level"
    return f"unknown config key `{key}`.{hint} Valid keys in {where}: {', '.join(valid)}"


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (data:, model:, train:, ...)")
    return data


def dump_yaml(obj: Any, path: str | Path) -> None:
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- recipes

RECIPE_DIRS = (
    Path(__file__).resolve().parent / "recipes",            # installed wheel
    Path(__file__).resolve().parents[2] / "recipes",        # source checkout / editable install
)


def recipe_names() -> list[str]:
    names: set[str] = set()
    for d in RECIPE_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def recipe_path(recipe: str) -> Path:
    """A recipe name (`tiny`) or a path to a YAML file."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file {p} does not exist")
        return p
    for d in RECIPE_DIRS:
        candidate = d / f"{recipe}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"unknown recipe `{recipe}`; built-in recipes: {', '.join(recipe_names())} "
                      "(or give a path to a .yaml file)")


def load_recipe(recipe: str = "tiny", overrides: dict[str, Any] | None = None) -> Config:
    """Load a recipe (name or path), apply nested overrides, validate."""
    data = merge(load_yaml(recipe_path(recipe)), overrides or {})
    return from_dict(Config, data).validate()


def _positive(key: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def _non_negative(key: str, value: int | float) -> None:
    if value < 0:
        raise ConfigError(f"{key}={value} must be >= 0")


def round_up(x: int, multiple: int) -> int:
    return multiple * math.ceil(x / multiple)
