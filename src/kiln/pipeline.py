"""Stages in order, and the rule that a stage finished with the same config is not run again.

A stage's fingerprint is the config sections it depends on (its own and every upstream one),
so changing `data.*` redoes data and everything after it, while changing `eval.*` redoes only
eval and the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.config import Config, ConfigError, TrainConfig, dump_yaml, model_diff
from kiln.config.rundir import RunDir, clear_done, config_diff, is_done, mark_done
from kiln.config.stages import volatile_fields


def _data(cfg: Config):
    from kiln.data import run_data
    return run_data(cfg)


def _tokenizer(cfg: Config):
    from kiln.tokenizer.train import run_tokenizer
    return run_tokenizer(cfg)


def _tokenize(cfg: Config):
    from kiln.tokenizer.tokenize import run_tokenize
    return run_tokenize(cfg)


def _pretrain(cfg: Config):
    from kiln.train.pretrain import run_pretrain
    return run_pretrain(cfg)


def _eval(cfg: Config):
    from kiln.eval.run import run_eval
    return run_eval(cfg)


def _sft(cfg: Config):
    from kiln.post.sft import run_sft
    return run_sft(cfg)


def _dpo(cfg: Config):
    from kiln.post.dpo import run_dpo
    from kiln.post.pairs import run_build_pairs
    built = Path(cfg.dpo.pairs_out) if cfg.dpo.pairs_out else cfg.run_path / "pairs.jsonl"
    if not cfg.dpo.pairs and cfg.dpo.prompts and not built.is_file():   # pairs from the model's own samples
        run_build_pairs(cfg)
    return run_dpo(cfg)


def _grpo(cfg: Config):
    from kiln.post.grpo import run_grpo
    return run_grpo(cfg)


def _report(cfg: Config):
    from kiln.report.report import write_report
    return write_report(cfg)


POST = ("sft", "dpo", "grpo")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Config], object]
    sections: tuple[str, ...]   # config sections the output depends on
    output: Callable[[RunDir], Path]
    always: bool = False        # cheap and derived from the others: rerun every time
    keeps_work: bool = True     # its finished output is costly to remake: never replaced without --overwrite
    post: bool = False          # a post-training stage: `kiln run` runs it only when cfg.post names it


STAGES: tuple[Stage, ...] = (
    Stage("data", _data, ("data",), lambda rd: rd.data),
    Stage("tokenizer", _tokenizer, ("data", "tokenizer"), lambda rd: rd.tokenizer),
    Stage("tokenize", _tokenize, ("data", "tokenizer", "tokenize"), lambda rd: rd.tokens),
    Stage("pretrain", _pretrain, ("data", "tokenizer", "tokenize", "model", "train"), lambda rd: rd.checkpoints),
    Stage("eval", _eval, ("data", "tokenizer", "tokenize", "model", "train", "eval"), lambda rd: rd.eval,
          keeps_work=False),
    # a post-training stage depends on the stages before it (dpo and grpo start from sft's model)
    *(Stage(name, fn, ("data", "tokenizer", "tokenize", "model", "train", *POST[:i + 1]),
            lambda rd, n=name: rd.root / n, post=True)
      for i, (name, fn) in enumerate((("sft", _sft), ("dpo", _dpo), ("grpo", _grpo)))),
    Stage("report", _report, (), lambda rd: rd.root, always=True),
)


def post_output(cfg: Config, stage: Stage, rd: RunDir) -> Path:
    """A post-training stage writes where its section's `out` says (default <run_dir>/<stage>)."""
    out = getattr(cfg, stage.name).out
    return Path(out) if out else stage.output(rd)


def fingerprint(cfg: Config, stage: Stage) -> dict:
    fp = {s: dataclasses.asdict(getattr(cfg, s)) for s in stage.sections}
    # pretraining's train section and each post-training stage's own: settings that change how a run is
    # watched, not what it produces, do not redo it
    trains = [fp["train"]] if "train" in fp else []
    trains += [fp[s]["train"] for s in POST if s in fp]
    for train in trains:
        for k in volatile_fields(TrainConfig):
            train.pop(k, None)
    return fp


