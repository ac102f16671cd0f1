"""The divergence watch fires when validation loss rises while training loss falls, and only then."""

import json

from kiln.eval.divergence import DivergenceWatch, divergence_of


def feed(train_val):
    w, fired = DivergenceWatch(patience=2), []
    for step, (train, val) in enumerate(train_val, 1):
        w.observe_train(train)
        if (x := w.observe_val(step * 100, val)) is not None:
            fired.append(x)
    return fired


def test_fires_once_when_validation_rises_twice_while_training_falls():
    curve = [(3.0, 3.1), (2.8, 2.95), (2.6, 2.90), (2.4, 2.93), (2.2, 2.99), (2.0, 3.05), (1.9, 3.10)]
    fired = feed(curve)
    assert len(fired) == 1
    w = fired[0]
    assert (w["from_step"], w["step"]) == (300, 500)
    assert w["val_loss"] == [2.90, 2.99] and w["train_loss"] == [2.6, 2.2]
    assert "rose from 2.9000 to 2.9900" in w["message"]


def test_silent_when_both_fall_or_both_rise_or_on_a_single_rise():
    assert feed([(3.0, 3.1), (2.8, 2.9), (2.6, 2.8), (2.4, 2.7)]) == []
    assert feed([(3.0, 3.1), (3.2, 3.2), (3.4, 3.3), (3.6, 3.4)]) == []      # training diverges too: not overfitting
    assert feed([(3.0, 3.1), (2.8, 2.9), (2.6, 2.95), (2.4, 2.8), (2.2, 2.85), (2.0, 2.7)]) == []   # noise
    assert feed([(3.0, 3.1), (2.8, 3.1001), (2.6, 3.1002)]) == []            # within tolerance


def test_fires_again_after_a_recovery():
    curve = [(3.0, 3.0), (2.9, 3.1), (2.8, 3.2), (2.7, 3.0), (2.6, 3.1), (2.5, 3.2)]
    assert [w["step"] for w in feed(curve)] == [300, 600]


def test_replays_a_metrics_file_with_a_torn_last_line(tmp_path):
    lines = []
    for i, (train, val) in enumerate([(3.0, 3.0), (2.9, 3.1), (2.8, 3.2)], 1):
        lines += [json.dumps({"step": i * 10 - 5, "loss": train + 0.05}), json.dumps({"step": i * 10, "loss": train, "val_loss": val})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 35, "lo')
    got = divergence_of(tmp_path / "metrics.jsonl")
    assert got["evaluations"] == 3 and [w["step"] for w in got["warnings"]] == [30]
