"""Preference pairs: every record kept or quarantined with file, line and reason; answers encoded exactly as SFT
masks them; long pairs cut on the prompt's side; `kiln dpo build-pairs` ranking samples with a scorer (one that
raises is counted), a verifier or reference answers."""

import json

import numpy as np
import pytest

from kiln.post.pairs import (PromptItem, Tally, encode_pairs, fit_pair, rank_samples, read_pairs, run_build_pairs,
                             split_pairs)
from kiln.tokenizer.loader import IGNORE

from postkit import post_config


@pytest.fixture(scope="module")
def tok(pretrained_base):
    from kiln.tokenizer import Tokenizer
    return Tokenizer.from_file(pretrained_base / "tokenizer" / "tokenizer.json")


def _line(**record):
    return json.dumps(record)


def test_every_record_is_kept_or_quarantined_with_file_and_line(tmp_path):
    good = _line(prompt="hi", chosen="hello there", rejected="go away")
    chat = _line(prompt=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
                 chosen=[{"role": "assistant", "content": "hello"}], rejected=[{"role": "assistant", "content": "no"}])
    lines = [
        good,                                                          # 1 kept
        "{not json",                                                   # 2 bad_json
        _line(prompt="hi", chosen="a"),                                # 3 missing_key
        _line(prompt="hi", chosen="   ", rejected="b"),                # 4 empty_side
        "",                                                            # blank: not a record
        _line(prompt="hi", chosen="same", rejected=" same "),          # 6 identical
        chat,                                                          # 7 kept
        "[1, 2]",                                                      # 8 not_an_object
        _line(prompt="hi", chosen=[{"role": "user", "content": "x"}], rejected="b"),   # 9 answer_not_assistant
        _line(prompt="", chosen="a", rejected="b"),                    # 10 empty_prompt
        _line(prompt="hi", chosen=[{"role": "assistant"}], rejected="b"),              # 11 bad_messages
    ]
    path = tmp_path / "pairs.jsonl"
    data = ("\n".join(lines) + "\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'  # 12
    path.write_bytes(data)
    pairs, tally = read_pairs([str(path)])
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:7"]
    assert pairs[0].prompt == [{"role": "user", "content": "hi"}]
    assert pairs[0].chosen == [{"role": "assistant", "content": "hello there"}]
    assert pairs[1].prompt[0]["role"] == "system"
    report = tally.as_dict()
    assert report["records"] == 11 and report["kept"] == 2
    assert report["quarantined"] == {"bad_json": 1, "missing_key": 1, "empty_side": 1, "identical": 1,
                                     "not_an_object": 1, "answer_not_assistant": 1, "empty_prompt": 1,
                                     "bad_messages": 1, "invalid_utf8": 1}
    where = {e["reason"]: e["where"] for e in report["quarantine"]}
    assert where["bad_json"] == f"{path}:2" and where["empty_side"] == f"{path}:4"
    assert where["identical"] == f"{path}:6" and where["invalid_utf8"] == f"{path}:12"
    assert "'rejected'" in next(e["detail"] for e in report["quarantine"] if e["reason"] == "missing_key")


def test_a_byte_order_mark_opening_the_file_is_not_a_bad_record(tmp_path):
    """Editors on Windows save UTF-8 with a BOM; it opens line 1 only, and a BOM anywhere else stays an error."""
    path = tmp_path / "bom.jsonl"
    line = _line(prompt="hi", chosen="hello", rejected="go away")
    path.write_bytes(b"\xef\xbb\xbf" + (line + "\n").encode() + b"\xef\xbb\xbf" + (line + "\n").encode())
    pairs, tally = read_pairs([str(path)])
    assert [p.where for p in pairs] == [f"{path}:1"]
    assert tally.as_dict()["quarantined"] == {"bad_json": 1}


def test_a_missing_file_is_a_configuration_error(tmp_path):
    with pytest.raises(ValueError, match="dpo.pairs.*nope.jsonl"):
        read_pairs([str(tmp_path / "nope.jsonl")])


def test_answers_are_encoded_exactly_as_sft_masks_them(tok, tmp_path):
    """Each side = encode_conversation(prompt + answer) with the mask restricted to the answer: its text and
    end-of-turn token; the prompt (an earlier assistant turn included) is never a target."""
    from kiln.tokenizer.assistant_mask import encode_conversation
    prompt = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "earlier reply"},
              {"role": "user", "content": "and now?"}]
    path = tmp_path / "p.jsonl"
    path.write_text(_line(prompt=prompt, chosen="the good one", rejected="a bad answer") + "\n")
    pairs, tally = read_pairs([str(path)])
    (enc,) = encode_pairs(tok, pairs, 128, tally)
    for side, text in ((enc.chosen, "the good one"), (enc.rejected, "a bad answer")):
        x, y = side
        full = encode_conversation(tok, prompt + [{"role": "assistant", "content": text}])
        assert x.tolist() == full.ids[:-1]
        head = tok.encode_chat(prompt, add_generation_prompt=True)
        assert full.ids[:len(head)] == head
        trained = [int(t) for t in y if t != IGNORE]
        want = [i for k, (i, m) in enumerate(zip(full.ids, full.mask)) if m and k >= len(head)]
        assert trained == want and len(want) < sum(full.mask)      # the earlier assistant turn is not trained
        assert tok.decode(trained) == text + "<|end|>"
    assert split_pairs([enc], 0.0) == ([enc], [])


