"""`kiln` command line: a table of subcommands, each a plain stage function taking a `Config`.

    kiln <command> [RECIPE] [--section.key VALUE ...]

RECIPE (first argument, optional) is a built-in recipe name or a YAML path; it
defaults to the run directory's saved config when `--run_dir` names an existing
run, else to `tiny`. Dotted options override single fields. Parsing and `--help`
come from jsonargparse over the typed dataclasses in `kiln.config`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from kiln.config import Config, ConfigError, from_dict, load_yaml, recipe_names, recipe_path, unknown_key_message


def _cmd_run(cfg: Config) -> None:
    from kiln.pipeline import run_all
    run_all(cfg)


def _cmd_data(cfg: Config) -> None:
    from kiln.pipeline import run_stage
    run_stage(cfg, "data")


def _cmd_tokenizer(cfg: Config) -> None:
    from kiln.pipeline import run_stage
    run_stage(cfg, "tokenizer")


def _cmd_tokenizer_eval(cfg: Config) -> None:
    from kiln.tokenizer.evaluate import run_tokenizer_eval
    run_tokenizer_eval(cfg)


def _cmd_tokenize(cfg: Config) -> None:
    from kiln.pipeline import run_stage
    run_stage(cfg, "tokenize")


def _cmd_pretrain(cfg: Config) -> None:
    from kiln.pipeline import run_stage
    run_stage(cfg, "pretrain")


def _cmd_eval(cfg: Config) -> None:
    from kiln.pipeline import run_stage
    run_stage(cfg, "eval")


def _cmd_generate(cfg: Config) -> None:
    from kiln.infer.run import run_generate
    run_generate(cfg)


def _cmd_import(cfg: Config) -> None:
    from kiln.formats.importer import run_import
    run_import(cfg)


def _cmd_export(cfg: Config) -> None:
    from kiln.formats.export import run_export
    run_export(cfg)
def _cmd_serve(cfg: Config) -> None:
    from kiln.serve.run import run_serve
    run_serve(cfg)


def _cmd_chat(cfg: Config) -> None:
    from kiln.serve.chat import run_chat
    run_chat(cfg)


def _cmd_estimate(cfg: Config) -> None:
    from kiln.plan.estimate import run_estimate
    run_estimate(cfg)


def _cmd_sft(cfg: Config) -> None:
    from kiln.post.sft import run_sft
    run_sft(cfg)


def _cmd_dpo(cfg: Config) -> None:
    from kiln.post.dpo import run_dpo
    run_dpo(cfg)


def _cmd_dpo_build_pairs(cfg: Config) -> None:
    from kiln.post.pairs import run_build_pairs
    run_build_pairs(cfg)


def _cmd_grpo(cfg: Config) -> None:
    from kiln.post.grpo import run_grpo
    run_grpo(cfg)


def _cmd_report(cfg: Config) -> None:
    from kiln.pipeline import run_stage
    run_stage(cfg, "report")


COMMANDS: dict[str, tuple[Callable[[Config], None], str]] = {
    "run": (_cmd_run, "every stage in order, skipping those already done with the same config"),
    "data": (_cmd_data, "read, normalise, dedup and split raw text into data/{train,val,test}"),
    "tokenizer": (_cmd_tokenizer, "train a byte-level BPE tokenizer on data/train"),
    "tokenizer-eval": (_cmd_tokenizer_eval, "compare the tokenizer with tokenizer.eval_reference files on held-out "
                       "text (also `kiln tokenizer eval`)"),
    "tokenize": (_cmd_tokenize, "encode the splits into tokens/{train,val} Parquet shards"),
    "pretrain": (_cmd_pretrain, "train the model; --resume continues from the newest checkpoint"),
    "eval": (_cmd_eval, "loss, perplexity and bits per byte (validation split, eval.files), divergence, memorisation, "
             "prompt suites, benchmarks (eval.benchmarks: mmlu, humaneval, maths, bigbench:PATH, mc:PATH) with a "
             "report card"),
    "generate": (_cmd_generate, "sample text from a checkpoint with KV-cache decoding"),
    "import": (_cmd_import, "make a run directory from a Hugging Face folder or a .gguf file: kiln import SRC "
               "--run_dir DIR"),
    "export": (_cmd_export, "write a checkpoint as a Hugging Face folder or a GGUF file (a LoRA run's merged), or a "
               "LoRA run's adapter alone: kiln export --run_dir DIR --format hf|gguf|peft [--quant f16|q8_0|q4_k_m|...] "
               "[--out PATH]"),
    "sft": (_cmd_sft, "supervised fine-tuning on conversations (loss on assistant tokens only), full or --lora / "
            "--qlora: kiln sft --run_dir DIR [--sft.data.sources '[chats.jsonl]']"),
    "dpo": (_cmd_dpo, "Direct Preference Optimisation on prompt/chosen/rejected pairs: kiln dpo --run_dir DIR "
            "--dpo.pairs '[pairs.jsonl]' [--lora]"),
    "dpo-build-pairs": (_cmd_dpo_build_pairs, "sample answers from a model and rank them with a verifier or your "
                        "scoring function into DPO pairs (also `kiln dpo build-pairs`)"),
    "grpo": (_cmd_grpo, "reinforcement learning on verifiable rewards (GRPO) with a reasoning-gym task: kiln grpo "
             "--run_dir DIR [--grpo.task basic_arithmetic]"),
    "estimate": (_cmd_estimate, "parameters, training memory per GPU, inference memory, tokens, FLOPs, time and cost "
                 "of a recipe, a preset (124m ... 70b) or a Hugging Face config, before spending any"),
    "serve": (_cmd_serve, "the run's model behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions) "
              "with a chat page at /: kiln serve --run_dir DIR [--port 8000] [--api_key KEY]"),
    "chat": (_cmd_chat, "chat with the run's model in the terminal: kiln chat --run_dir DIR"),
    "report": (_cmd_report, "write report.md and the loss plot from the run's artifacts"),
}


ALIASES = {"export": {"--format": "--export.format", "--quant": "--export.quant", "--out": "--export.out",
                      "--checkpoint": "--export.checkpoint"},
           "import": {"--dtype": "--importing.dtype"},
           "serve": {"--host": "--serve.host", "--port": "--serve.port", "--api_key": "--serve.api_key",
                     "--checkpoint": "--serve.checkpoint", "--model_name": "--serve.model_name",
                     "--adapter": "--serve.adapter", "--lora": "--serve.lora_modules+"},
           "chat": {"--checkpoint": "--serve.checkpoint", "--system": "--serve.system",
                    "--temperature": "--serve.temperature", "--adapter": "--serve.adapter"}}
POST_STAGES = {"sft": "sft", "dpo": "dpo", "grpo": "grpo", "dpo-build-pairs": "dpo"}   # command -> config section
for _stage, _key in POST_STAGES.items():
    ALIASES[_stage] = {"--base": f"--{_key}.base", "--out": f"--{_key}.out",
                       "--resume": f"--{_key}.train.resume=true",     # the stage trains with its own section
                       "--lora": f"--{_key}.lora.enabled=true",
                       "--qlora": (f"--{_key}.lora.enabled=true", f"--{_key}.lora.base_dtype=nf4")}
"""Short options of a command, spelled out as their config keys (a flag may stand for several)."""


def _expand(command: str, argv: list[str]) -> list[str]:
    """`kiln import SRC` -> `--importing.source SRC`; a command's short options -> their config keys."""
    out = []
    aliases = ALIASES.get(command, {})
    if command == "import" and argv and not argv[0].startswith("-"):
        argv = ["--importing.source", argv[0], *argv[1:]]
    for a in argv:
        key, eq, value = a.partition("=")
        full = aliases.get(key)
        if isinstance(full, tuple):     # a flag standing for several settings
            out += full
        elif full is not None and "=" in full:   # a flag standing for one setting
            out.append(full)
        else:
            out.append(full + eq + value if full is not None else a)
    return out


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: kiln <command> [RECIPE] [--section.key VALUE ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [f"  {'lm-eval':<{width}}  lm-evaluation-harness's command line with kiln models: kiln lm-eval --model "
              "kiln --model_args pretrained=RUN_DIR --tasks ... (`kiln lm-eval tasks DIR` writes MMLU as local tasks)"]
    lines += ["", "RECIPE: a built-in recipe name (tiny, gpt2-small, ...) or a path to a YAML file.",
              "Run `kiln <command> --help` for every option of a command."]
    return "\n".join(lines)


def _build_parser(command: str):
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, set_parsing_settings
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog=f"kiln {command} [RECIPE]", usage=f"kiln {command} [RECIPE] [--section.key VALUE ...]",
        description=COMMANDS[command][1] + ". RECIPE is a built-in name or a .yaml path (default: tiny, "
        "or the saved config of an existing --run_dir).",
        exit_on_error=True, default_meta=False, epilog=_epilog(command),
        formatter_class=_formatter(DefaultHelpFormatter) if command == "estimate" else DefaultHelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="Read options from a YAML file (like RECIPE).")
    train = f"{POST_STAGES[command]}.train" if command in POST_STAGES else "train"
    parser.add_argument("--resume", action="store_true", help=f"Same as --{train}.resume true.")
    parser.add_class_arguments(Config, nested_key=None, fail_untyped=True, sub_configs=True)
    return parser


