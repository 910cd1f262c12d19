"""The concepts stage end to end, without Ray: a real prepare stage (tiny config: synthetic
traces with planted spans, or s1K-format rows) and an extract stage written here in its
schema whose component L00_q_proj is planted to fire on hesitations. Outputs, views in
`rank1 sql`, token positions of the planted spans, bad input that keeps earlier output."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core import sql as S
from rank1_core.concepts import ConceptError
from rank1_core.data.io import DataError
from rank1_core.data.synthetic import S1K_COLUMNS
from rank1_core.rundir import RunDir, run_stage

from conftest import REPO

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rank1_core.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def write_extract(run_dir, tokenizer, *, planted: str | None = "hesitation", seed: int = 0) -> None:
    """A finished extract stage over prepare's tokens: 2 layers x 7 components of noise (one,
    L00_q_proj, + 6 on `planted`'s tokens), 4 neurons per layer, and the tokens table."""
    run = RunDir(str(run_dir))
    tok = pq.read_table(run.stage("prepare").path("tokens")).to_pandas()
    spans = pq.read_table(run.stage("prepare").path("spans.parquet")).to_pandas()
    rng = np.random.default_rng(seed)
    cols = [f"L{layer:02d}_{m}" for layer in range(2) for m in MODULES]
    hot = {(int(r.doc_id), p) for r in spans[spans["concept"] == planted].itertuples() for p in range(r.start, r.end)}

    def body(sr):
        st = sr.stage
        for d in ("activations", "neurons", "tokens"):
            st.fs.create_dir(st.path(d), recursive=True)
        for i, part in enumerate(np.array_split(np.arange(len(tok)), 3)):
            rows = list(tok.iloc[part].itertuples())
            doc = np.concatenate([[r.doc_id] * r.num_tokens for r in rows])
            pos = np.concatenate([np.arange(r.num_tokens) for r in rows])
            ids = np.concatenate([r.input_ids for r in rows])
            x = rng.normal(size=(len(doc), len(cols))).astype(np.float32)
            x[[j for j, (d, p) in enumerate(zip(doc, pos)) if (int(d), int(p)) in hot], 0] += 6.0
            base = {"doc_id": pa.array(doc, pa.int64()), "pos": pa.array(pos, pa.int32())}
            pq.write_table(pa.table({**base, "token_id": pa.array(ids, pa.int32()),
                                     **{c: x[:, j] for j, c in enumerate(cols)}}), st.path("activations", f"p{i}.parquet"))
            neurons = {f"N{layer:02d}_{k:04d}": rng.normal(size=len(doc)).astype(np.float32)
                       for layer in range(2) for k in range(4)}
            pq.write_table(pa.table({**base, **neurons}), st.path("neurons", f"p{i}.parquet"))
            pq.write_table(pa.table({**base, "token_id": pa.array(ids, pa.int32()),
                                     "token": [tokenizer.decode([int(t)]) for t in ids], "split": ["train"] * len(doc)}),
                           st.path("tokens", f"p{i}.parquet"))
        pq.write_table(pa.table({"component_id": pa.array(range(len(cols)), pa.int32()), "column": cols}),
                       st.path("components.parquet"))
        pq.write_table(pa.table({"column": list(neurons)}), st.path("neuron_catalogue.parquet"))

    run_stage(run.stage("extract"), f"test-extract-{seed}-{planted}", "", body, log=lambda m: None)


