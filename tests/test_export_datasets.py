"""The activation store opens as a Hugging Face `datasets` dataset with the one call the
README documents: load_dataset("parquet", data_files=".../extract/activations/*.parquet")."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from test_sae_fixtures import component_columns, write_extract_stage

datasets = pytest.importorskip("datasets", reason="datasets is in the dev extras (pip install -e '.[dev]')")


def test_activation_parquet_loads_as_hf_dataset(tmp_path):
    x = write_extract_stage(tmp_path / "run", tokens=300, layers=2, files=2)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "run/extract/activations/*.parquet"),
                               split="train", cache_dir=str(tmp_path / "hf-cache"))
    cols = component_columns(2)
    assert ds.num_rows == 300
    assert ds.column_names == ["doc_id", "pos", "token_id", *cols]
    assert ds.features["L00_q_proj"].dtype == "float32" and ds.features["doc_id"].dtype == "int64"
    # same rows, same values, same order as pyarrow reads the folder
    ref = pq.read_table(tmp_path / "run/extract/activations")
    np.testing.assert_array_equal(np.asarray(ds["doc_id"]), ref.column("doc_id").to_numpy())
    got = np.stack([np.asarray(ds[c], dtype=np.float32) for c in cols], 1)
    np.testing.assert_array_equal(got, x)
    # and as torch tensors, for a training loop
    t = ds.with_format("torch", columns=cols[:3])[:4]
    assert tuple(t["L00_q_proj"].shape) == (4,)