def test_answer_start_found_from_the_mask_when_the_prompt_is_not_a_prefix(tok, tmp_path, monkeypatch):
    """A template that renders the prompt differently once a reply follows: the answer is then the last
    assistant run(s) of the mask, the same targets as the prefix rule gives where both apply."""
    path = tmp_path / "p.jsonl"
    prompt = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "old"}, {"role": "user", "content": "r"}]
    path.write_text(_line(prompt=prompt, chosen="new answer", rejected="other") + "\n")
    pairs, tally = read_pairs([str(path)])
    (want,) = encode_pairs(tok, pairs, 128, tally)
    monkeypatch.setattr(type(tok), "encode_chat", lambda self, messages, add_generation_prompt=False: [-1])
    (got,) = encode_pairs(tok, pairs, 128, tally)
    for a, b in ((want.chosen, got.chosen), (want.rejected, got.rejected)):
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert tok.decode([t for t in got.chosen[1] if t != IGNORE]) == "new answer<|end|>"


def test_long_pairs_keep_the_answer_start_and_cut_the_prompt():
    def side(prompt_len, answer):
        ids = list(range(100, 100 + prompt_len)) + answer
        mask = np.array([False] * prompt_len + [True] * len(answer))
        return ids, prompt_len, mask

    (c, r), cut = fit_pair(side(30, [1, 2, 3, 4]), side(30, [5, 6]), 16)
    assert cut
    assert c[0] == list(range(118, 130)) + [1, 2, 3, 4]    # 12 prompt tokens kept from the right, answer whole
    assert r[0] == list(range(118, 130)) + [5, 6]            # the same cut on both sides
    # answers longer than the context: the prompt keeps half of it, each answer its start
    (c, r), _ = fit_pair(side(30, list(range(1, 41))), side(30, [5, 6]), 16)
    assert c[0] == list(range(122, 130)) + list(range(1, 9)) and c[1].sum() == 8
    (c, r), cut = fit_pair(side(3, [1, 2]), side(3, [5]), 16)
    assert not cut and c[0] == [100, 101, 102, 1, 2]


def test_pairs_that_cannot_be_told_apart_or_rendered_are_counted(tok, tmp_path):
    long_same_start = "word " * 200
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join([
        _line(prompt="q", chosen=long_same_start + "good", rejected=long_same_start + "bad"),
        _line(prompt=[{"role": "robot", "content": "beep"}], chosen="a", rejected="b"),
        _line(prompt="q " * 300, chosen="yes", rejected="no"),
    ]) + "\n")
    pairs, tally = read_pairs([str(path)])
    encoded = encode_pairs(tok, pairs, 64, tally)
    report = tally.as_dict()
    assert report["records"] == 3 and report["kept"] == 1 == len(encoded) and report["truncated"] == 1
    assert report["quarantined"] == {"identical_after_truncation": 1, "unrenderable": 1}
    assert {e["where"] for e in report["quarantine"]} == {f"{path}:1", f"{path}:2"}
    x, y = encoded[0].chosen
    assert len(x) <= 64 and tok.decode([t for t in y if t != IGNORE]) == "yes<|end|>"


# ---------------------------------------------------------------- building pairs

def _item(reference=None):
    return PromptItem("q", [{"role": "user", "content": "q"}], "f.jsonl:3", {"prompt": "q"}, reference)


def _report():
    from collections import Counter
    return {"skipped": Counter(), "empty_samples": 0, "unfinished_samples": 0, "scorer_errors": 0,
            "scorer_error_examples": []}