def test_planted_spans_map_to_exact_tokens(prepared_run, tokenizer):
    run = RunDir(str(prepared_run))
    traces = pq.read_table(run.stage("prepare").path("traces.parquet")).to_pandas().set_index("doc_id")
    tokens = pq.read_table(run.stage("prepare").path("tokens")).to_pandas().set_index("doc_id")
    spans = pq.read_table(run.stage("prepare").path("spans.parquet")).to_pandas()
    assert {"think", "answer", "operator", "step_result", "final_answer"} <= set(spans["concept"])
    for r in spans.itertuples():
        text = traces.loc[r.doc_id, "thinking" if r.field == "thinking" else "attempt"][r.char_start:r.char_end]
        ids = tokens.loc[r.doc_id, "input_ids"]
        got = tokenizer.decode(list(ids[r.start:r.end]))
        assert text.strip() in got and len(got.strip()) <= len(text.strip()) + 2, (r.concept, text, got)
        if r.concept not in ("think", "answer"):  # small spans: the tokens are exactly the text
            assert got.strip() == text.strip()


def test_stage_writes_labels_scores_and_the_table(prepared_run, copy_run, tiny_cfg, tokenizer, capsys):
    from ray_jobs import concepts

    run_dir = copy_run(prepared_run)
    write_extract(run_dir, tokenizer)
    cfg = tiny_cfg("concepts.bootstrap=40", run_dir=run_dir)
    m = concepts.run(cfg)
    out = capsys.readouterr().out
    assert "Ground truth: clean = best-concept AUROC >= 0.9 and top-64 precision >= 0.8" in out
    assert m["rows"]["features:adapter"] == 14 and m["rows"]["features:neuron"] == 8
    assert m["rows"]["features:random"] == 16
    run = RunDir(str(run_dir))
    con = S.connect(run)
    # labels are visible in `rank1 sql`, one row per labelled token
    kinds = dict(con.execute("SELECT concept, kind FROM concept_catalogue").fetchall())
    assert kinds["hesitation"] == "planted" and kinds["think"] == "section" and kinds["number"] == "lexical"
    assert kinds["after_equals"] == "sql"
    n_hes = con.execute("SELECT count(*) FROM concept_labels WHERE concept = 'hesitation'").fetchone()[0]
    assert n_hes == m["extra"]["concepts"]["hesitation"]["tokens"] > 0
    words = con.execute("SELECT DISTINCT trim(t.token) FROM concept_labels l JOIN tokens t USING (doc_id, pos) "
                    "WHERE l.concept = 'hesitation'").fetchall()
    assert {w for (w,) in words} <= {"Wait", "Hmm"}
    # the planted component is a clean hesitation detector; its controls are not
    f = con.execute("SELECT concept, class, auroc FROM concept_features WHERE source = 'adapter' AND feature = 'L00_q_proj' "
                "AND labels = 'true'").fetchone()
    assert f[0] in ("hesitation", "hesitation_word") and f[1] == "clean" and f[2] > 0.99
    shuffled = con.execute("SELECT auroc FROM concept_scores WHERE feature = 'L00_q_proj' AND sign = 'pos' "
                       "AND labels = 'shuffled' AND concept = 'hesitation'").fetchone()[0]
    assert shuffled < 0.8
    s = {(r[0], r[1]): r[2:] for r in con.execute("SELECT source, labels, clean, clean_lo, clean_hi FROM concept_summary")
         .fetchall()}
    assert s[("adapter", "true")][0] == pytest.approx(1 / 14)
    assert s[("random", "true")][0] == 0.0 and s[("neuron", "true")][0] == 0.0
    best = con.execute("SELECT source, feature, auroc, random_auroc FROM concept_best WHERE concept = 'hesitation'").fetchall()
    assert ("adapter", "L00_q_proj") in {(b[0], b[1]) for b in best}
    # rerun: done already, skipped
    assert concepts.run(cfg)["config_hash"] == m["config_hash"]


