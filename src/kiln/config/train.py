"""Training settings: the one loop's config, used by pretraining (`train`) and by every post-training stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from kiln.config.base import ConfigError
from kiln.config.base import non_negative as _non_negative
from kiln.config.base import positive as _positive
from kiln.config.deepspeed import check_user_config


VOLATILE = {"volatile": True}
"""Field metadata: the setting changes how a run is watched or laid out over devices, not what it produces
(`kiln run` does not redo training when only these differ)."""


def volatile_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("volatile")}


@dataclass
class TrainConfig:
    """Pretraining: optimizer, schedule, batch, logging, checkpoints."""

    max_steps: int | None = 1000
    """Optimizer steps to train for; None = derived from tokens_per_param and the model's size."""
    tokens_per_param: float = 20.0
    """With max_steps None: train on this many tokens per model parameter (~20 is compute-optimal, Hoffmann
    et al. 2022); steps = tokens_per_param x parameters / batch_tokens. The run warns when that repeats the
    data beyond ~4 epochs."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass on one device."""
    batch_tokens: int | None = None
    """Tokens per optimizer step across all devices; reached by gradient accumulation
    (derived: micro_batch_size * seq_len * world_size, i.e. no accumulation)."""
    seq_len: int | None = None
    """Tokens per row of a micro-batch (derived: model.max_seq_len). SFT and DPO set it to their rows'
    length (sft.max_seq_len / dpo.max_seq_len), so batch_tokens counts the tokens they train on."""

    def row_len(self, max_seq_len: int) -> int:
        """Tokens per row: `seq_len`, or the model's context (`max_seq_len`) when unset."""
        return self.seq_len or max_seq_len
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
    optimizer: Literal["adamw", "muon"] = "adamw"
    """`adamw`, or `muon`: Muon for the 2-D hidden weights, AdamW (at `lr`) for embeddings, head and norms."""
    muon_lr: float = 0.02
    """muon only: peak learning rate of the Muon matrices (follows the same warmup and decay shape as `lr`)."""
    muon_momentum: float = 0.95
    """muon only: Nesterov momentum of the Muon matrices."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D weight matrices only (not norms or embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    device: str = field(default="auto", metadata=VOLATILE)
    """`auto` (CUDA if available, else CPU), `cpu`, `cuda`, `cuda:N`."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`bf16` autocast with fp32 master weights, or `fp32`; `auto` = bf16 on CUDA and on CPUs with native bf16
    instructions (AVX512-BF16 or AMX), fp32 on other CPUs."""
    compile: bool = False
    """Compile the model with torch.compile."""
    compile_scope: Literal["model", "blocks"] = "model"
    """With `compile`: `model` traces the whole forward into one graph (the measured path: fusions across
    blocks, the head and its loss included); `blocks` compiles each transformer block in place, and identical
    blocks share one compiled graph, so compilation takes a fraction of the time (a 30-layer LoRA step on the
    CPU: 96 -> 13 s), while the embedding, the final norm and the head run uncompiled. The blocks stay compiled
    for whatever else runs the model in the process (validation, samples, GRPO's rollouts: their first call
    compiles for the generation shapes; a GRPO step on the CPU ran that way)."""
    fp8: Literal["off", "tensorwise", "rowwise"] = "off"
    """Float8 matmuls for every linear layer but lm_head (torchao float8 training; needs `pip install
    'llmkiln[fp8]'` and an H100/L40S/RTX 4090-class GPU). Wins from ~1B parameters (1.13x tokens/s at 1.2B
    on an H100), loses at 124M: see BENCHMARKS.md. `tensorwise` is the faster recipe, `rowwise` the more accurate."""
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """scaled_dot_product_attention backend: `auto` lets PyTorch pick the fastest that fits (on an H100 it
    picks cuDNN's kernels for this model's attention); the others force one, and the run stops before
    training if that backend cannot run the model's attention on this device (see BENCHMARKS.md)."""
    fused_cross_entropy: Literal["auto", "on", "off"] = "auto"
    """Output head + cross-entropy as one fused step that writes the loss's gradient over the logits in place:
    no fp32 logits, one (tokens x vocabulary) buffer instead of several (kiln/train/cross_entropy.py). `auto`:
    on CUDA with Triton; `on`: also on CPU (a PyTorch version of the same arithmetic); not with ZeRO-3."""
    mfu_peak: Literal["datasheet", "measured"] | float = "datasheet"
    """Per-GPU peak FLOP/s that the logged MFU is measured against: `datasheet` (the vendor's dense bf16
    peak from kiln's table; an unknown GPU gets a warning and no MFU), `measured` (a square matmul timed on
    this device at start, in the training dtype) or a number in TFLOP/s. FLOPs per token: 6 x matmul
    weights + the attention term (Transformer.flops_per_token)."""
    activation_checkpointing: Literal["off", "block", "selective"] = field(default="off", metadata=VOLATILE)
    """Trade compute for memory: `block` recomputes each block in backward, `selective` keeps matmul and
    attention outputs and recomputes the element-wise ops (see kiln/train/memory.py)."""
    threads: int = field(default=0, metadata=VOLATILE)
    """CPU threads for torch (0 = leave torch's default)."""
    eval_every: int = field(default=100, metadata=VOLATILE)
    """Validation loss every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 20
    """Micro-batches of validation data per periodic evaluation (fixed across runs)."""
    sample_every: int = field(default=0, metadata=VOLATILE)
    """Generate samples from `sample_prompts` every N steps; 0 = never during training."""
    sample_prompts: list[str] = field(default_factory=lambda: ["def ", "class "], metadata=VOLATILE)
    """Prompts for periodic samples."""
    checkpoint_every: int = field(default=500, metadata=VOLATILE)
    """Write a checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = field(default=2, metadata=VOLATILE)
    """Keep the newest N step checkpoints (the final one is always kept)."""
    log_every: int = field(default=1, metadata=VOLATILE)
    """Log a metrics line every N steps (reading the loss is a host sync on GPU)."""
    seed: int = 1337
    """Seed for init, data order and sampling."""
    resume: bool = field(default=False, metadata=VOLATILE)
    """Continue from the newest complete checkpoint in the run directory (`--resume`)."""
    packing: Literal["concat", "bestfit"] = "concat"
    """How documents fill training rows: `concat` (one stream cut every seq_len tokens, EOS between documents)
    or `bestfit` (every row starts at a document start with BOS; leftover space is padding the loss ignores)."""
    prefetch: int = field(default=2, metadata=VOLATILE)
    """Batches a background thread prepares ahead of the training step (0 = none)."""
    pin_memory: bool = field(default=True, metadata=VOLATILE)
    """Pinned host memory for batches on CUDA, so the copy to the GPU overlaps compute."""
    force_resume: bool = field(default=False, metadata=VOLATILE)
    """Resume even when the checkpoint was made from different tokens or a different tokenizer (its data
    fingerprint differs); the data loader then restarts at the beginning of the new data if it must."""
    parallel: Literal["none", "ddp", "fsdp", "deepspeed"] = field(default="none", metadata=VOLATILE)
    """Data parallelism under `torchrun --nproc_per_node=N -m kiln pretrain ...`: `ddp` (replicated weights,
    all-reduced gradients), `fsdp` (PyTorch FSDP2 `fully_shard`: weights, gradients and optimizer state
    sharded; bf16 parameters with fp32 gradient reduction when precision is bf16) or `deepspeed` (DeepSpeed
    ZeRO at `zero_stage`; needs `pip install 'llmkiln[deepspeed]'`). `none` = one process.
    The global batch (`batch_tokens`) is the same at any process count; each rank takes its share."""
    zero_stage: int = field(default=2, metadata=VOLATILE)
    """deepspeed only: ZeRO stage. 1 shards the optimizer state, 2 also the gradients, 3 also the weights."""
    deepspeed_config: str | None = field(default=None, metadata=VOLATILE)
    """deepspeed only: a DeepSpeed JSON config merged into the one kiln derives (ZeRO tuning, offload,
    communication...). Keys kiln owns (batch sizes, accumulation, clipping, precision, ZeRO stage) must agree
    with kiln's values or be "auto"; `optimizer` and `scheduler` are kiln's (see kiln/train/zero.py)."""
    cpu_offload: bool = field(default=False, metadata=VOLATILE)
    """fsdp only: keep sharded parameters, gradients and optimizer state in CPU memory (slower, less VRAM)."""
    keep_best: bool = True
    """Also keep the checkpoint with the lowest validation loss so far, in checkpoints/best/ (rewritten when
    a periodic evaluation improves on it). A long run on a small corpus can overfit, leaving the final
    checkpoint worse than an earlier one: `--eval.checkpoint best` / `--generate.checkpoint best` use it."""
    milestone_every: int = field(default=0, metadata=VOLATILE)
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
        if self.max_steps is None:
            if not self.tokens_per_param > 0:
                raise ConfigError("train.max_steps is None, so train.tokens_per_param must be > 0 to derive the "
                                  f"horizon (got {self.tokens_per_param}); set one of them")
        else:
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
        if not isinstance(self.mfu_peak, str) and not self.mfu_peak > 0:
            raise ConfigError(f"train.mfu_peak={self.mfu_peak} must be `datasheet`, `measured` or a peak in "
                              "TFLOP/s > 0 (an H100 SXM's datasheet bf16 peak is 989)")
        _non_negative("train.prefetch", self.prefetch)
        if self.muon_lr <= 0 or not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"train.muon_lr={self.muon_lr} must be > 0 and train.muon_momentum="
                              f"{self.muon_momentum} in [0, 1)")
        _non_negative("train.milestone_every", self.milestone_every)
        _non_negative("train.spike_factor", self.spike_factor)
        if 0 < self.spike_factor <= 1:
            raise ConfigError(f"train.spike_factor={self.spike_factor} must be > 1 (a multiple of the running "
                              "mean loss), or 0 to turn spike rollback off")
        _positive("train.spike_patience", self.spike_patience)
        _non_negative("train.max_rollbacks", self.max_rollbacks)
        if self.cpu_offload and self.parallel != "fsdp":
            hint = (": DeepSpeed offloads through zero_optimization.offload_optimizer / offload_param in "
                    "train.deepspeed_config" if self.parallel == "deepspeed" else "")
            raise ConfigError(f"train.cpu_offload=true needs train.parallel=fsdp (got {self.parallel!r}){hint}")
        self._validate_deepspeed()
        if self.fused_cross_entropy == "on" and self.parallel == "deepspeed" and self.zero_stage == 3:
            raise ConfigError("train.fused_cross_entropy=on does not work with DeepSpeed ZeRO-3 (ZeRO-3 gathers the "
                              "head's weight in hooks on the module's own forward, which the fused head bypasses); "
                              "use auto (off under ZeRO-3) or off")
        if self.fp8 != "off" and self.parallel == "deepspeed":
            raise ConfigError("train.fp8 with train.parallel=deepspeed is not supported (ZeRO partitions the "
                              "parameters torchao's Float8Linear casts); use --train.parallel fsdp or ddp for fp8")

    def _validate_deepspeed(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be 1, 2 or 3")
        if self.parallel != "deepspeed":
            if self.deepspeed_config is not None:
                raise ConfigError(f"train.deepspeed_config is set but train.parallel={self.parallel!r}: "
                                  "add --train.parallel deepspeed, or drop the DeepSpeed config")
            return
        if self.optimizer == "muon":
            raise ConfigError("train.optimizer=muon with train.parallel=deepspeed is not supported: ZeRO flattens "
                              "and partitions the parameters over the ranks and Muon orthogonalises whole matrices; "
                              "use --train.optimizer adamw with deepspeed, or --train.parallel ddp for Muon")
        if self.compile:
            raise ConfigError("train.compile=true with train.parallel=deepspeed is not supported (the DeepSpeed "
                              "engine installs its own hooks around the module); drop --train.compile")
        check_user_config(self)