def test_rank_samples_best_against_worst_and_a_failing_scorer_is_counted():
    def score(item, answer):
        if answer == "boom":
            raise RuntimeError("cannot parse")
        return {"nan": float("nan")}.get(answer, len(answer))

    report = _report()
    samples = [("ab", True), ("boom", True), ("abcd", True), ("nan", True), ("", False)]
    rec = rank_samples(_item(), samples, score, report)
    assert (rec["chosen"], rec["rejected"], rec["chosen_score"], rec["rejected_score"]) == ("abcd", "ab", 4.0, 2.0)
    assert rec["source"] == "f.jsonl:3"
    assert report["scorer_errors"] == 2 and report["empty_samples"] == 1 and report["unfinished_samples"] == 1
    assert {e["error"].split(":")[0] for e in report["scorer_error_examples"]} == {"RuntimeError", "ValueError"}
    assert rank_samples(_item(), [("x", True), ("y", True)], lambda i, a: 1.0, report) is None
    assert rank_samples(_item(), [("x", True), ("boom", True)], score, report) is None
    assert dict(report["skipped"]) == {"all_tied": 1, "fewer_than_two_scored": 1}


def test_a_scorer_that_hangs_is_stopped_and_counted(tmp_path):
    from kiln.post.pairs import scorer_of
    path = tmp_path / "score.py"
    path.write_text("def score(prompt, answer, item):\n"
                    "    while answer == 'loop':\n"
                    "        pass\n"
                    "    return float(len(answer))\n")
    score, _ = scorer_of(f"{path}:score", None, timeout=0.3)
    report = _report()
    rec = rank_samples(_item(), [("loop", True), ("ab", True), ("abc", True)], score, report)
    assert (rec["chosen"], rec["rejected"]) == ("abc", "ab")
    assert report["scorer_errors"] == 1 and "TimeoutError" in report["scorer_error_examples"][0]["error"]


def test_rank_samples_by_reference_answer():
    report = _report()
    rec = rank_samples(_item("42"), [(" 42 ", True), ("41", True)], None, report)
    assert (rec["chosen"], rec["rejected"]) == ("42", "41")
    assert rank_samples(_item("42"), [("42", True)], None, report) is None
    assert rank_samples(_item(None), [("41", True)], None, report) is None
    assert dict(report["skipped"]) == {"every_sample_is_the_reference": 1, "no_reference": 1}


def test_build_pairs_end_to_end(pretrained_base, tmp_path):
    """Samples from the tiny model, ranked by a user's scorer file that raises on some answers: the pairs file
    reads back whole, and the report counts prompts, pairs, skips and scorer errors."""
    scorer = tmp_path / "score.py"
    scorer.write_text("def score(prompt, answer, item):\n"
                      "    assert isinstance(item, dict) and item['prompt'] == prompt\n"
                      "    if len(answer) % 4 == 0:\n"
                      "        raise ValueError('no score for this one')\n"
                      "    return float(len(answer))\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([_line(prompt=f"count to {i}") for i in range(6)] + ["{oops"]) + "\n")
    out = tmp_path / "built" / "pairs.jsonl"
    cfg = post_config(pretrained_base, "dpo", prompts=[str(prompts)], samples=4, max_new_tokens=12,
                      scorer=f"{scorer}:score", pairs_out=str(out), train={"seed": 3})
    report = run_build_pairs(cfg)
    assert report["prompts"]["records"] == 7 and report["prompts"]["quarantined"] == {"bad_json": 1}
    assert report["pairs"] + sum(report["skipped"].values()) == 6
    assert report["scorer_errors"] == len(report["scorer_error_examples"]) > 0   # 1 in 4 lengths raises
    assert json.loads(out.with_name("pairs.report.json").read_text()) == json.loads(json.dumps(report))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == report["pairs"] > 0
    assert all(r["chosen_score"] > r["rejected_score"] and len(r["chosen"]) % 4 for r in records)
    pairs, tally = read_pairs([str(out)])
    assert tally.kept == len(records) and isinstance(tally, Tally)


def test_build_pairs_without_a_way_to_rank_is_a_clear_error(pretrained_base, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(_line(prompt="hello") + "\n")
    cfg = post_config(pretrained_base, "dpo", prompts=[str(prompts)], pairs_out=str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match="dpo.scorer"):
        run_build_pairs(cfg)
