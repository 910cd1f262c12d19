"""The report stage: tables against hand-worked numbers, escaping, histograms, a full report
of a synthetic run in the stage output schemas, partial runs and missing columns, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core.config import ConfigError, ReportConfig
from rank1_core.report import build_report
from rank1_core.report import dashboards as dash
from rank1_core.report import tables as tabs
from rank1_core.report.activations import Histograms, window_for
from rank1_core.report.catalogue import category_names
from rank1_core.report.loaders import feature_key
from rank1_core.report.synthetic import EVIL, SyntheticSpec, make_synthetic_run
from rank1_core.rundir import RunDir, run_stage

ALL = ("train", "train_full", "evaluate", "ablate", "extract", "topk", "sae", "autointerp")


@pytest.fixture(scope="module")
def evil_report(tmp_path_factory):
    """A complete synthetic run with injection strings everywhere, and its report."""
    root = tmp_path_factory.mktemp("report")
    run = make_synthetic_run(str(root / "run"), SyntheticSpec(evil=True))
    res = build_report(run, ReportConfig(), root / "run" / "report", log=lambda m: None)
    return run, root / "run" / "report", res


# --------------------------------------------------------------------------- tables


def test_table1_recovery_matches_the_paper():
    # Paper, Table 1: AIME'24 0.2333 / 0.5000 / 0.6000 -> 72.73%; MATH500 -> 86.36%.
    s = pd.DataFrame({"variant": ["base", "lora", "full"] * 2, "benchmark": ["aime"] * 3 + ["math500"] * 3,
                      "pass1": [0.2333, 0.5, 0.6, 0.834, 0.91, 0.922], "stderr": [0.01] * 6,
                      "n_problems": [30] * 3 + [500] * 3, "n_samples": [1] * 6})
    t1 = tabs.table1(s)
    assert list(t1["benchmark"]) == ["aime", "math500"]
    assert t1["recovery_pct"].round(2).tolist() == [72.73, 86.36]
    disp = tabs.table1_display(t1)
    assert disp.columns.tolist() == ["Benchmark", "Problems", "Base", "Rank-1 LoRA", "Full fine-tune", "% Recovery"]
    assert disp["% Recovery"].tolist() == ["72.73%", "86.36%"]
    assert disp["Base"][0] == "0.2333 ± 0.0100"


def test_table1_without_full_variant_says_na():
    s = pd.DataFrame({"variant": ["base", "lora"], "benchmark": ["b", "b"], "pass1": [0.1, 0.5]})
    t1 = tabs.table1(s)
    assert "full" not in t1.columns
    assert tabs.table1_display(t1)["% Recovery"].tolist() == ["n/a"]
    assert tabs.recovery(0.5, 0.3, 0.3) is None  # full == base: undefined, not a division by zero


def test_table2_shares_match_the_paper():
    # Paper, Table 2 (AIME'24): b 0.2333, l 0.5000; attn-ablated 0.3667 -> 50.02%, mlp 0.1333 -> -37.50%.
    groups = pd.DataFrame({"variant": ["attn_ablated", "mlp_ablated"], "benchmark": ["aime", "aime"],
                           "pass1": [0.3667, 0.1333]})
    summary = pd.DataFrame({"variant": ["base", "lora"], "benchmark": ["aime", "aime"], "pass1": [0.2333, 0.5]})
    t2 = tabs.table2_from_groups(groups, summary)
    assert round(t2["attn_ablated_pct"][0], 2) == 50.02
    assert round(t2["mlp_ablated_pct"][0], 2) == -37.50
    disp = tabs.table2_display(t2)
    assert disp["Full LoRA (attn-ablated)"][0] == "0.3667 (50.02%)"
    assert disp["Full LoRA"][0] == "0.5000 (100.00%)"
    assert tabs.table2_from_groups(pd.DataFrame({"group": ["mlp"], "kl_mean": [0.3]}), summary) is None


def test_markdown_escapes_pipes_and_newlines():
    md = tabs.to_markdown(pd.DataFrame({"a|b": ["x|y\nz"], "n": [0.123456]}))
    assert md.splitlines() == ["| a\\|b | n |", "|---|---|", "| x\\|y z | 0.1235 |"]


def test_spend_table_totals():
    calls = pd.DataFrame({"task": ["explain", "explain", "score"], "model": "m", "cached": [False, True, False],
                          "tokens_in": [100, 100, 50], "tokens_out": [10, 10, 5], "cost_usd": [0.01, 0.0, 0.002],
                          "latency_s": [1.0, 0.0, 2.0], "status": ["ok", "ok", "error"]})
    sp = tabs.spend_table(calls)
    total = sp.iloc[-1]
    assert total["task"] == "total" and total["calls"] == 3 and total["ok"] == 2 and total["cached"] == 1
    assert total["tokens_in"] == 250 and total["cost_usd"] == pytest.approx(0.012)


# --------------------------------------------------------------------------- escaping and helpers


@pytest.mark.parametrize("s", EVIL + ["a\u2028b", "&amp;", "\\u003c"])
def test_script_json_cannot_close_the_script_block(s):
    out = dash.script_json({"t": [s], "k": s})
    assert "<" not in out and ">" not in out and "\u2028" not in out
    assert json.loads(out) == {"t": [s], "k": s}


def test_esc_and_safe_names():
    assert dash.esc('"><img src=x onerror=alert(1)>') == "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"
    taken: set[str] = set()
    assert dash.safe_name("L03_gate_proj", taken) == "L03_gate_proj"
    weird = dash.safe_name("../<x>", taken)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", weird) and not weird.startswith(".")
    # case-insensitive file systems: a second name differing only in case gets a suffix
    assert dash.safe_name("l03_GATE_proj", taken) != "l03_GATE_proj"


def test_feature_keys_and_category_names():
    assert feature_key("sae", 12) == "F00012" and feature_key("sae", "12") == "F00012"
    assert feature_key("sae", "F00012") == "F00012" and feature_key("adapter", "L01_q_proj") == "L01_q_proj"
    cats = {"categories": [{"string_id": "math_ops", "name": "Mathematical Operators", "examples": ["x"]}],
            "summary": "s"}
    assert category_names(cats) == {"math_ops": "Mathematical Operators"}


def test_histograms_by_hand():
    h = Histograms(lo=np.array([0.0, -1.0]), hi=np.array([4.0, 1.0]), bins=4)
    h.add_dense(np.array([[0.0, -1.0], [1.0, 0.0], [3.9, 0.99], [4.0, np.nan], [9.0, -5.0]], dtype=np.float32))
    # column 0: bins [0,1) [1,2) [2,3) [3,4]; 4.0 and 9.0 clip into the last bin
    assert h.counts[0].tolist() == [1, 1, 0, 3]
    # column 1: bins of width 0.5 from -1; NaN skipped; -5 clips into the first
    assert h.counts[1].tolist() == [2, 0, 1, 1]
    h.add_sparse(np.array([1, 1]), np.array([0.6, -0.9]))
    assert h.counts[1].tolist() == [3, 0, 1, 2]
    assert h.edges(1).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_trace_window():
    assert window_for(3, 10, 100, 2048).__dict__ == {"doc": 3, "start": 0, "end": 100, "hit": 10, "total": 100}
    w = window_for(3, 5000, 10000, 1000)
    assert (w.start, w.end) == (4500, 5500)
    w = window_for(3, 9990, 10000, 1000)
    assert (w.start, w.end) == (9000, 10000)


def test_report_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="report.contexts"):
        ReportConfig(contexts=0)
    with pytest.raises(ConfigError, match="report.sources"):
        ReportConfig(sources=["sae", "sae"])
    with pytest.raises(ConfigError, match="report.context_before"):
        ReportConfig(context_before=-1)


# --------------------------------------------------------------------------- a whole report


def test_full_report_renders_everything(evil_report):
    run, out, res = evil_report
    assert res.missing == []
    for name in ("table1", "table2", "figure1", "figure2", "figure3", "sae_curves", "training_curves",
                 "detection_scores", "features_index", "autointerp_spend"):
        assert name in res.rendered
    for rel in ("index.html", "features.html", "report.json", "tables/table1.md", "tables/table1.csv",
                "tables/table2.md", "tables/table2.csv", "figures/figure1.png", "figures/figure2.png",
                "figures/figure3.png", "figures/sae_curves.png", "figures/detection_scores.png",
                "assets/style.css", "assets/index.js", "assets/feature.js"):
        assert (out / rel).is_file(), rel
    for png in out.glob("figures/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every adapter component, neuron and live SAE feature has a page
    spec = SyntheticSpec()
    assert res.pages == {"adapter": spec.layers * 7, "neuron": spec.layers * spec.neurons,
                         "sae": sum(1 for i in range(spec.sae_latents) if i % 7)}
    assert (out / "features/adapter/L01_gate_proj.html").is_file()
    # Table 1 numbers come from evaluate/summary.parquet
    t1 = pd.read_csv(out / "tables/table1.csv")
    s = pd.read_parquet(Path(run.stage("evaluate").path("summary.parquet")))
    row = t1[t1["benchmark"] == "math500"].iloc[0]
    b, l, f = (s[(s["benchmark"] == "math500") & (s["variant"] == v)]["pass1"].iloc[0] for v in ("base", "lora", "full"))
    assert row["recovery_pct"] == pytest.approx((l - b) / (f - b) * 100)
    index = (out / "index.html").read_text()
    assert "Table 1" in index and "figures/figure1.png" in index and "features.html" in index


def test_no_raw_injection_in_any_written_file(evil_report):
    _, out, _ = evil_report
    raw = [e for e in EVIL] + ["<img src=x", "onerror=alert(4)>"]
    for p in list(out.rglob("*.html")) + list(out.glob("traces/*.js")):
        text = p.read_text()
        for r in raw:
            assert r not in text, f"{r!r} unescaped in {p}"
    # and the strings are there, escaped, where the data put them
    page = (out / "features/adapter/L00_q_proj.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the explanation, server-rendered
    assert "\\u003cscript\\u003ealert(1)" in page  # the context tokens, in the page's JSON


def test_markdown_tables_escape_html(evil_report):
    _, out, _ = evil_report
    for p in out.rglob("*.md"):
        assert "<" not in p.read_text() and ">" not in p.read_text(), p  # no raw markup in any Markdown file
    cats = (out / "tables/figure2_categories.md").read_text()
    assert "&quot;" not in cats and '"&gt;&lt;img src=x onerror=alert(1)&gt; category' in cats
    from rank1_core.report.tables import md_escape, to_markdown

    assert md_escape("<img src=x onerror=alert(2)> a|b & c\nd") == "&lt;img src=x onerror=alert(2)&gt; a\\|b &amp; c d"
    assert to_markdown(pd.DataFrame({"category": ["<img src=x onerror=alert(2)>"], "n": [3]})).splitlines()[2] == (
        "| &lt;img src=x onerror=alert(2)&gt; | 3 |")


def test_feature_page_data(evil_report):
    run, out, _ = evil_report
    html_text = (out / "features/adapter/L01_gate_proj.html").read_text()
    m = re.search(r'<script type="application/json" id="feature-data">(.*?)</script>', html_text, re.S)
    data = json.loads(m.group(1))
    ctx = pq.read_table(run.stage("topk").path("contexts.parquet")).to_pandas()
    mine = ctx[(ctx["source"] == "adapter") & (ctx["feature"] == "L01_gate_proj")]
    assert len(data["pos"]) == (mine["sign"] == "pos").sum() and len(data["neg"]) == (mine["sign"] == "neg").sum()
    top = mine[(mine["sign"] == "pos") & (mine["rank"] == 1)].iloc[0]
    doc, pos, value, hit, start, ids, vals = data["pos"][0]
    assert (doc, pos) == (top["doc_id"], top["pos"]) and value == pytest.approx(top["value"], rel=1e-2)
    assert [data["toks"][i] for i in ids] == list(top["context_tokens"])
    assert vals[hit] == pytest.approx(top["value"], rel=1e-2) and start == pos - hit
    # the whole trace is the top hit's document, its values those of the activation column
    tr = data["trace"]
    assert tr["doc"] == top["doc_id"] and tr["hit"] == top["pos"]
    acts = pd.concat(pd.read_parquet(p) for p in sorted(Path(run.stage("extract").path("activations")).glob("*.parquet")))
    col = acts[acts["doc_id"] == tr["doc"]].sort_values("pos")["L01_gate_proj"].to_numpy()
    np.testing.assert_allclose(tr["vals"], col[tr["start"]:tr["end"]], rtol=1e-2, atol=1e-6)
    assert (out / f"traces/d{tr['doc']}.js").is_file()


def test_figure3_densities_by_hand(evil_report):
    run, out, _ = evil_report
    dens = pd.read_csv(out / "tables/figure3_densities.csv")
    feats = pd.concat(pd.read_parquet(p) for p in sorted(Path(run.stage("sae").path("features")).glob("*.parquet")))
    expl = pd.read_parquet(run.stage("autointerp").path("explanations.parquet"))
    names = category_names(json.loads(Path(run.stage("autointerp").path("categories.json")).read_text()))
    expl = expl[(expl["source"] == "sae") & expl["category"].notna()]
    cat = {int(f[1:]): names[c] for f, c in zip(expl["feature"], expl["category"])}
    sums = feats.groupby("feature")["value"].sum()
    by = {}
    for f, v in sums.items():
        if f in cat:
            by[cat[f]] = by.get(cat[f], 0.0) + v
    total = sum(by.values())
    got = dict(zip(dens["category"], dens["density_pct"]))
    assert got.keys() == by.keys()
    for k, v in by.items():
        assert got[k] == pytest.approx(100 * v / total, rel=1e-6)


# --------------------------------------------------------------------------- partial runs


def test_partial_run_renders_what_exists_and_says_what_is_missing(tmp_path):
    run = make_synthetic_run(str(tmp_path / "run"), SyntheticSpec(), stages=("evaluate", "ablate"))
    # a stage that started and never finished
    run.stage("extract").write_text(".started", "abc\n")
    res = build_report(run, ReportConfig(), tmp_path / "out", log=lambda m: None)
    assert {"table1", "table2", "figure1"} <= set(res.rendered)
    assert "figure2" not in res.rendered and "figure3" not in res.rendered
    why = {m.what: m.why for m in res.missing}
    assert "has not finished" in why["adapter component catalogue"]
    assert why["Figure 2"] == "stage 'autointerp' has not run"
    assert why["SAE training curves"] == "stage 'sae' has not run"
    index = (tmp_path / "out/index.html").read_text()
    assert "Not rendered" in index and "stage &#x27;autointerp&#x27; has not run" in index
    assert json.loads((tmp_path / "out/report.json").read_text())["missing"]


def test_missing_columns_degrade_with_a_reason(tmp_path):
    run = RunDir(str(tmp_path / "run"))

    def body(sr):
        with sr.stage.fs.open_output_stream(sr.stage.path("summary.parquet")) as f:
            pq.write_table(pa.table({"variant": ["base"], "benchmark": ["b"], "accuracy": [0.5]}), f)

    run_stage(run.stage("evaluate"), "h", "", body, log=lambda m: None)
    res = build_report(run, ReportConfig(), tmp_path / "out", log=lambda m: None)
    why = {m.what: m.why for m in res.missing}
    assert "lacks column(s) pass1" in why["Table 1 (recovery)"]
    assert "table1" not in res.rendered


def test_empty_run_still_writes_an_index(tmp_path):
    res = build_report(RunDir(str(tmp_path / "run")), ReportConfig(), tmp_path / "out", log=lambda m: None)
    assert res.rendered == [] and (tmp_path / "out/index.html").is_file()
    assert "feature dashboards" in {m.what for m in res.missing}


def test_context_trimming_and_max_features(tmp_path):
    run = make_synthetic_run(str(tmp_path / "run"), SyntheticSpec(), stages=("extract", "topk"))
    cfg = ReportConfig(context_before=2, context_after=1, contexts=3, max_features=2, sources=["adapter"])
    res = build_report(run, cfg, tmp_path / "out", log=lambda m: None)
    assert res.pages == {"adapter": 2}
    page = (tmp_path / "out/features/adapter/L00_q_proj.html").read_text()
    data = json.loads(re.search(r'id="feature-data">(.*?)</script>', page, re.S).group(1))
    assert len(data["pos"]) == 3
    for c in data["pos"] + data["neg"]:
        assert len(c[5]) <= 4 and c[3] <= 2


def test_max_features_keeps_explained_features_first(tmp_path):
    """A capped report gives pages to explained features (and the transcoder's selected
    hesitation features) before the others, each in catalogue order."""
    from rank1_core.report.build import page_selection

    sub = pd.DataFrame({"order": range(5), "key": list("abcde"),
                        "explanation": [None, None, "x", None, None], "explanation_neg": [None, None, None, "y", None],
                        "hesitation_selected": [None, True, None, None, None]})
    assert page_selection(sub, 3)["key"].tolist() == ["b", "c", "d"]
    assert page_selection(sub, 4)["key"].tolist() == ["a", "b", "c", "d"]
    # on a run: the synthetic autointerp leaves the second adapter component (L00_k_proj) unexplained
    run = make_synthetic_run(str(tmp_path / "run"), SyntheticSpec(), stages=("extract", "topk", "autointerp"))
    res = build_report(run, ReportConfig(max_features=2, sources=["adapter"]), tmp_path / "out", log=lambda m: None)
    pages = sorted(p.stem for p in (tmp_path / "out/features/adapter").glob("*.html"))
    assert res.pages == {"adapter": 2} and len(pages) == 2
    explained = pd.read_parquet(run.stage("autointerp").path("explanations.parquet"))
    explained = set(explained[(explained["source"] == "adapter") & explained["explanation"].notna()]["feature"])
    assert "L00_k_proj" not in explained and pages == ["L00_q_proj", "L00_v_proj"], pages


# --------------------------------------------------------------------------- the stage and its CLI


def test_cli_on_partial_then_fuller_run(tmp_path, capsys):
    from ray_jobs import report

    run_dir = tmp_path / "run"
    make_synthetic_run(str(run_dir), SyntheticSpec(), stages=("evaluate",))
    assert report.main(["--run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "not rendered" in out and "index.html" in out
    st = RunDir(str(run_dir)).stage("report")
    assert st.is_done() and st.exists("index.html") and st.manifest()["inputs"].keys() == {"evaluate"}
    first = st.done_hash()
    assert report.main(["--run", str(run_dir)]) == 0
    assert "skipping" in capsys.readouterr().out
    # another stage finishes: the report's hash changes and it is redrawn
    make_synthetic_run(str(run_dir), SyntheticSpec(), stages=("ablate",))
    assert report.main(["--run", str(run_dir), "report.figure_dpi=60"]) == 0
    assert st.done_hash() != first and st.exists("figures/figure1.png")
    assert set(st.manifest()["inputs"]) == {"evaluate", "ablate"}


def test_cli_rejects_a_directory_without_stages(tmp_path, capsys):
    from ray_jobs import report

    (tmp_path / "empty").mkdir()
    assert report.main(["--run", str(tmp_path / "empty")]) == 2
    assert "holds no stage output" in capsys.readouterr().err


def test_stage_on_a_prepared_tiny_run(prepared_run, copy_run, tiny_cfg):
    """The stage entry point on a real run with only `prepare` done: everything else is listed."""
    from ray_jobs import report

    run_dir = copy_run(prepared_run)
    cfg = tiny_cfg(run_dir=run_dir)
    m = report.run(cfg)
    assert m["inputs"].keys() == {"prepare"}
    missing = "\n".join(m["extra"]["missing"])
    for stage in ("evaluate", "ablate", "extract", "sae", "autointerp"):
        assert f"stage '{stage}' has not run" in missing
    assert (run_dir / "report" / "index.html").is_file() and (run_dir / "report" / "_SUCCESS").is_file()


def test_explanations_of_both_signs(evil_report):
    """autointerp explains each sign: the positive one heads the page, the negative one is
    beside it, and Figure 2 counts every classified explanation."""
    run, out, _ = evil_report
    expl = pd.read_parquet(run.stage("autointerp").path("explanations.parquet"))
    both = expl[(expl["source"] == "adapter") & expl["explanation"].notna()].groupby("feature")["sign"].nunique()
    key = both[both == 2].index[0]
    neg = expl[(expl["feature"] == key) & (expl["sign"] == "neg")]["explanation"].iloc[0]
    pos = expl[(expl["feature"] == key) & (expl["sign"] == "pos")]["explanation"].iloc[0]
    page = (out / f"features/adapter/{key}.html").read_text()
    assert "negative side" in page and dash.esc(neg) in page
    assert f'id="explanation" class="explanation">{dash.esc(pos)}<' in page
    shares = pd.read_csv(out / "tables/figure2_classification.csv")
    for src in ("adapter", "neuron", "sae"):
        n = int(expl[(expl["source"] == src) & expl["explanation"].notna()].shape[0])
        assert shares[shares["source"] == src]["features"].sum() == n


# --------------------------------------------------------------------------- transcoder adapters

TC = ("transcoder", "transcoder_extract", "transcoder_eval")


@pytest.fixture(scope="module")
def tc_report(tmp_path_factory):
    """A complete synthetic run with the transcoder stages (and injection strings), and its report."""
    root = tmp_path_factory.mktemp("report_tc")
    run = make_synthetic_run(str(root / "run"), SyntheticSpec(evil=True, transcoder=True))
    res = build_report(run, ReportConfig(), root / "run" / "report", log=lambda m: None)
    return run, root / "run" / "report", res


def _read_dir(run, stage: str, rel: str) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(p) for p in sorted(Path(run.stage(stage).path(rel)).glob("*.parquet")))


def test_table1_transcoder_column_by_hand():
    # the paper's AIME'24 base and full, a transcoder scoring like the LoRA: 72.73% recovered
    s = pd.DataFrame({"variant": ["base", "lora", "full"], "benchmark": ["aime"] * 3, "pass1": [0.2333, 0.5, 0.6],
                      "stderr": [0.01] * 3, "n_problems": [30] * 3, "n_samples": [1] * 3})
    t1 = tabs.table1(s)
    tsum = pd.DataFrame({"variant": ["transcoder", "transcoder_no_hesitation", "transcoder", "base"],
                         "benchmark": ["aime", "aime", "gpqa", "aime"], "pass1": [0.5, 0.1, 0.3, 0.9],
                         "stderr": [0.02, 0.02, 0.03, 0.0], "n_problems": [30, 30, 10, 30]})
    t = tabs.table1_add_transcoder(t1, tsum)
    assert t["benchmark"].tolist() == ["aime", "gpqa"]  # a benchmark only transcoder_eval has: a row of its own
    assert t["transcoder"].tolist() == [0.5, 0.3]
    assert round(t["transcoder_recovery_pct"][0], 2) == 72.73 and pd.isna(t["transcoder_recovery_pct"][1])
    assert t["recovery_pct"][0] == pytest.approx(72.73, abs=0.01)  # the LoRA's, untouched
    disp = tabs.table1_display(t)
    assert disp.columns.tolist() == ["Benchmark", "Problems", "Base", "Rank-1 LoRA", "Full fine-tune",
                                     "Transcoder problems", "Transcoder adapters", "% Recovery",
                                     "% Recovery (transcoder)"]
    assert disp["Transcoder adapters"].tolist() == ["0.5000 ± 0.0200", "0.3000 ± 0.0300"]
    assert disp["% Recovery (transcoder)"].tolist() == ["72.73%", "n/a"]
    assert disp["Base"][1] == "—" and disp["Problems"].tolist() == [30, ""]
    # same problem counts: no extra column
    same = tabs.table1_display(tabs.table1_add_transcoder(t1, tsum[tsum["benchmark"] == "aime"]))
    assert "Transcoder problems" not in same.columns and same["% Recovery (transcoder)"].tolist() == ["72.73%"]


def test_hesitation_table_by_hand():
    tsum = pd.DataFrame({
        "variant": ["transcoder_random_ablated", "transcoder", "transcoder_no_hesitation"], "benchmark": ["b"] * 3,
        "pass1": [0.55, 0.6, 0.5], "stderr": [0.1] * 3, "mean_tokens": [210.0, 200.0, 150.0],
        "mean_hesitations": [1.9, 2.0, 0.5], "hesitation_rate": [0.9, 0.95, 0.25], "features_ablated": [3, 0, 3]})
    h = tabs.hesitation_table(tsum)
    assert h["variant"].tolist() == ["transcoder", "transcoder_no_hesitation", "transcoder_random_ablated"]
    assert h["condition"].tolist() == ["adapters", "hesitation features ablated", "random features ablated (control)"]
    assert h["d_tokens"].tolist() == pytest.approx([0.0, -50.0, 10.0])
    assert h["d_hesitations"].tolist() == pytest.approx([0.0, -1.5, -0.1])
    assert h["d_pass1"].tolist() == pytest.approx([0.0, -0.1, -0.05])
    disp = tabs.hesitation_display(h)
    assert disp["Response length (tokens)"].tolist() == ["200.0", "150.0 (-50.0)", "210.0 (+10.0)"]
    assert disp["Accuracy (pass@1)"][1] == "0.5000 ± 0.1000 (-0.1000)"
    assert disp["Responses with a hesitation"].tolist() == ["95.0%", "25.0%", "90.0%"]


def test_faithfulness_table_keeps_what_the_file_has():
    t = tabs.faithfulness_table({"kl_base": 0.3, "kl_adapted": 0.06, "kl_closed": 0.8, "live_latents": 12})
    assert t["key"].tolist() == ["kl_adapted", "kl_closed", "live_latents"]
    d = tabs.faithfulness_display(t)
    assert d["Base"][0] == "0.3000" and d["Base + adapters"].tolist() == ["0.0600", "80.0%", "12"]
    assert d["Target"][0] == "0.0000"
    assert tabs.faithfulness_table({}).empty


def test_transcoder_section(tc_report):
    run, out, res = tc_report
    assert res.missing == []
    for name in ("transcoder_faithfulness", "transcoder_layers", "transcoder_curves", "transcoder_recovery",
                 "transcoder_hesitation", "transcoder_hesitation_features", "table1", "features_index"):
        assert name in res.rendered
    for rel in ("figures/transcoder_layers.png", "figures/transcoder_curves.png"):
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("transcoder_faithfulness", "transcoder_layers", "transcoder_recovery", "transcoder_hesitation"):
        assert (out / f"tables/{name}.csv").is_file() and (out / f"tables/{name}.md").is_file()
    # the faithfulness numbers are faithfulness.json's
    faith = json.loads(Path(run.stage("transcoder").path("faithfulness.json")).read_text())
    ft = pd.read_csv(out / "tables/transcoder_faithfulness.csv").set_index("key")
    for k in ("kl_adapted", "ce_adapted", "top1_agree_adapted", "kl_closed", "fve_difference_mean", "l0_per_layer",
              "live_latents", "latents"):
        assert ft.loc[k, "base_adapters"] == pytest.approx(faith[k])
    assert ft.loc["kl_adapted", "base"] == pytest.approx(faith["kl_base"])
    assert ft.loc["ce_adapted", "target"] == pytest.approx(faith["ce_target"])
    # per-layer FVE: faithfulness_layers.parquet's
    layers = pd.read_parquet(run.stage("transcoder").path("faithfulness_layers.parquet"))
    got = pd.read_csv(out / "tables/transcoder_layers.csv")
    np.testing.assert_allclose(got["fve_difference"], layers.sort_values("layer")["fve_difference"])
    index = (out / "index.html").read_text()
    sec = index[index.index('<section id="transcoder">'):]
    sec = sec[:sec.index("</section>")]
    for s in ("figures/transcoder_layers.png", "figures/transcoder_curves.png", "KL(target || model)",
              "Hesitation features ablated", "tables/transcoder_hesitation.csv", "features.html#source=transcoder"):
        assert s in sec, s
    assert 'href="#transcoder"' in index  # in the table of contents
    # the stage table lists the three stages, done
    for st in TC:
        assert f'<td>{st}</td><td class="status-done">done</td>' in index


def test_table1_gains_the_transcoder(tc_report):
    run, out, _ = tc_report
    t1 = pd.read_csv(out / "tables/table1.csv", keep_default_na=False, na_values=[""])
    ev = pd.read_parquet(run.stage("evaluate").path("summary.parquet"))
    ts = pd.read_parquet(run.stage("transcoder_eval").path("summary.parquet"))
    rec = pd.read_csv(Path(run.stage("transcoder_eval").path("recovery.csv")))
    for bench in ev["benchmark"].unique():
        row = t1[t1["benchmark"] == bench].iloc[0]
        b, f = (ev[(ev["benchmark"] == bench) & (ev["variant"] == v)]["pass1"].iloc[0] for v in ("base", "full"))
        t = ts[(ts["benchmark"] == bench) & (ts["variant"] == "transcoder")]["pass1"].iloc[0]
        assert row["transcoder"] == pytest.approx(t)
        # Table 1's own base and full, not transcoder_eval's reference numbers
        assert row["transcoder_recovery_pct"] == pytest.approx((t - b) / (f - b) * 100)
        assert row["transcoder_recovery_pct"] != pytest.approx(rec[rec["benchmark"] == bench]["recovered_pct"].iloc[0])
        assert row["transcoder_n_problems"] == 20 and row["n_problems"] == 50
    md = (out / "tables/table1.md").read_text()
    assert "| Transcoder adapters |" in md and "% Recovery (transcoder)" in md and "Transcoder problems" in md


def test_hesitation_ablation_table(tc_report):
    run, out, _ = tc_report
    ts = pd.read_parquet(run.stage("transcoder_eval").path("summary.parquet"))
    h = pd.read_csv(out / "tables/transcoder_hesitation.csv", keep_default_na=False, na_values=[""])
    assert len(h) == len(ts)
    assert set(h["variant"]) == {"transcoder", "transcoder_no_hesitation", "transcoder_random_ablated"}
    for r in h.itertuples():
        src = ts[(ts["benchmark"] == r.benchmark) & (ts["variant"] == r.variant)].iloc[0]
        ref = ts[(ts["benchmark"] == r.benchmark) & (ts["variant"] == "transcoder")].iloc[0]
        assert (r.mean_tokens, r.mean_hesitations, r.pass1) == pytest.approx(
            (src["mean_tokens"], src["mean_hesitations"], src["pass1"]))
        assert r.d_hesitations == pytest.approx(src["mean_hesitations"] - ref["mean_hesitations"])
        assert r.features_ablated == src["features_ablated"]
    md = (out / "tables/transcoder_hesitation.md").read_text()
    assert "hesitation features ablated" in md and "random features ablated (control)" in md


def test_transcoder_feature_pages(tc_report):
    run, out, res = tc_report
    lat = pd.read_parquet(run.stage("transcoder_extract").path("latents.parquet"))
    live = lat[lat["live"]]
    assert res.pages["transcoder"] == len(live)
    for name in live["name"]:
        assert (out / f"features/transcoder/{name}.html").is_file()
    # the index lists them; hesitation features come first (so report.max_features keeps them)
    idx = json.loads(re.search(r'id="index-data">(.*?)</script>', (out / "features.html").read_text(), re.S).group(1))
    tc_rows = [r for r in idx["rows"] if r[1] == "transcoder"]
    hes = pd.read_parquet(run.stage("transcoder_extract").path("hesitation_features.parquet"))
    selected = hes[hes["selected"]]["name"].tolist()
    assert len(tc_rows) == len(live) and [r[0] for r in tc_rows[:len(selected)]] == selected
    assert tc_rows[0][9] == f"features/transcoder/{selected[0]}.html"
    # a hesitation feature's page: topk's contexts, a trace from transcoder_extract/features, its facts
    key = selected[0]
    page = (out / f"features/transcoder/{key}.html").read_text()
    data = json.loads(re.search(r'id="feature-data">(.*?)</script>', page, re.S).group(1))
    ctx = pq.read_table(run.stage("topk").path("contexts.parquet")).to_pandas()
    mine = ctx[(ctx["source"] == "transcoder") & (ctx["feature"] == key)]
    assert len(data["pos"]) == (mine["sign"] == "pos").sum() > 0 and data["neg"] == []
    top = mine[(mine["sign"] == "pos") & (mine["rank"] == 1)].iloc[0]
    assert data["pos"][0][:2] == [top["doc_id"], top["pos"]]
    assert data["toks"][data["pos"][0][5][data["pos"][0][3]]] == " Wait"
    tr = data["trace"]
    feats = _read_dir(run, "transcoder_extract", "features")
    idx_f = int(key[1:])
    f = feats[(feats["doc_id"] == tr["doc"]) & (feats["feature"] == idx_f)]
    want = np.zeros(tr["end"] - tr["start"])
    sel = (f["pos"] >= tr["start"]) & (f["pos"] < tr["end"])
    want[f["pos"][sel] - tr["start"]] = f["value"][sel]
    np.testing.assert_allclose(tr["vals"], want, rtol=1e-2, atol=1e-6)
    assert "transcoder feature" in page and "ablated by transcoder_eval" in page and "|W_dec row|" in page
    assert "tokens where the feature fires" in page
    # the histogram counts the feature's firings over the sample (every token here)
    row = lat[lat["name"] == key].iloc[0]
    svg_counts = sum(int(c) for c in re.findall(r"\): (\d+)</title></rect>", page))
    assert svg_counts == row["count"]


def test_transcoder_pages_escape_everything(tc_report):
    run, out, _ = tc_report
    raw = [e for e in EVIL] + ["<img src=x", "onerror=alert(4)>"]
    files = list(out.rglob("*.html")) + list(out.glob("traces/*.js"))
    assert any("features/transcoder" in str(p) for p in files)
    for p in files:
        text = p.read_text()
        for r in raw:
            assert r not in text, f"{r!r} unescaped in {p}"
    # the evil explanation of the first transcoder feature, server-rendered and escaped
    page = (out / "features/transcoder/F00000.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    index = (out / "index.html").read_text()
    sec = index[index.index('<section id="transcoder">'):]
    assert "&lt;img src=x onerror=alert(4)&gt;" in sec  # the evil benchmark in the hesitation table
    assert "&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in sec  # an evil top token of a candidate


def test_run_without_transcoder_stages_does_not_mention_them(evil_report):
    _, out, res = evil_report
    assert not any("transcoder" in n for n in res.rendered) and "transcoder" not in res.pages
    assert not any("transcoder" in (m.what + m.why).lower() for m in res.missing)
    for p in [*out.glob("*.html"), *out.glob("tables/*"), out / "report.json"]:
        assert "transcoder" not in p.read_text().lower(), p
    assert not list(out.glob("figures/transcoder*")) and not (out / "features/transcoder").exists()


def test_partial_transcoder_run_says_what_is_missing(tmp_path):
    from ray_jobs import report

    run = make_synthetic_run(str(tmp_path / "run"), SyntheticSpec(transcoder=True),
                             stages=("evaluate", "extract", "topk", "transcoder"))
    run.stage("transcoder_extract").write_text(".started", "abc\n")  # started, never finished
    res = build_report(run, ReportConfig(), tmp_path / "out", log=lambda m: None)
    assert {"table1", "transcoder_faithfulness", "transcoder_layers", "transcoder_curves"} <= set(res.rendered)
    assert "transcoder_hesitation" not in res.rendered and "transcoder" not in res.pages
    why = {m.what: m.why for m in res.missing}
    assert why["Table 1: transcoder adapters"] == "stage 'transcoder_eval' has not run"
    assert why["transcoder hesitation ablation table"] == "stage 'transcoder_eval' has not run"
    assert "has not finished" in why["transcoder feature list"]
    assert "transcoder" not in pd.read_csv(tmp_path / "out/tables/table1.csv").columns
    index = (tmp_path / "out/index.html").read_text()
    assert '<td>transcoder_extract</td><td class="status-partial">partial</td>' in index
    assert '<td>transcoder_eval</td><td class="status-missing">missing</td>' in index
    # the stage: the done transcoder stage enters its hash, so finishing the others redraws it
    assert report.main(["--run", str(tmp_path / "run")]) == 0
    st = RunDir(str(tmp_path / "run")).stage("report")
    assert "transcoder" in st.manifest()["inputs"] and "transcoder_eval" not in st.manifest()["inputs"]


def test_transcoder_missing_column_and_no_hesitation_feature(tmp_path):
    run = make_synthetic_run(str(tmp_path / "run"), SyntheticSpec(transcoder=True),
                             stages=("evaluate", "transcoder", "transcoder_eval"))

    def body(sr):  # transcoder_eval without hesitation counts, and only the unablated adapters
        with sr.stage.fs.open_output_stream(sr.stage.path("summary.parquet")) as f:
            pq.write_table(pa.table({"variant": ["transcoder"], "benchmark": ["math500"], "pass1": [0.5]}), f)

    run_stage(run.stage("transcoder_eval"), "h2", "", body, log=lambda m: None, force=True)
    res = build_report(run, ReportConfig(), tmp_path / "out", log=lambda m: None)
    why = {m.what: m.why for m in res.missing}
    assert "lacks column(s) mean_tokens, mean_hesitations" in why["transcoder hesitation ablation table"]
    t1 = pd.read_csv(tmp_path / "out/tables/table1.csv")
    assert t1[t1["benchmark"] == "math500"]["transcoder"].iloc[0] == 0.5
    assert t1[t1["benchmark"] == "arith-heldout"]["transcoder"].isna().all()


def test_transcoder_pages_chunked_and_capped(tc_report, tmp_path, monkeypatch):
    """Pages read their contexts and traces PAGE_CHUNK features at a time: the same pages;
    max_features keeps the hesitation features of the transcoder source first."""
    from rank1_core.report import build as build_mod

    run, out, _ = tc_report
    monkeypatch.setattr(build_mod, "PAGE_CHUNK", 3)
    res = build_report(run, ReportConfig(sources=["transcoder"]), tmp_path / "out", log=lambda m: None)
    assert set(res.pages) == {"transcoder"}
    for p in (out / "features/transcoder").glob("*.html"):
        a = re.search(r'id="feature-data">(.*?)</script>', p.read_text(), re.S).group(1)
        b = re.search(r'id="feature-data">(.*?)</script>', (tmp_path / "out/features/transcoder" / p.name).read_text(),
                      re.S).group(1)
        assert json.loads(a) == json.loads(b), p.name
    res = build_report(run, ReportConfig(sources=["transcoder"], max_features=2), tmp_path / "cap", log=lambda m: None)
    hes = pd.read_parquet(run.stage("transcoder_extract").path("hesitation_features.parquet"))
    assert sorted(p.stem for p in (tmp_path / "cap/features/transcoder").glob("*.html")) == \
        sorted(hes[hes["selected"]]["name"])
