"""kiln sft: packed rows with document masks, the assistant-only loss, the stage end to end (full and LoRA),
resume, and a tiny model that learns to answer in the chat format and stop."""

import json

import numpy as np
import pytest
import torch

from kiln.config import ModelConfig
from kiln.model.llama import Transformer
from kiln.post.sft import ChatBatches, chat_loss, count_targets, example_of, pack_rows
from kiln.tokenizer.loader import IGNORE

from postkit import post_config


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(3, 60, n + 1)
        mask = rng.random(n + 1) < 0.5
        out.append(example_of(ids.tolist(), mask.tolist()))
    return out


def test_example_targets_are_the_next_trained_token():
    x, y = example_of([5, 6, 7, 8], [False, False, True, True])
    assert x.tolist() == [5, 6, 7]
    assert y.tolist() == [IGNORE, 7, 8]


def test_pack_rows_never_splits_and_respects_the_length():
    lengths = [5, 9, 3, 12, 7, 1, 16]
    rows = pack_rows(lengths, range(len(lengths)), 16)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 16 for r in rows)
    assert len(rows) == 4             # best fit decreasing: 16 | 12 3 1 | 9 7 | 5 (in order: 5 rows)
    assert sorted(sorted(r) for r in rows) == [[0], [1, 4], [2, 3, 5], [6]]


def test_packed_batches_keep_conversations_apart():
    ex = _examples([5, 9, 3, 12, 7, 1, 15])
    src = ChatBatches(ex, 16, 2, "pack", pad_id=2, seed=1)
    b = next(src)
    assert b["input_ids"].shape == (2, 16) and b["segments"].shape == (2, 16)
    seg = b["segments"]
    assert (seg[:, 1:] >= seg[:, :-1]).all()               # contiguous documents
    # every target belongs to its own conversation: the targets of a row are the examples' targets in order
    for r, row in enumerate(src._rows[:2]):
        want = np.concatenate([ex[i][1] for i in row])
        assert b["targets"][r, :len(want)].tolist() == want.tolist()
        assert (b["targets"][r, len(want):] == IGNORE).all()


def test_packed_batches_give_the_segments_bounds_in_the_flat_batch():
    src = ChatBatches(_examples([5, 9, 3, 12, 7, 1, 15, 16]), 16, 3, "pack", pad_id=2, seed=4, document_bounds=True)
    assert "cu_seqlens" not in next(ChatBatches(_examples([5, 9]), 16, 1, "pack", pad_id=2, document_bounds=False))
    assert "cu_seqlens" not in next(ChatBatches(_examples([5, 9]), 16, 1, "pad", pad_id=2))   # no packed rows
    for _ in range(3):
        b = next(src)
        flat = b["segments"].reshape(-1)
        starts = [0] + [i for i in range(1, flat.numel()) if flat[i] != flat[i - 1] or i % 16 == 0]
        assert b["cu_seqlens"].dtype == torch.int32
        assert b["cu_seqlens"].tolist() == starts + [flat.numel()]


def test_padded_batches_one_conversation_per_row():
    ex = _examples([5, 9, 3])
    src = ChatBatches(ex, 64, 3, "pad", pad_id=2, shuffle=False)
    b = next(src)
    assert "segments" not in b and b["input_ids"].shape == (3, 16)   # longest 9, rounded up to 16
    assert b["targets"][0, :5].tolist() == ex[0][1].tolist()


