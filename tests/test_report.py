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