def test_bad_sql_concept_keeps_the_earlier_output(prepared_run, copy_run, tiny_cfg, tokenizer, tmp_path):
    from ray_jobs import concepts

    run_dir = copy_run(prepared_run)
    write_extract(run_dir, tokenizer)
    concepts.run(tiny_cfg("concepts.bootstrap=0", "concepts.random_directions=0", run_dir=run_dir))
    before = (run_dir / "concepts" / "summary.parquet").read_bytes()
    bad = tmp_path / "beyond.sql"
    bad.write_text("SELECT doc_id, max(pos) + 1 AS pos FROM tokens GROUP BY doc_id")
    with pytest.raises(ConceptError, match=r"beyond\.sql: SQL concept 'beyond': \d+ position\(s\) outside"):
        concepts.run(tiny_cfg("concepts.bootstrap=0", f"concepts.sql=[{{name: beyond, query: '{bad}'}}]",
                              run_dir=run_dir))
    assert (run_dir / "concepts" / "summary.parquet").read_bytes() == before
    assert (run_dir / "concepts" / "_SUCCESS").exists()
    # a label span outside its trace (a corrupted spans file) names the concept and the file
    sp = run_dir / "prepare" / "spans.parquet"
    t = pq.read_table(sp).to_pandas()
    t.loc[t.index[-1], "end"] = 10_000
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), sp)
    with pytest.raises(ConceptError, match=r"spans\.parquet: span of concept '\w+' in doc \d+ .* lies outside its trace"):
        concepts.run(tiny_cfg("concepts.bootstrap=0", run_dir=run_dir), force=True)
    assert (run_dir / "concepts" / "summary.parquet").read_bytes() == before


def s1k_rows() -> list[dict]:
    rows = []
    for i in range(6):
        think = (f"We need {i} + 2. Wait, is that right? {i} + 2 = {i + 2}.\nHmm, let me verify.\nYes, {i + 2}."
                 if i % 2 else f"Compute {i} + 2 = {i + 2}.\nDone.")
        row = {c: "" for c in S1K_COLUMNS}
        row.update(question=f"What is {i} + 2?", solution=str(i + 2), cot_type="math", source_type="test",
                   metadata=json.dumps({"id": i}), deepseek_thinking_trajectory=think,
                   deepseek_attempt=f"The answer is {i + 2}.", gemini_thinking_trajectory=think,
                   gemini_attempt=f"The answer is {i + 2}.")
        rows.append(row)
    return rows


def test_s1k_format_data_lexical_and_sql_concepts(tmp_path, tiny_cfg, tokenizer):
    from ray_jobs import concepts, prepare

    data = tmp_path / "s1k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in s1k_rows()))
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("data.source=s1k", f"data.path={data}", "data.num_traces=0", "data.heldout_traces=1",
                   "data.benchmarks=[]", "concepts.bootstrap=20", run_dir=run_dir)
    prepare.run(cfg)
    write_extract(run_dir, tokenizer, planted="think")
    m = concepts.run(cfg)
    kinds = {k: v["kind"] for k, v in m["extra"]["concepts"].items()}
    assert kinds == {"think": "section", "answer": "section", "hesitation_word": "lexical", "number": "lexical",
                     "newline": "lexical", "after_equals": "sql"}
    con = S.connect(RunDir(str(run_dir)))
    hes = con.execute("SELECT trim(t.token) FROM concept_labels l JOIN tokens t USING (doc_id, pos) "
                  "WHERE concept = 'hesitation_word'").fetchall()
    assert sorted(w for (w,) in hes) == ["Hmm"] * 3 + ["Wait"] * 3
    eq = con.execute("SELECT trim(t.token) FROM concept_labels l JOIN tokens t USING (doc_id, pos) "
                 "WHERE concept = 'after_equals'").fetchall()
    assert len(eq) == 6 and all(w.isdigit() for (w,) in eq)


def test_prepare_rejects_a_span_outside_its_trace(tmp_path, tiny_cfg):
    from ray_jobs import prepare

    rows = s1k_rows()
    rows[2]["metadata"] = json.dumps({"spans": [{"concept": "hesitation", "field": "thinking", "start": 5, "end": 999}]})
    data = tmp_path / "s1k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg("data.source=s1k", f"data.path={data}", "data.num_traces=0", "data.heldout_traces=1",
                   "data.benchmarks=[]")
    with pytest.raises(DataError, match=r"s1k\.jsonl: trace \d+: span of concept 'hesitation' \(thinking characters "
                                        r"5\.\.999\) lies outside"):
        prepare.run(cfg)
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_demo_config_runs_the_stage():
    from rank1_core.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert "concepts" in cfg.stages and cfg.stages.index("concepts") > cfg.stages.index("topk")
    assert cfg.stages.index("concepts") < cfg.stages.index("report")


