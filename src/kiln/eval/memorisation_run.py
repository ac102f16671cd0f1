"""The memorisation part of `kiln eval`: index the run's training tokens, prompt with training and
held-out prefixes through the scorer's engine, and keep the result in the report's shape."""

from __future__ import annotations

import time

import numpy as np
import pyarrow.parquet as pq

from kiln.config.rundir import RunDir
from kiln.eval.memorisation import TokenIndex, decode_examples, measure_memorisation
from kiln.eval.scoring import Scorer


def unseen_documents(rd: RunDir, need: int, limit: int) -> list[np.ndarray]:
    """Up to `limit` held-out documents of at least `need` tokens, from the validation split (then test)."""
    docs: list[np.ndarray] = []
    for split in ("val", "test"):
        for f in rd.token_files(split):
            for ids in pq.read_table(f, columns=["ids"]).column("ids").to_pylist():
                if len(ids) >= need:
                    docs.append(np.asarray(ids, dtype=np.int64))
                    if len(docs) >= limit:
                        return docs
    return docs


def run_memorisation(scorer: Scorer, rd: RunDir, m) -> dict:
    """`m` is eval.memorisation. Prompts start after BOS, as the documents did in training."""
    t0 = time.perf_counter()
    if m.prefix_tokens + m.new_tokens + 1 > scorer.max_len:
        raise ValueError(f"prefix_tokens + new_tokens + BOS = {m.prefix_tokens + m.new_tokens + 1} exceed the model's "
                         f"{scorer.max_len}-token context; lower eval.memorisation.prefix_tokens / new_tokens")
    index = TokenIndex.from_run(rd, "train", max_tokens=m.max_index_tokens)
    need = m.prefix_tokens + m.new_tokens
    unseen = unseen_documents(rd, need, 4 * m.documents)
    if not unseen:
        raise ValueError(f"no validation or test document holds prefix_tokens + new_tokens = {need} tokens, so "
                         "nothing unseen to compare with; lower eval.memorisation.prefix_tokens / new_tokens")
    bos = [scorer.tok.bos_id] if scorer.tok.bos_id is not None else []

    def generate(prompts: list[list[int]], new: int) -> list[list[int]]:
        return scorer.generate_tokens([bos + p for p in prompts], new, ignore_stop_ids=True)

    raw = measure_memorisation(generate, index.documents(), unseen, index, m.prefix_tokens, m.new_tokens,
                               m.threshold, max_docs=m.documents)
    text = decode_examples(raw, scorer.tok.decode, index)
    groups = {}
    for g in ("train", "unseen"):
        r = raw[g]
        groups[g] = {"n": r["n"], "share_at_threshold": r["share_match"], "mean_longest": r["mean_longest"],
                     "max_longest": r["max_longest"], "quantiles": r["quantiles"], "histogram": r["histogram"],
                     "extractable": r.get("share_extractable")}
    examples = [{"group": g, "prompt": ex["prompt"], "generation": ex["generated"], "matched": ex["matched"],
                 "match_tokens": ex["match_length"], "training_document": ex.get("corpus_doc_id")}
                for g in ("train", "unseen") for ex in text[g] if ex["match_length"] > 0]
    return {"prefix_tokens": m.prefix_tokens, "new_tokens": m.new_tokens, "threshold": m.threshold,
            "index_tokens": raw["index"].get("tokens", index.describe().get("tokens")), "index": raw["index"],
            "groups": groups, "examples": sorted(examples, key=lambda e: -e["match_tokens"])[:10],
            "seconds": time.perf_counter() - t0}
