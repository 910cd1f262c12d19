"""Data: traces and benchmarks in, tokenized Parquet out (the prepare stage's library)."""
