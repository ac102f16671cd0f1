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