def _formatter(base: type) -> type:
    """jsonargparse's help formatter, with the epilog (worked examples) kept as written."""
    class Formatter(base):
        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))
    return Formatter


def _epilog(command: str) -> str | None:
    if command == "estimate":
        from kiln.plan.estimate import HELP_EXAMPLES
        return HELP_EXAMPLES
    return None


def _check_keys(args: list[str]) -> None:
    """Name unknown dotted keys with the valid ones (jsonargparse only says 'unrecognized')."""
    for arg in args:
        if not arg.startswith("--") or arg in ("--help", "--config", "--resume", "--print_config"):
            continue
        key = arg[2:].split("=", 1)[0].removesuffix("+")   # `--key+ VALUE` appends to a list
        if key.startswith("print_config"):
            continue
        cls: typing.Any = Config
        prefix = ""
        for part in key.split("."):
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(unknown_key_message(prefix + part, list(names), prefix))
            hint = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(hint):
                break
            cls, prefix = hint, f"{prefix}{part}."


def _check_post_keys(command: str, args: list[str]) -> None:
    """A post-training stage trains with its own section's `train`: `--train.X` (pretraining's) would change
    nothing, so it is refused with the key that would."""
    section = POST_STAGES[command]
    for arg in args:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if key.startswith("train."):
            raise ConfigError(f"--{key} sets pretraining's training options, which `kiln {command}` does not read; "
                              f"use --{section}.{key}")


