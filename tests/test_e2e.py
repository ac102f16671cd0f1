"""`kiln run` end to end on the micro recipe, through the real command line."""

import json
import re
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from micro import MICRO
from subprocess_util import run_child


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    recipe = root / "micro.yaml"
    eval_ = {**MICRO["eval"], "benchmarks": [{"name": "humaneval", "limit": 4, "max_new_tokens": 8}]}
    recipe.write_text(yaml.safe_dump({**MICRO, "eval": eval_, "run_dir": str(root / "run")}))
    out = run_child([sys.executable, "-m", "kiln", "run", str(recipe)], timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "run", recipe, out.stdout


def test_every_artifact_exists_and_parses(finished_run):
    run, _, _ = finished_run
    for split in ("train", "val", "test"):
        files = sorted((run / "data" / split).glob("*.parquet"))
        assert files, split
        assert {"id", "text", "source", "meta"} <= set(pq.read_schema(files[0]).names)
    for split in ("train", "val"):
        assert sorted((run / "tokens" / split).glob("*.parquet"))
    for path in ("data/report.json", "tokenizer/report.json", "tokens/meta.json", "eval/metrics.json",
                 "eval/samples.json", "timings.json", "tokenizer/tokenizer_config.json"):
        json.loads((run / path).read_text())
    for stage in ("data", "tokenizer", "tokens", "eval"):
        assert (run / stage / "_SUCCESS").exists() and yaml.safe_load((run / stage / "config.yaml").read_text())
    from tokenizers import Tokenizer
    Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    ckpt = run / "checkpoints" / "step_0000006"
    assert (ckpt / "COMPLETE").exists()
    from safetensors.torch import load_file
    assert "model.embed_tokens.weight" in load_file(str(ckpt / "model.safetensors"))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and "val_loss" in metrics[-1]


def test_report_names_only_existing_artifacts(finished_run):
    run, _, _ = finished_run
    report = (run / "report.md").read_text()
    for section in ("## Summary", "## Data", "## Tokenizer", "## Model", "## Training", "## Evaluation", "## Samples"):
        assert section in report
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (run / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss.png" in report
    ev = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"{ev['val']['loss']:.4f}" in report
    # the benchmark table and the memorisation figure of `kiln run`'s eval stage
    assert "### Benchmarks" in report and "| humaneval | pass@k | 0 | 4 | pass@1 " in report
    mem = json.loads((run / "eval" / "memorisation.json").read_text())
    assert "### Memorisation" in report and f"| train | {mem['groups']['train']['n']} |" in report


def test_rerun_skips_finished_stages(finished_run):
    run, recipe, _ = finished_run
    out = run_child([sys.executable, "-m", "kiln", "run", str(recipe)], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("data", "tokenizer", "tokenize", "pretrain", "eval"):
        assert f"== {stage}: already done" in out.stdout


def test_changed_eval_setting_reruns_only_eval(finished_run):
    run, recipe, _ = finished_run
    out = run_child([sys.executable, "-m", "kiln", "run", str(recipe), "--eval.max_new_tokens", "4"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== pretrain: already done" in out.stdout and "== eval\n" in out.stdout
