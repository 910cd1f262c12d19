"""Test setup for the sae stage (helpers, no tests): a real `extract` stage folder in the extract schema.

`write_extract_stage(run_dir, ...)` runs `rank1_core.rundir.run_stage` for a stage named
`extract` whose body writes `activations/part-*.parquet` (doc_id int64, pos int32, token_id
int32, one float32 column `L{layer:02d}_{module}` per adapter component) and
`components.parquet` (component_id, column, layer, module, kind, a_norm, b_norm), from
synthetic data with sparse structure: each token is a sum of a few of `n_true` directions,
columns scaled differently per layer, plus a little noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rank1_core.rundir import RunDir, run_stage

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def component_columns(layers: int) -> list[str]:
    return [f"L{layer:02d}_{m}" for layer in range(layers) for m in MODULES]


def synthetic_activations(n: int, d: int, *, n_true: int = 24, active: int = 3, seed: int = 0,
                          noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_true, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    pick = rng.random((n, n_true)).argsort(axis=1)[:, :active]
    codes = np.zeros((n, n_true))
    np.put_along_axis(codes, pick, rng.exponential(1.0, size=(n, active)) + 0.5, axis=1)
    col_scale = np.exp(rng.normal(0, 1, size=d))
    offset = rng.normal(0, 0.5, size=d)
    x = (codes @ dirs + noise * rng.normal(size=(n, d))) * col_scale + offset
    return x.astype(np.float32)


def activation_table(x: np.ndarray, columns: list[str], first_doc: int = 0, doc_len: int = 50) -> pa.Table:
    n = len(x)
    idx = np.arange(n)
    cols = {"doc_id": pa.array(first_doc + idx // doc_len, pa.int64()),
            "pos": pa.array(idx % doc_len, pa.int32()),
            "token_id": pa.array((idx * 7919) % 151000, pa.int32())}
    for j, c in enumerate(columns):
        cols[c] = pa.array(x[:, j], pa.float32())
    return pa.table(cols)


def catalogue(layers: int) -> pa.Table:
    rows = [(i, f"L{layer:02d}_{m}", layer, m, "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "attn")
            for i, (layer, m) in enumerate((layer, m) for layer in range(layers) for m in MODULES)]
    return pa.table({"component_id": pa.array([r[0] for r in rows], pa.int32()),
                     "column": [r[1] for r in rows], "layer": pa.array([r[2] for r in rows], pa.int32()),
                     "module": [r[3] for r in rows], "kind": [r[4] for r in rows],
                     "a_norm": pa.array(np.ones(len(rows)), pa.float32()),
                     "b_norm": pa.array(np.ones(len(rows)), pa.float32())})


def write_extract_stage(run_dir: str | Path, *, tokens: int = 2000, layers: int = 2, files: int = 2,
                        seed: int = 0, x: np.ndarray | None = None, table_edit=None) -> np.ndarray:
    """Create a finished `extract` stage in `run_dir`; return the activations [tokens, layers*7].

    `table_edit(i, table) -> table` may alter file i's table (bad-input tests)."""
    columns = component_columns(layers)
    if x is None:
        x = synthetic_activations(tokens, len(columns), seed=seed)
    stage = RunDir(str(run_dir)).stage("extract")
    bounds = np.linspace(0, len(x), files + 1).astype(int)

    def body(sr):
        sr.stage.fs.create_dir(sr.stage.path("activations"), recursive=True)
        for i in range(files):
            lo, hi = bounds[i], bounds[i + 1]
            tab = activation_table(x[lo:hi], columns, first_doc=lo // 50 + 1000 * i)
            if table_edit is not None:
                tab = table_edit(i, tab)
            pq.write_table(tab, sr.stage.path("activations", f"part-{i:05d}.parquet"))
        pq.write_table(catalogue(layers), sr.stage.path("components.parquet"))
        sr.rows["tokens"] = len(x)

    run_stage(stage, f"test-{seed}-{tokens}-{layers}", "test: synthetic extract\n", body, log=lambda m: None)
    return x