def parse(command: str, argv: list[str]) -> Config:
    """Turn `[RECIPE] [--key value ...]` into a validated Config."""
    argv = list(argv)
    recipe = argv.pop(0) if argv and not argv[0].startswith("-") else None
    if any(a in ("-h", "--help") for a in argv):
        _build_parser(command).parse_args(["--help"])
    _check_keys(argv)
    if command in POST_STAGES:
        _check_post_keys(command, argv)
    base = _base_config(recipe, argv)
    _check_recipe(base)
    parser = _build_parser(command)
    ns = parser.parse_args(["--config", str(base), *argv])
    values = ns.as_dict()
    resume = values.pop("resume", False)
    values.pop("config", None)
    values.pop("__path__", None)
    cfg = from_dict(Config, values)
    if resume:
        cfg.train.resume = True
    return cfg.validate()


def _check_recipe(path: Path) -> None:
    """The recipe file read with kiln's own checks first: YAML errors and unknown keys named with the file, line
    or key and the nearest valid key (jsonargparse's own messages name neither the file nor a fix)."""
    data = load_yaml(path)   # its errors name the file and line
    try:
        from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _base_config(recipe: str | None, argv: list[str]) -> Path:
    if recipe is not None:
        return recipe_path(recipe)
    run_dir = _option_value(argv, "--run_dir")
    if run_dir and (Path(run_dir) / "config.yaml").is_file():
        return Path(run_dir) / "config.yaml"
    return recipe_path("tiny")


def _option_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _estimate_argv(argv: list[str]) -> list[str]:
    """`kiln estimate 7b` / `kiln estimate path/to/hf_folder`: a first argument that is no recipe names the model;
    `--json` is `--estimate.json true`."""
    argv = ["--estimate.json=true" if a == "--json" else a for a in argv]
    first = argv[0] if argv and not argv[0].startswith("-") else None
    if first and (Path(first).is_dir() or first.endswith(".json") or first.lower() not in recipe_names()
                  and not first.endswith((".yaml", ".yml"))):
        return ["--estimate.model", first, *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "tokenizer" and rest[:1] == ["eval"]:
        command, rest = "tokenizer-eval", rest[1:]
    if command == "dpo" and rest[:1] == ["build-pairs"]:
        command, rest = "dpo-build-pairs", rest[1:]
    if command == "estimate":
        rest = _estimate_argv(rest)
    if command == "lm-eval":   # lm-evaluation-harness's own command line, with the `kiln` model registered
        from kiln.eval.harness import main as lm_eval_main
        lm_eval_main(rest)
        return 0
    if command not in COMMANDS:
        print(f"kiln: unknown command `{command}`\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        cfg = parse(command, _expand(command, rest))
        COMMANDS[command][0](cfg)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"kiln {command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:     # bad input found while working (a file, a tensor, a tokenizer): said, not traced
        if os.environ.get("KILN_TRACEBACK"):
            raise
        print(f"kiln {command}: error: {e}\n(KILN_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nkiln {command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