def refuse_to_replace(cfg: Config, stage: Stage, rd: RunDir) -> None:
    """A finished stage made with another config is the user's work: redo it only with --overwrite.
    Checked before the stage's done-marker is cleared, so a refusal changes nothing."""
    if stage.name == "pretrain":   # its checkpoints, whatever the config (a fresh start would delete them)
        from kiln.train.pretrain import check_start
        return check_start(cfg)
    if stage.post:                 # the loop refuses to start fresh over a stage's checkpoints by itself
        return None
    out = stage.output(rd)
    fp = fingerprint(cfg, stage)
    if cfg.overwrite or stage.always or not stage.keeps_work or not is_done(out) or is_done(out, fp):
        return
    changed = config_diff(out, fp)
    raise ConfigError(f"{out} holds a finished {stage.name} stage made with another config ({'; '.join(changed[:5])}"
                      f"{'; ...' if len(changed) > 5 else ''}); redoing it would replace it and everything after it. "
                      "Pass --overwrite true to do so, or use a new --run_dir")


def run_stage(cfg: Config, name: str) -> object:
    """Run one stage unconditionally and mark it done (what `kiln <stage>` does)."""
    stage = next(s for s in STAGES if s.name == name)
    rd = RunDir(cfg.run_path)
    rd.root.mkdir(parents=True, exist_ok=True)
    out = post_output(cfg, stage, rd) if stage.post else stage.output(rd)
    refuse_to_replace(cfg, stage, rd)
    if not stage.always:
        clear_done(out)
    t0 = time.perf_counter()
    result = stage.run(cfg)
    if _rank() == 0:  # under torchrun the other ranks trained too, but only rank 0 writes the run's files
        _record_time(rd, name, time.perf_counter() - t0)
        if not stage.always:
            mark_done(out, fingerprint(cfg, stage))
    return result


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_all(cfg: Config) -> None:
    """Every stage in order; a stage already done with the same fingerprint is skipped."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("`kiln run` runs every stage in one process: run `kiln data`, `kiln tokenizer` and "
                          "`kiln tokenize` once, then `torchrun --nproc_per_node=N -m kiln pretrain ...`")
    rd = RunDir(cfg.run_path)
    rd.root.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, rd.root / "config.yaml")
    t0 = time.perf_counter()
    print(f"kiln run `{cfg.name}` -> {rd.root}")
    for stage in STAGES:
        if stage.post and stage.name not in cfg.post:
            continue
        out = post_output(cfg, stage, rd) if stage.post else stage.output(rd)
        if not stage.always and is_done(out, fingerprint(cfg, stage)):
            print(f"== {stage.name}: already done with this config, skipped")
            continue
        print(f"== {stage.name}")
        if stage.name == "pretrain":
            # An interrupted training run continues from its newest checkpoint, if that was made
            # from the same data, tokenizer and model; otherwise training starts over.
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=_can_resume(cfg, rd)))
        if stage.post:   # an interrupted stage continues from its newest checkpoint (the loop checks its inputs)
            from kiln.formats.checkpoint import latest_checkpoint
            section = getattr(cfg, stage.name)
            resume = latest_checkpoint(out / "checkpoints") is not None and not cfg.overwrite
            cfg = dataclasses.replace(cfg, **{stage.name: dataclasses.replace(
                section, train=dataclasses.replace(section.train, resume=resume))})
        run_stage(cfg, stage.name)
    total = time.perf_counter() - t0
    print(f"kiln run finished in {total:.0f}s ({total / 60:.1f} min); report: {rd.report}")


def _can_resume(cfg: Config, rd: RunDir) -> bool:
    from kiln.formats.checkpoint import checkpoint_config, latest_checkpoint
    last = latest_checkpoint(rd.checkpoints)
    if last is None:
        return False
    saved = checkpoint_config(last)
    same_inputs = all(getattr(saved, s) == getattr(cfg, s) for s in ("data", "tokenizer", "tokenize"))
    model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or saved.model.vocab_size).resolved()
    return same_inputs and not model_diff(saved.model, model)


def _record_time(rd: RunDir, stage: str, seconds: float) -> None:
    path = rd.root / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(seconds, 2)
    order = [s.name for s in STAGES]
    timings = {k: timings[k] for k in sorted(timings, key=lambda k: order.index(k) if k in order else 99)}
    path.write_text(json.dumps(timings, indent=2) + "\n")
