"""`kiln eval`'s configuration: perplexity, divergence, memorisation, prompt suites and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kiln.config.base import ConfigError
from kiln.config.base import non_negative as _non_negative
from kiln.config.base import positive as _positive

BENCHMARKS = ("mmlu", "humaneval", "maths", "bigbench", "mc")
MC_FORMATS = ("letter", "cloze")


@dataclass
class BenchmarkConfig:
    """One benchmark. In a list a plain string names one: `mmlu`, `humaneval`, `maths`, `bigbench:PATH`
    (a BIG-bench task.json or its folder), `mc:PATH` (a multiple-choice JSONL file, docs/eval_formats.md)."""

    name: Literal["mmlu", "humaneval", "maths", "bigbench", "mc"] = "mmlu"
    path: str | None = None
    """bigbench: the task.json (or its folder); mc: the JSONL file."""
    formats: list[str] = field(default_factory=lambda: ["letter", "cloze"])
    """Multiple choice (mmlu, mc): `letter` (the original MMLU prompt, answers ' A'..' D') and/or `cloze`
    (the answer text scored, raw and length-normalised)."""
    shots: int | None = None
    """Worked examples before each item (mmlu, mc: other items of the same subject; maths: other generated
    problems; bigbench: the task's own examples). None = the benchmark's usual: 5 for maths on a base model
    (lm-eval's gsm8k), 0 otherwise."""
    limit: int = 0
    """Score the first N items only (0 = all)."""
    samples: int = 1
    """humaneval: completions per problem; pass@k is reported for k = 1, 10, 100 up to this."""
    temperature: float = 0.0
    """humaneval and maths: 0 = greedy; sampling several completions needs > 0 (Codex's pass@k: 0.8)."""
    max_new_tokens: int = 512
    """Tokens generated per answer (humaneval, maths, generative bigbench)."""
    task: str = "gsm_symbolic"
    """maths: the reasoning-gym generator (`gsm_symbolic`: GSM8K's templates; `basic_arithmetic`, ...)."""
    items: int = 200
    """maths: problems generated."""
    seed: int = 0
    """Generation of maths problems and sampling."""

    def validate(self, key: str) -> None:
        if self.name in ("bigbench", "mc") and not self.path:
            raise ConfigError(f"{key}: {self.name} needs a path (`{self.name}:PATH`)")
        bad = [f for f in self.formats if f not in MC_FORMATS]
        if bad or not self.formats:
            raise ConfigError(f"{key}.formats={self.formats}: choose from {', '.join(MC_FORMATS)}")
        for name in ("limit", "seed"):
            _non_negative(f"{key}.{name}", getattr(self, name))
        if self.shots is not None:
            _non_negative(f"{key}.shots", self.shots)
        for name in ("samples", "max_new_tokens", "items"):
            _positive(f"{key}.{name}", getattr(self, name))
        _non_negative(f"{key}.temperature", self.temperature)
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"{key}: {self.samples} samples at temperature 0 would all be the same greedy answer; "
                              "set temperature (0.8 is Codex's for pass@k)")

    @classmethod
    def parse(cls, value: str | dict, key: str) -> BenchmarkConfig:
        from kiln.config.base import from_dict

        if isinstance(value, str):
            name, _, path = value.partition(":")
            if name not in BENCHMARKS:
                raise ConfigError(f"{key}={value!r}: unknown benchmark; choose from {', '.join(BENCHMARKS)}")
            value = {"name": name, **({"path": path} if path else {})}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a benchmark name or a mapping of its fields, got {value!r}")
        return from_dict(cls, value, prefix=f"{key}.")


@dataclass
class MemorisationConfig:
    """Greedy continuations of training and unseen text, matched against the training tokens."""

    enabled: bool = True
    """Measure when the run has training tokens (a run made by `kiln tokenize`)."""
    documents: int = 64
    """Prompts from training documents, and as many from unseen (validation) ones."""
    prefix_tokens: int = 32
    """Tokens of each document given as the prompt."""
    new_tokens: int = 64
    """Tokens generated greedily after it."""
    threshold: int = 50
    """A generation counts as memorised when it shares at least this many consecutive tokens with the
    training data (Carlini et al.'s 50-token extractability)."""
    max_index_tokens: int = 50_000_000
    """Training tokens indexed at most (the index holds about 8 bytes per token)."""

    def validate(self) -> None:
        for name in ("documents", "prefix_tokens", "new_tokens", "threshold", "max_index_tokens"):
            _positive(f"eval.memorisation.{name}", getattr(self, name))
        if self.threshold > self.new_tokens:
            raise ConfigError(f"eval.memorisation.threshold={self.threshold} exceeds new_tokens={self.new_tokens}: "
                              "no generation could reach it")


@dataclass
class EvalConfig:
    """`kiln eval`: loss, perplexity and bits per byte, train/val gap and divergence, memorisation, prompt
    suites, benchmarks with a report card, samples. The final checkpoint by default."""

    checkpoint: str = "latest"
    """`latest` (newest complete checkpoint of the run), `best` (lowest validation loss during training,
    train.keep_best) or a checkpoint directory."""
    max_batches: int = 0
    """Validation micro-batches to score; 0 = the whole validation split."""
    batch_size: int = 16
    """Sequences per evaluation batch (perplexity, scoring and generation)."""
    files: list[str] = field(default_factory=list)
    """Text files (or globs) whose loss, perplexity and bits per byte to report, each scored whole with a
    sliding window."""
    stride: int = 0
    """Sliding window step for `files`, in tokens: each window scores the tokens it adds, seeing up to
    `context - stride` before them (0 = the whole context: disjoint windows)."""
    benchmarks: list[str | BenchmarkConfig] = field(default_factory=list)
    """Benchmarks to score (see BenchmarkConfig): e.g. `[mmlu, humaneval, maths, bigbench:tasks/x]`."""
    chat: Literal["auto", "yes", "no"] = "auto"
    """Prompt benchmarks through the chat template: `auto` = yes for a post-trained checkpoint
    (SFT/DPO/GRPO), no otherwise (a base or imported model gets the field's base-model prompts)."""
    memorisation: MemorisationConfig = field(default_factory=MemorisationConfig)
    suites: list[str] = field(default_factory=list)
    """Prompt-suite YAML files (`in_domain:` and `out_of_domain:` lists of prompts): generated greedily by
    `suite_checkpoints` checkpoints of the run and shown side by side in the report."""
    suite_checkpoints: int = 3
    """How many of the run's checkpoints answer the suites (evenly spaced, the last always included)."""
    prompts: list[str] = field(default_factory=lambda: ["def ", "class ", "import ", "    for i in "])
    """Prompts for the sample generations in the report."""
    max_new_tokens: int = 128
    """Tokens generated per sample (samples and suites)."""
    temperature: float = 0.8
    """Sampling temperature for the report's samples."""
    top_k: int | None = 50
    """Top-k filter for the report's samples (None = off)."""

    def __post_init__(self) -> None:
        self.benchmarks = [b if isinstance(b, BenchmarkConfig) else BenchmarkConfig.parse(b, f"eval.benchmarks[{i}]")
                           for i, b in enumerate(self.benchmarks)]
        if isinstance(self.memorisation, dict):
            from kiln.config.base import from_dict
            self.memorisation = from_dict(MemorisationConfig, self.memorisation, prefix="eval.memorisation.")

    def validate(self) -> None:
        _non_negative("eval.max_batches", self.max_batches)
        _positive("eval.batch_size", self.batch_size)
        _non_negative("eval.stride", self.stride)
        _positive("eval.suite_checkpoints", self.suite_checkpoints)
        for i, b in enumerate(self.benchmarks):
            b.validate(f"eval.benchmarks[{i}]")
        self.memorisation.validate()
