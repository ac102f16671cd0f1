from kiln.report.report import _training_table


def _row(step, loss, val=None):
    r = {"step": step, "loss": loss, "tokens": 1000 * step, "tok_per_s": 500.0}
    return {**r, "val_loss": val} if val is not None else r


def test_training_section_points_to_the_best_checkpoint_when_validation_went_back_up():
    metrics = [_row(1, 5.0, 4.0), _row(2, 3.0, 2.5), _row(3, 2.0, 2.9)]
    text = "\n".join(_training_table(metrics))
    assert "last 2.9000 (step 3), best 2.5000 (step 2)" in text
    assert "`kiln eval --eval.checkpoint best`" in text
    assert "`train.keep_best` would have kept" in "\n".join(_training_table(metrics, keep_best=False))


def test_no_pointer_when_the_last_evaluation_is_the_best():
    text = "\n".join(_training_table([_row(1, 5.0, 4.0), _row(2, 3.0, 2.5)]))
    assert "last 2.5000 (step 2), best 2.5000 (step 2)" in text and "checkpoints/best" not in text


def test_evaluation_section_shows_divergence_benchmarks_memorisation_and_skips():
    from kiln.eval.divergence import DivergenceWatch
    from kiln.report.evaluation import eval_section

    w = DivergenceWatch()
    for step, (train, val) in enumerate([(3.0, 3.0), (2.9, 3.1), (2.8, 3.2)], 1):
        w.observe_train(train)
        w.observe_val(step * 10, val)
    ev = {"checkpoint": "ckpt", "step": 30, "chat": False, "divergence": {"warnings": w.fired},
          "skipped": {"val": "no validation tokens"}, "files": {"a.txt": {"loss": 1.0, "perplexity": 2.72,
                                                                          "bits_per_byte": 0.5, "tokens": 10}}}
    card = [{"benchmark": "mmlu", "format": "cloze", "shots": 0, "n": 5, "acc": 0.4, "acc_norm": 0.6,
             "harness": "kiln", "harness_version": "0.1.0", "seed": 0},
            {"benchmark": "bigbench:x", "format": "-", "n": 0, "harness": "kiln", "error": "x: no such file"}]
    mem = {"prefix_tokens": 32, "new_tokens": 64, "threshold": 50, "index_tokens": 1000,
           "groups": {"train": {"n": 4, "share_at_threshold": 0.25, "mean_longest": 12.5, "max_longest": 60,
                                "extractable": 0.25},
                      "unseen": {"n": 4, "share_at_threshold": 0.0, "mean_longest": 3.0, "max_longest": 5,
                                 "extractable": None}},
           "examples": [{"group": "train", "prompt": "p", "generation": "g", "match_tokens": 60}]}
    text = "\n".join(eval_section(ev, card, mem, None))
    assert "**Warning (step 30):** validation loss rose from 3.0000 to 3.2000" in text
    assert "| mmlu | cloze | 0 | 5 | acc 0.4000, acc_norm 0.6000 | kiln 0.1.0 | 0 |" in text
    assert "not scored: x: no such file" in text
    assert "| train | 4 | 25.0% | 12.5 | 60 | 25.0% |" in text and "| unseen | 4 | 0.0% | 3.0 | 5 | — |" in text
    assert "Not measured: val (no validation tokens)." in text and "| a.txt | 1.0000 |" in text