def test_report_ground_truth_section_and_feature_pages(prepared_run, copy_run, tiny_cfg, tokenizer, tmp_path):
    from rank1_core.report.build import build_report
    from ray_jobs import concepts

    run_dir = copy_run(prepared_run)
    write_extract(run_dir, tokenizer)
    cfg = tiny_cfg("concepts.bootstrap=20", run_dir=run_dir)
    concepts.run(cfg)
    out = tmp_path / "report"
    res = build_report(str(run_dir), cfg.report, out, log=lambda m: None)
    assert "ground_truth" in res.rendered
    index = (out / "index.html").read_text()
    assert "Ground truth" in index and "figures/ground_truth.png" in index and "shuffled" in index
    page = (out / "features" / "adapter" / "L00_q_proj.html").read_text()
    assert "ground truth: hesitation" in page and "concept AUROCs" in page
    # the feature index carries each feature's best concept and AUROC, and sorts by it (index.js
    # sorts any column by its data key: the header's data-k)
    html = (out / "features.html").read_text()
    assert '<th data-k="gt_auroc" class="num"' in html
    data = json.loads(re.search(r'id="index-data">(.*?)</script>', html, re.S).group(1))
    rows = [dict(zip(data["columns"], r)) for r in data["rows"]]
    best = pq.read_table(run_dir / "concepts" / "features.parquet").to_pandas()
    best = best[best["labels"] == "true"].set_index(["source", "feature"])
    adapter = [r for r in rows if r["source"] == "adapter"]
    assert len(adapter) == 14
    for r in adapter:
        b = best.loc[("adapter", r["id"])]
        assert (r["gt_concept"], r["gt_sign"]) == (b["concept"], b["sign"])
        assert r["gt_auroc"] == pytest.approx(b["auroc"], abs=1e-3)
    by_auroc = sorted(adapter, key=lambda r: -r["gt_auroc"])
    assert by_auroc[0]["id"] == "L00_q_proj" and by_auroc[0]["gt_concept"] == "hesitation"
    assert by_auroc[0]["gt_auroc"] > 0.9 > by_auroc[1]["gt_auroc"]
    js = (out / "assets" / "index.js").read_text()
    assert '"gt_auroc"].indexOf(k) >= 0 ? -1 : 1' in js  # highest AUROC first on the first click


def test_a_copied_explanation_is_never_the_headline():
    from rank1_core.autointerp.prompts import EXPLAIN_INSTRUCTIONS
    from rank1_core.report import dashboards as dash

    copied = " ".join(EXPLAIN_INSTRUCTIONS.split()[:12])
    data = {"id": "L00_q_proj", "source": "adapter", "toks": [], "pos": [], "neg": [], "trace": None}
    row = {"key": "L00_q_proj", "source": "adapter", "explanation": copied, "explanation_copied": True,
           "gt_concept": "hesitation", "gt_sign": "pos", "gt_auroc": 0.97, "gt_precision": 0.9, "gt_class": "clean"}
    page = dash.feature_page(row, data, "", {}, None)
    head = page.split('id="explanation"')[1].split("</p>")[0]
    assert "ground truth: hesitation (AUROC 0.97)" in head and dash.esc(copied) not in head
    assert "flagged explanation" in page
    row.update(explanation="fires on Wait", explanation_copied=False)
    head = dash.feature_page(row, data, "", {}, None).split('id="explanation"')[1].split("</p>")[0]
    assert "fires on Wait" in head