def test_packed_loss_equals_each_conversation_alone():
    """The document mask and per-document positions make a packed row compute exactly what each
    conversation computes alone."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, n_kv_heads=1, vocab_size=64,
                                    max_seq_len=32)).eval()
    ex = _examples([6, 9, 4, 11], seed=3)
    packed = ChatBatches(ex, 32, 1, "pack", pad_id=2, shuffle=False)
    b = next(packed)
    assert b["segments"].max() >= 2                         # several conversations in the row
    alone = sum(chat_loss(model, {"input_ids": torch.from_numpy(x)[None], "targets": torch.from_numpy(y)[None]})
                for x, y in (ex[i] for i in packed._rows[0]))
    assert torch.allclose(chat_loss(model, b), alone, rtol=1e-5)
    assert count_targets(b) == sum(int((ex[i][1] != IGNORE).sum()) for i in packed._rows[0])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_head_on_the_trained_rows_only_gives_the_same_loss_and_gradients(fused, packing):
    """`rows` lists exactly the trained targets, and the head run on those positions alone gives the loss and
    every gradient of the head run on all of them (the plain and the fused head)."""
    from kiln.train.cross_entropy import apply_fused_cross_entropy
    torch.manual_seed(0)
    model = Transformer(ModelConfig(depth=2, aspect_ratio=32, head_dim=16, n_kv_heads=1, vocab_size=64,
                                    max_seq_len=32))
    if fused:
        apply_fused_cross_entropy(model)
    b = next(ChatBatches(_examples([6, 9, 4, 11, 3, 14], seed=5), 32, 3, packing, pad_id=2, seed=2,
                         trained_rows=True))
    assert b["rows"].tolist() == (b["targets"].reshape(-1) != IGNORE).nonzero().squeeze(1).tolist()
    assert 0 < len(b["rows"]) < b["targets"].numel()

    def loss_and_grads(batch):
        model.zero_grad()
        loss = chat_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_g = loss_and_grads({k: v for k, v in b.items() if k not in ("rows", "cu_seqlens")})
    got, got_g = loss_and_grads(b)
    assert torch.allclose(got, want, rtol=1e-5)
    for g, w in zip(got_g, want_g):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
    mean = model(b["input_ids"], b["targets"], segments_BT=b.get("segments"))
    assert torch.allclose(model(b["input_ids"], b["targets"], segments_BT=b.get("segments"), rows_N=b["rows"]),
                          mean, rtol=1e-5)
    per_N = model(b["input_ids"], b["targets"], segments_BT=b.get("segments"), reduction="none", rows_N=b["rows"])
    per_BT = model(b["input_ids"], b["targets"], segments_BT=b.get("segments"), reduction="none")
    assert torch.allclose(per_N, per_BT.reshape(-1)[b["rows"]], rtol=1e-5)   # (N,): each trained position's


def test_batches_resume_where_they_stopped():
    ex = _examples(list(range(3, 20)))
    a = ChatBatches(ex, 24, 2, "pack", pad_id=2, seed=4)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    want = [next(a)["input_ids"] for _ in range(6)]      # crosses an epoch boundary
    b = ChatBatches(ex, 24, 2, "pack", pad_id=2, seed=4)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(w, next(b)["input_ids"]) for w in want)
    with pytest.raises(ValueError, match="conversations"):
        ChatBatches(ex[:-1], 24, 2, "pack", pad_id=2).load_state_dict(state)


def test_ranks_split_the_rows():
    ex = _examples(list(range(3, 20)))
    whole = ChatBatches(ex, 24, 1, "pack", pad_id=2, seed=4)
    r0 = ChatBatches(ex, 24, 1, "pack", pad_id=2, seed=4, rank=0, world_size=2)
    r1 = ChatBatches(ex, 24, 1, "pack", pad_id=2, seed=4, rank=1, world_size=2)
    assert r0._rows + r1._rows and sorted(map(tuple, r0._rows + r1._rows)) == sorted(map(tuple, whole._rows))


# ---------------------------------------------------------------- the stage, end to end

CHATS = [
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi there"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "blue"}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "green"}]},
    {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]},
    {"instruction": "Repeat the word", "input": "cat", "output": "cat"},
]


def _write_chats(path, n=40):
    with open(path, "w") as f:
        for i in range(n):
            rec = json.loads(json.dumps(CHATS[i % len(CHATS)]))
            rec.setdefault("id", i)
            # vary the text so exact dedup keeps them
            if "messages" in rec:
                rec["messages"][-1]["content"] += f" {i}"
            elif "conversations" in rec:
                rec["conversations"][-1]["value"] += f" {i}"
            else:
                rec["output"] += f" {i}"
            f.write(json.dumps(rec) + "\n")
    return path


def _sft_cfg(run, chats, out=None, **train):
    t = {"max_steps": 6, "micro_batch_size": 4, "lr": 3e-3, "eval_every": 3, "checkpoint_every": 3,
         "log_every": 1, "warmup_steps": 1, "precision": "fp32", "threads": 1, "sample_prompts": ["Say hi."]}
    t.update(train)
    return post_config(run, "sft", out=out, data={"sources": [str(chats)], "val_fraction": 0.2, "languages": []},
                       train=t)


def _losses(path):
    return [json.loads(line)["loss"] for line in open(path) if '"loss"' in line]


def test_sft_trains_and_writes_a_normal_run(base_run, tmp_path):
    from kiln.formats.checkpoint import latest_checkpoint, load_model
    from kiln.post.sft import run_sft
    chats = _write_chats(tmp_path / "chats.jsonl")
    summary = run_sft(_sft_cfg(base_run, chats))
    out = base_run / "sft"
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_0000006"
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "config.yaml").is_file()
    report = json.loads((out / "data_report.json").read_text())
    assert report["train_conversations"] + report["val_conversations"] == 40
    losses = _losses(out / "metrics.jsonl")
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert summary["final_val_loss"] is not None
    model, _ = load_model(ckpt, "cpu")           # the stage's checkpoint is a plain model checkpoint
    assert model.cfg.max_seq_len == 128
    assert json.loads((out / "samples.json").read_text())[0]["prompt"] == "Say hi."


def test_rows_shorter_than_the_context_set_the_accumulation(base_run):
    """sft.max_seq_len 32 on a model of context 128: a step of 3 micro-batches of 4 rows is 384 tokens."""
    from kiln.config import grad_accum_steps
    from kiln.formats.checkpoint import latest_checkpoint
    from kiln.post.common import stage_config
    cfg = post_config(base_run, "sft", max_seq_len=32, train={"micro_batch_size": 4, "batch_tokens": 384})
    scfg = stage_config(cfg, "sft", latest_checkpoint(base_run / "checkpoints"), 1)
    assert scfg.model.max_seq_len == 128 and scfg.train.seq_len == 32
    assert grad_accum_steps(scfg.train, scfg.model) == 3
    default = stage_config(post_config(base_run, "sft", max_seq_len=32, train={"micro_batch_size": 4}), "sft",
                           latest_checkpoint(base_run / "checkpoints"), 1)
    assert default.train.batch_tokens == 128 and grad_accum_steps(default.train, default.model) == 1


def test_sft_resume_continues_exactly(base_run, tmp_path):
    import shutil
    from kiln.post.sft import run_sft
    chats = _write_chats(tmp_path / "chats.jsonl")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_sft(_sft_cfg(base_run, chats, out=str(whole)))
    shutil.copytree(whole, cut)                                     # the same run, as if killed after step 3:
    shutil.rmtree(cut / "checkpoints" / "step_0000006")            # its newest checkpoint is step 3
    run_sft(_sft_cfg(base_run, chats, out=str(cut), resume=True))
    a, b = _losses(whole / "metrics.jsonl"), _losses(cut / "metrics.jsonl")
    assert len(a) == len(b) == 6
    assert a == b                                                   # bitwise: same batches, RNG, optimizer


def test_sft_refuses_to_overwrite_its_checkpoints(base_run, tmp_path):
    from kiln.config import ConfigError
    from kiln.post.sft import run_sft
    chats = _write_chats(tmp_path / "chats.jsonl")
    cfg = _sft_cfg(base_run, chats, max_steps=2)
    run_sft(cfg)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_sft(cfg)


def test_sft_lora_writes_a_peft_adapter_and_a_mergeable_checkpoint(base_run, tmp_path, capsys):
    from kiln.formats.checkpoint import latest_checkpoint, load_model
    from kiln.post.sft import run_sft
    chats = _write_chats(tmp_path / "chats.jsonl")
    cfg = _sft_cfg(base_run, chats, max_steps=3, lr=1e-2)
    cfg.sft.lora.enabled = True
    cfg.sft.lora.rank = 4
    cfg.sft.lora.dropout = 0.05
    run_sft(cfg)
    assert "--sft.lora.dropout 0 takes the grouped projection" in capsys.readouterr().err   # the slower path, said
    out = base_run / "sft"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged, _ = load_model(latest_checkpoint(out / "checkpoints"), "cpu")
    base, _ = load_model(latest_checkpoint(base_run / "checkpoints"), "cpu")
    x = torch.randint(0, 300, (1, 12))
    assert not torch.allclose(merged(x), base(x))        # the adapters changed the model...
    names = {k for k, _ in merged.named_parameters()}
    assert not any("lora" in n for n in names)            # ...and loading merged them into plain weights


def test_sft_rejects_and_counts_conversations_without_assistant_turns(base_run, tmp_path):
    from kiln.post.sft import run_sft
    chats = _write_chats(tmp_path / "chats.jsonl", n=12)
    with open(chats, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
        f.write("{not json\n")
    run_sft(_sft_cfg(base_run, chats, max_steps=1))
    report = json.loads((base_run / "sft" / "data_report.json").read_text())
    text = json.dumps(report["data"])
    assert "chats.jsonl" in text and report["train_conversations"] + report["val_conversations"] == 12


def test_nothing_to_train_on_says_where_every_record_went(base_run, tmp_path):
    """A file with no usable conversation stops the stage with the accounting in the message, and the report it
    points to is written."""
    from kiln.post.sft import run_sft
    chats = tmp_path / "bad.jsonl"
    chats.write_bytes(b'{"messages": [{"role": "user", "content": "only a question"}]}\n\xff\xfe\n{"trunc')
    with pytest.raises(ValueError) as e:
        run_sft(_sft_cfg(base_run, chats, max_steps=1, out=str(tmp_path / "out")))
    message = str(e.value)
    assert "3 records read, 0 kept" in message and "no_assistant_turn" in message and "invalid_utf8" in message
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["data"]["records_in"] == 3 and report["train_conversations"] == 0


def test_a_tiny_model_learns_to_answer_in_the_chat_format_and_stop(base_run):
    """SFT on built-in conversations (chatterbot): greedy replies to their questions end with the end-of-turn
    token; the base model, never shown the chat format, does not stop."""
    from kiln.formats.checkpoint import latest_checkpoint, load_model
    from kiln.post.sft import chat_samples, run_sft
    from kiln.tokenizer import Tokenizer
    cfg = post_config(base_run, "sft", packing="pad",
                      data={"sources": ["chatterbot"], "max_examples": 16, "val_fraction": 0.0},
                      train={"max_steps": 200, "micro_batch_size": 8, "lr": 1e-2, "warmup_steps": 5,
                             "eval_every": 1000, "checkpoint_every": 1000, "log_every": 20, "precision": "fp32",
                             "threads": 2, "sample_prompts": ["What is AI?", "Are you sentient?",
                                                              "Are you sapient?"]})
    run_sft(cfg)
    samples = json.loads((base_run / "sft" / "samples.json").read_text())
    assert all(s["stopped"] and s["reply"].strip() for s in samples), samples
    tok = Tokenizer.from_file(base_run / "tokenizer")
    base, _ = load_model(latest_checkpoint(base_run / "checkpoints"), "cpu")
    before = chat_samples(base, tok, [s["prompt"] for s in samples])
    assert not any(s["stopped"] for s in before), before


def test_the_stage_asks_for_document_bounds_only_where_flash_can_take_them():
    from kiln.model.llama import varlen_supported
    assert not varlen_supported(torch.device("cpu"))   # the CPU keeps the document mask (and no bounds)
