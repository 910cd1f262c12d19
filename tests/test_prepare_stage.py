"""The prepare stage end to end on the tiny config: outputs, manifest, skip on rerun."""

import json

import pyarrow.parquet as pq

from rank1_core.data.synthetic import question_key
from ray_jobs import prepare


def test_prepare_writes_tokens_traces_benchmarks(prepared_run):
    tokens = pq.read_table(prepared_run / "prepare" / "tokens").to_pylist()
    traces = pq.read_table(prepared_run / "prepare" / "traces.parquet").to_pylist()
    bench = pq.read_table(prepared_run / "prepare" / "benchmarks" / "arith-heldout.parquet").to_pylist()
    assert len(tokens) == len(traces) == 48
    assert sorted(t["doc_id"] for t in tokens) == list(range(48))
    assert sum(t["split"] == "heldout" for t in tokens) == 8
    for t in tokens:
        assert len(t["input_ids"]) == len(t["loss_mask"]) == t["num_tokens"]
        assert sum(t["loss_mask"]) == t["num_tokens"] - t["prompt_len"] > 0
    assert len(bench) == 16
    # held-out benchmark problems never appear among the training traces
    assert not {question_key(b["question"]) for b in bench} & {question_key(t["question"]) for t in traces}
    m = json.loads((prepared_run / "prepare" / "manifest.json").read_text())
    assert m["rows"]["traces"] == 48 and m["rows"]["tokens"] == sum(t["num_tokens"] for t in tokens)
    assert m["rows"]["benchmark:arith-heldout"] == 16
    assert (prepared_run / "prepare" / "_SUCCESS").read_text().strip() == m["config_hash"]


def test_prepare_skips_on_rerun_and_redoes_on_change(tiny_cfg, copy_run, prepared_run, capsys):
    run = copy_run(prepared_run)
    before = (run / "prepare" / "manifest.json").read_text()
    prepare.run(tiny_cfg(run_dir=run))
    assert "skipping" in capsys.readouterr().out
    assert (run / "prepare" / "manifest.json").read_text() == before
    prepare.run(tiny_cfg("data.num_traces=20", run_dir=run))
    assert pq.read_table(run / "prepare" / "tokens").num_rows == 20
