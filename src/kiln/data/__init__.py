"""Data stage: read raw text, normalise, dedup and split it into Parquet shards with a full accounting report."""

from kiln.data.run import run_data

__all__ = ["run_data"]
