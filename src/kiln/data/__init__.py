"""Data stage: read raw text, normalise, dedup and split it into Parquet shards with a full accounting report."""

__all__ = ["run_data"]


def __getattr__(name: str):
    # Lazy: `kiln.data.benchmarks` (read by eval) must not pull in the whole cleaning pipeline's dependencies.
    if name == "run_data":
        from kiln.data.run import run_data
        return run_data
    raise AttributeError(f"module 'kiln.data' has no attribute {name!r}")
