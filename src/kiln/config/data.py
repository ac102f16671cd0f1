"""Data stage configuration: sources, cleaning steps and their published defaults, dedup, split."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

from kiln.config.base import ConfigError
from kiln.config.base import non_negative as _non_negative
from kiln.config.base import positive as _positive


CONTENT_TYPES = ("code", "prose")
DOC_STEPS = ("fix_unicode", "normalize", "length_filter", "language", "gopher_quality", "gopher_repetition",
             "c4", "fineweb", "code_quality", "quality_classifier", "pii", "decontaminate")
"""Per-document steps (run in the workers), in their default order; `data.steps` reorders or subsets them."""
ID_FIELD = "id"
"""A record's own id field (JSON field or Parquet column): copied into its document's meta whenever present."""
LOCATION_KEYS = ("path", "line", "record", "row")
"""Meta keys kiln itself writes: where in its file a document was read (`data.keep_fields` cannot take them)."""


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
    engine: Literal["regex", "presidio"] = "regex"
    """`regex`: kiln's own patterns checked with ipaddress / Luhn / phonenumbers (fast, no extra packages).
    `presidio`: Microsoft Presidio's pattern recognizers on a blank spaCy pipeline (offline, no NER model;
    adds presidio_entities; 20-70x slower: under 1 MB/s per core); needs `pip install 'llmkiln[presidio]'`."""
    emails: bool = True
    ip_addresses: bool = True
    phone_numbers: bool = True
    """Prose only: numeric literals in code are too easily read as phone numbers."""
    credit_cards: bool = True
    phone_region: str = "US"
    """Region for phone numbers written without a +country prefix."""
    presidio_entities: list[str] = field(default_factory=lambda: ["IBAN_CODE"])
    """engine=presidio only: further Presidio entity types to replace (IBAN_CODE, CRYPTO, US_SSN, ...), each
    with `<TYPE>` and counted as `pii:type`; the four switches above govern emails, IPs, phones and cards."""
    presidio_min_score: float = 0.4
    """engine=presidio only: ignore Presidio hits scoring below this (its phone numbers score 0.4, checksum-
    validated cards / IBANs 1.0, bare 9-digit `US_SSN` shapes 0.05)."""


BENCHMARKS_INSTALLED = "installed"
"""In data.decontaminate.benchmarks: every registered benchmark whose package is installed."""


@dataclass
class DecontaminateConfig:
    """Drop or excise documents sharing an n-gram with benchmarks: registered ones (`kiln.data.benchmarks`)
    by name, or files (.jsonl and .json arrays: every string field)."""

    enabled: bool = True
    benchmarks: list[str] = field(default_factory=lambda: [BENCHMARKS_INSTALLED])
    """Benchmark names (`humaneval`, `mmlu`), `installed` (every registered benchmark whose package is
    installed, as the eval stage would evaluate; the run says which were found and how to install the
    rest) or files (.txt .md .jsonl .jsonl.gz ...); empty = step does nothing."""
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
    """Inputs: files (.txt .md .py .jsonl .jsonl.gz .jsonl.zst .parquet; .json holding an array of records
    or JSON Lines), directories, globs, or built-in sources (`python-stdlib`: the .py files of this
    interpreter's standard library). Files of other types in a directory or glob are skipped and listed in
    data/report.json (`skipped_files`)."""
    code_sources: list[str] = field(default_factory=list)
    """Sources (as written in `sources`) holding code: prose rules are skipped, code rules applied.
    `python-stdlib` and .py files are code without being listed."""
    prose_sources: list[str] = field(default_factory=list)
    """Sources to treat as prose even where they would be detected as code."""
    text_key: str = "text"
    """Field holding the document text in .jsonl, .json and .parquet inputs."""
    keep_fields: list[str] = field(default_factory=list)
    """Further fields of each record (.jsonl/.json fields, .parquet columns) to copy into its output `meta`,
    beside its own `id`, which is always kept; a record without one (or with null) has no such key."""
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
    """Processes for the per-file tasks; 0 = one per CPU core. With Ray: at least 2x this many tasks in flight."""
    executor: Literal["local", "ray"] = "local"
    """Where the per-file tasks run: `local` (a process pool) or `ray` (the cluster named by RAY_ADDRESS, or
    a local Ray instance; needs `pip install 'llmkiln[ray]'`). The output is the same either way."""
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
        _check_keep_fields(self.keep_fields, self.text_key)
        _non_negative("data.workers", self.workers)
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"data.executor={self.executor!r}: choose 'local' (process pool) or 'ray'")
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
        _check_pii(self.pii)
        _positive("data.near_dedup.ngram", self.near_dedup.ngram)
        _positive("data.near_dedup.bands", self.near_dedup.bands)
        _positive("data.near_dedup.rows", self.near_dedup.rows)
        q = self.quality_classifier
        if q.enabled and not q.model_path and not (q.positive and q.negative):
            raise ConfigError("data.quality_classifier is enabled but has neither model_path nor both "
                              "positive and negative example files")


def _check_keep_fields(keep: list[str], text_key: str) -> None:
    for i, name in enumerate(keep):
        key = f"data.keep_fields[{i}]={name!r}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: name a field of the input records")
        if name in LOCATION_KEYS:
            raise ConfigError(f"{key}: kiln writes this meta key itself (where the document was read: "
                              f"{', '.join(LOCATION_KEYS)}); rename the field in the input to keep it")
        if name == text_key:
            raise ConfigError(f"{key} is data.text_key: the text is the output's `text` column already")
        if name in keep[:i]:
            raise ConfigError(f"{key} is listed twice")


def _check_pii(p: PIIConfig) -> None:
    if p.engine not in ("regex", "presidio"):
        raise ConfigError(f"data.pii.engine={p.engine!r}: choose 'regex' or 'presidio'")
    if not 0 <= p.presidio_min_score <= 1:
        raise ConfigError(f"data.pii.presidio_min_score={p.presidio_min_score} must be in [0, 1]")
    if p.enabled and p.engine == "presidio":
        missing = [m for m in ("presidio_analyzer", "presidio_anonymizer", "spacy") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"data.pii.engine='presidio' needs Presidio ({', '.join(missing)} not installed): "
                              "pip install 'llmkiln[presidio]', or set data.pii.engine: regex")
