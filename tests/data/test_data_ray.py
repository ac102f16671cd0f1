"""The Ray executor against the local process pool: same pipeline, byte-identical output (skips without Ray)."""

import pytest
from test_data_run import config, jsonl, untimed, write_mixed_corpus

from kiln.config import NearDedupConfig
from kiln.data import run_data

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'llmkiln[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
# "thread", not the suite's "signal": ray.get blocks in Ray's C++ core, which swallows the exception that
# the SIGALRM handler raises, so a hung task would hang CI; "thread" ends the run with every thread's stack.
@pytest.mark.timeout(120, method="thread")
def test_ray_executor_output_is_byte_identical_to_local(tmp_path, local_ray):
    write_mixed_corpus(tmp_path / "in")
    for i in range(20):
        (tmp_path / "in" / f"many{i:02d}.jsonl").write_bytes(
            jsonl([f"file {i} doc {j}: " + "the quick brown fox jumps over the lazy dog " * (j % 5 + 1)
                   for j in range(i)]))
    reports, outputs = [], []
    for executor in ("local", "ray"):
        cfg = config(tmp_path / executor, [tmp_path / "in"], workers=2, executor=executor, shard_docs=50,
                     min_chars=5, max_doc_chars=1000, val_fraction=0.2, test_fraction=0.1,
                     near_dedup=NearDedupConfig())
        r = run_data(cfg)
        reports.append(untimed(r))
        files = sorted((cfg.run_path / "data").glob("*/*.parquet"))
        outputs.append({f.relative_to(cfg.run_path).as_posix(): f.read_bytes() for f in files})
    assert reports[0] == reports[1]
    assert reports[0]["kept"] > 50 and reports[0]["quarantined"] > 0
    assert len(outputs[0]) > 3 and outputs[0] == outputs[1]
