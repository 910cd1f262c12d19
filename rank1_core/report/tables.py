"""The paper's tables (and the small tables beside the figures) as DataFrames, Markdown and CSV.

- Table 1 (recovery): pass@1 of base, rank-1 LoRA and full fine-tune per benchmark, and
  % recovery = (LoRA - base) / (full - base).
- Table 2 (group ablations): each group-ablated adapter's score x and its share of the
  adapter's recovered gain (x - b) / (l - b), b = base, l = the whole LoRA.
- Transcoder adapters (stages transcoder, transcoder_eval): Table 1's transcoder column and
  its % recovery with Table 1's base and full; the faithfulness numbers; the hesitation
  ablation (adapters vs hesitation features ablated vs random features ablated).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from rank1_core.grading import marker_cell, marker_rates
from rank1_core.rundir import atomic_local_path, write_text_atomic

VARIANT_NAMES = {"base": "Base", "lora": "Rank-1 LoRA", "full": "Full fine-tune", "transcoder": "Transcoder adapters"}
# Table 1 columns that are not a variant's score.
T1_META = ("benchmark", "n_problems", "n_samples", "recovery_pct", "transcoder_n_problems", "transcoder_recovery_pct")


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def recovery(lora: Optional[float], base: Optional[float], full: Optional[float]) -> Optional[float]:
    """% of the full fine-tune's gain over the base that the LoRA recovers (None if undefined)."""
    if lora is None or base is None or full is None or full == base:
        return None
    return (lora - base) / (full - base) * 100.0


def table1(summary: pd.DataFrame) -> pd.DataFrame:
    """evaluate/summary.parquet (variant, benchmark, pass1[, stderr, n_problems, n_samples,
    marker_rate, prompt]) -> one row per benchmark: <variant> and <variant>_stderr columns,
    recovery_pct, and with marker_rate <variant>_marker_rate (share of the responses that
    reached the answer marker; None for a plain-prompted variant, which expects none)."""
    variants = list(dict.fromkeys(["base", "lora", "full", *summary["variant"].astype(str)]))
    variants = [v for v in variants if (summary["variant"] == v).any()]
    marks = marker_rates(summary)
    rows = []
    for bench, g in summary.groupby("benchmark", sort=False):
        row: dict = {"benchmark": str(bench)}
        if "n_problems" in g:
            row["n_problems"] = int(g["n_problems"].max())
        if "n_samples" in g:
            row["n_samples"] = int(g["n_samples"].max())
        for v in variants:
            hit = g[g["variant"] == v]
            row[v] = _num(hit["pass1"].iloc[0]) if len(hit) else None
            if "stderr" in g:
                row[f"{v}_stderr"] = _num(hit["stderr"].iloc[0]) if len(hit) else None
        if "marker_rate" in g:
            row.update({f"{v}_marker_rate": marks.get((v, str(bench))) for v in variants})
        row["recovery_pct"] = recovery(row.get("lora"), row.get("base"), row.get("full"))
        rows.append(row)
    return pd.DataFrame(rows)


def table1_add_transcoder(t1: pd.DataFrame, tsum: pd.DataFrame) -> pd.DataFrame:
    """Table 1 plus the transcoder adapters from transcoder_eval/summary.parquet (its variant
    'transcoder': base model + adapters as trained): columns transcoder, transcoder_stderr,
    transcoder_n_problems and transcoder_recovery_pct = (transcoder - base) / (full - base)
    with Table 1's own base and full (evaluate's). A benchmark only transcoder_eval has gets
    a row of its own (no base/full there: recovery n/a)."""
    t = tsum[tsum["variant"].astype(str) == "transcoder"]
    by = {str(r["benchmark"]): r for r in t.to_dict("records")}
    out = t1.copy()
    extra = [b for b in by if b not in set(out["benchmark"].astype(str))]
    if extra:
        out = pd.concat([out, pd.DataFrame({"benchmark": extra})], ignore_index=True)
        for c in ("n_problems", "n_samples"):
            if c in out:
                out[c] = out[c].astype("Int64")
    marks = marker_rates(t)
    score, err, n, rec, mark = [], [], [], [], []
    for row in out.to_dict("records"):
        r = by.get(str(row["benchmark"]))
        x = _num(r.get("pass1")) if r else None
        score.append(x)
        err.append(_num(r.get("stderr")) if r else None)
        mark.append(marks.get(("transcoder", str(row["benchmark"]))))
        n.append(int(r["n_problems"]) if r and _num(r.get("n_problems")) is not None else None)
        rec.append(recovery(x, _num(row.get("base")), _num(row.get("full"))))
    out["transcoder"] = score
    out["transcoder_stderr"] = err
    out["transcoder_n_problems"] = pd.array(n, dtype="Int64")
    out["transcoder_recovery_pct"] = rec
    if marks:
        out["transcoder_marker_rate"] = mark
    return out


def table1_display(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as the paper prints it: 4-decimal scores (± stderr), % recovery (and, with the
    transcoder adapters, their % recovery; their problem count when it is not Table 1's; the
    share of each variant's responses that reached the answer marker, plain-prompted ones left
    out)."""
    variants = [c for c in t1.columns if c not in T1_META and not c.endswith(("_stderr", "_marker_rate"))]
    out = pd.DataFrame({"Benchmark": t1["benchmark"]})
    if "n_problems" in t1:
        out["Problems"] = ["" if _num(v) is None else int(v) for v in t1["n_problems"]]
    for v in variants:
        err = t1.get(f"{v}_stderr")
        out[VARIANT_NAMES.get(v, v)] = [
            _fmt_score(s, None if err is None else e) for s, e in zip(t1[v], err if err is not None else [None] * len(t1))]
    out["% Recovery"] = [_fmt_pct(r) for r in t1["recovery_pct"]]
    if "transcoder_recovery_pct" in t1:
        out["% Recovery (transcoder)"] = [_fmt_pct(r) for r in t1["transcoder_recovery_pct"]]
        if "transcoder_n_problems" in t1 and ("n_problems" not in t1 or any(
                _num(a) is not None and _num(a) != _num(b) for a, b in zip(t1["transcoder_n_problems"], t1["n_problems"]))):
            out.insert(list(out.columns).index("Transcoder adapters"), "Transcoder problems",
                       ["" if _num(v) is None else str(int(v)) for v in t1["transcoder_n_problems"]])
    marked = [v for v in variants
              if f"{v}_marker_rate" in t1 and any(_num(x) is not None for x in t1[f"{v}_marker_rate"])]
    if marked:
        head = f"Answer marker reached ({' / '.join(VARIANT_NAMES.get(v, v) for v in marked)})"
        out[head] = [marker_cell([_num(r[f"{v}_marker_rate"]) for v in marked]) for r in t1.to_dict("records")]
    return out


def _fmt_pct(r) -> str:
    r = _num(r)
    return "n/a" if r is None else f"{r:.2f}%"


def _fmt_score(s, e) -> str:
    s, e = _num(s), _num(e)
    if s is None:
        return "—"
    return f"{s:.4f} ± {e:.4f}" if e is not None else f"{s:.4f}"


def table2_from_groups(groups: pd.DataFrame, summary: Optional[pd.DataFrame]) -> Optional[pd.DataFrame]:
    """Table 2 from ablate/groups.parquet when it holds benchmark scores: a row per
    (group variant, benchmark) with pass1; b and l come from the same file (variants 'base',
    'lora') or else from evaluate/summary.parquet. None when the columns are not there."""
    vcol = next((c for c in ("variant", "group") if c in groups.columns), None)
    if vcol is None or not {"benchmark", "pass1"} <= set(groups.columns):
        return None
    ref = groups[[vcol, "benchmark", "pass1"]].rename(columns={vcol: "variant"})
    if summary is not None:
        ref = pd.concat([summary[["variant", "benchmark", "pass1"]], ref], ignore_index=True)

    def score(variant: str, bench) -> Optional[float]:
        hit = ref[(ref["variant"].astype(str) == variant) & (ref["benchmark"] == bench)]
        return _num(hit["pass1"].iloc[-1]) if len(hit) else None

    group_variants = [str(v) for v in dict.fromkeys(groups[vcol]) if str(v) not in ("base", "lora", "full")]
    rows = []
    for bench in dict.fromkeys(groups["benchmark"]):
        b, l = score("base", bench), score("lora", bench)
        row = {"benchmark": str(bench), "base": b, "lora": l}
        for gv in group_variants:
            x = score(gv, bench)
            row[gv] = x
            row[f"{gv}_pct"] = None if x is None or b is None or l is None or l == b else (x - b) / (l - b) * 100
        rows.append(row)
    return pd.DataFrame(rows)


def table2_display(t2: pd.DataFrame) -> pd.DataFrame:
    groups = [c for c in t2.columns if c not in ("benchmark", "base", "lora") and not c.endswith("_pct")]
    out = pd.DataFrame({"Task": t2["benchmark"]})
    out["Base"] = [_fmt_score(v, None) for v in t2["base"]]
    out["Full LoRA"] = [("—" if _num(v) is None else f"{v:.4f} (100.00%)") for v in t2["lora"]]
    for g in groups:
        name = g[:-len("_ablated")] if g.endswith("_ablated") else g
        out[f"Full LoRA ({name}-ablated)"] = [
            "—" if _num(x) is None else (f"{x:.4f} ({p:.2f}%)" if _num(p) is not None else f"{x:.4f}")
            for x, p in zip(t2[g], t2[f"{g}_pct"])]
    return out


# --------------------------------------------------------------------------- transcoder adapters

FAITHFULNESS_ROWS = (
    ("KL(target || model), nats/token", "kl_base", "kl_adapted", 0.0),
    ("cross-entropy of the held-out traces, nats/token", "ce_base", "ce_adapted", "ce_target"),
    ("top-1 agreement with the target", "top1_agree_base", "top1_agree_adapted", 1.0),
)
FAITHFULNESS_SINGLE = (
    ("share of the KL gap closed, 1 - kl_adapted / kl_base", "kl_closed"),
    ("mean explained variance of the MLP difference (FVE)", "fve_difference_mean"),
    ("L0: active latents per layer and token", "l0_per_layer"),
    ("live latents (fired on the held-out traces)", "live_latents"),
    ("latents", "latents"),
    ("held-out next-token positions", "tokens"),
)


def faithfulness_table(f: dict) -> pd.DataFrame:
    """transcoder/faithfulness.json -> measure, key, base, base_adapters, target: the three
    models side by side (KL to the target, cross-entropy, top-1 agreement), then the numbers
    of the adapters alone. Keys the file lacks are left out (an empty frame: none there)."""
    rows = []
    for label, kb, ka, kt in FAITHFULNESS_ROWS:
        if ka not in f and kb not in f:
            continue
        tgt = _num(f.get(kt)) if isinstance(kt, str) else kt
        rows.append({"measure": label, "key": ka, "base": _num(f.get(kb)), "base_adapters": _num(f.get(ka)),
                     "target": tgt})
    for label, k in FAITHFULNESS_SINGLE:
        if k in f:
            rows.append({"measure": label, "key": k, "base": None, "base_adapters": _num(f.get(k)), "target": None})
    return pd.DataFrame(rows, columns=["measure", "key", "base", "base_adapters", "target"])


def faithfulness_display(t: pd.DataFrame) -> pd.DataFrame:
    def cell(v, key):
        v = _num(v)
        if v is None:
            return ""
        if key in ("live_latents", "latents", "tokens"):
            return f"{int(v):,}"
        if key == "kl_closed":
            return f"{100 * v:.1f}%"
        return f"{v:.4f}"

    return pd.DataFrame({"Measure": t["measure"],
                         "Base": [cell(v, k) for v, k in zip(t["base"], t["key"])],
                         "Base + adapters": [cell(v, k) for v, k in zip(t["base_adapters"], t["key"])],
                         "Target": [cell(v, k) for v, k in zip(t["target"], t["key"])]})


HESITATION_CONDITIONS = {"transcoder": "adapters", "transcoder_no_hesitation": "hesitation features ablated",
                         "transcoder_random_ablated": "random features ablated (control)", "base": "base model",
                         "full": "full fine-tune (target)", "target": "target"}
HESITATION_REQUIRED = ("variant", "benchmark", "pass1", "mean_tokens", "mean_hesitations")


def hesitation_table(tsum: pd.DataFrame) -> pd.DataFrame:
    """transcoder_eval/summary.parquet -> per benchmark and condition (adapters, hesitation
    features ablated, random control; base / target when that stage generated them): features
    ablated, response length, hesitations per response, share of responses with one, pass@1,
    and the change of each from the unablated adapters."""
    order = {v: i for i, v in enumerate(HESITATION_CONDITIONS)}
    d = tsum.copy()
    d["_o"] = [order.get(str(v), len(order)) for v in d["variant"]]
    rows = []
    for bench, g in d.groupby("benchmark", sort=False):
        g = g.sort_values("_o", kind="stable")
        ref = g[g["variant"].astype(str) == "transcoder"]
        ref = ref.iloc[0] if len(ref) else None
        for r in g.to_dict("records"):
            v = str(r["variant"])
            row = {"benchmark": str(bench), "variant": v, "condition": HESITATION_CONDITIONS.get(v, v),
                   "features_ablated": int(r["features_ablated"]) if _num(r.get("features_ablated")) is not None
                   else None,
                   "n_problems": int(r["n_problems"]) if _num(r.get("n_problems")) is not None else None,
                   "mean_tokens": _num(r["mean_tokens"]), "mean_hesitations": _num(r["mean_hesitations"]),
                   "hesitation_rate": _num(r.get("hesitation_rate")), "pass1": _num(r["pass1"]),
                   "stderr": _num(r.get("stderr"))}
            for k, c in (("d_tokens", "mean_tokens"), ("d_hesitations", "mean_hesitations"), ("d_pass1", "pass1")):
                a, b = row[c], None if ref is None else _num(ref[c])
                row[k] = None if a is None or b is None else a - b
            rows.append(row)
    return pd.DataFrame(rows, columns=["benchmark", "variant", "condition", "features_ablated", "n_problems",
                                       "mean_tokens", "mean_hesitations", "hesitation_rate", "pass1", "stderr",
                                       "d_tokens", "d_hesitations", "d_pass1"])


def hesitation_display(h: pd.DataFrame) -> pd.DataFrame:
    def f(v, fmt, signed=False):
        v = _num(v)
        if v is None:
            return "—"
        return (f"{v:+{fmt}}" if signed else f"{v:{fmt}}")

    def delta(v, fmt, is_ref):
        return "" if is_ref else f"({f(v, fmt, True)})"

    ref = [v == "transcoder" for v in h["variant"]]
    return pd.DataFrame({
        "Benchmark": h["benchmark"], "Condition": h["condition"],
        "Features ablated": ["" if _num(v) is None else str(int(v)) for v in h["features_ablated"]],
        "Response length (tokens)": [f"{f(v, '.1f')} {delta(d, '.1f', r)}".strip()
                                     for v, d, r in zip(h["mean_tokens"], h["d_tokens"], ref)],
        "Hesitations per response": [f"{f(v, '.3f')} {delta(d, '.3f', r)}".strip()
                                     for v, d, r in zip(h["mean_hesitations"], h["d_hesitations"], ref)],
        "Responses with a hesitation": [("—" if _num(v) is None else f"{100 * v:.1f}%") for v in h["hesitation_rate"]],
        "Accuracy (pass@1)": [f"{_fmt_score(v, e)} {delta(d, '.4f', r)}".strip()
                              for v, e, d, r in zip(h["pass1"], h["stderr"], h["d_pass1"], ref)],
    })


def top_components(kl: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    cols = [c for c in ("column", "layer", "module", "kind", "kl_mean", "kl_sem", "n_tokens") if c in kl.columns]
    return kl.sort_values("kl_mean", ascending=False)[cols].head(n).reset_index(drop=True)


def spend_table(calls: pd.DataFrame) -> pd.DataFrame:
    """autointerp/calls.parquet -> calls, cached, tokens and dollars per task and model."""
    calls = calls.copy()
    for c in ("cached", "tokens_in", "tokens_out", "cost_usd", "latency_s"):
        if c not in calls:
            calls[c] = np.nan
    calls["ok"] = calls["status"].astype(str).eq("ok") if "status" in calls else True
    keys = [c for c in ("task", "model") if c in calls.columns]
    if not keys:
        calls["all"] = "all"
        keys = ["all"]
    g = calls.groupby(keys, dropna=False, sort=True)
    out = g.agg(calls=("ok", "size"), ok=("ok", "sum"), cached=("cached", lambda s: int(pd.Series(s).fillna(False).astype(bool).sum())),
                tokens_in=("tokens_in", "sum"), tokens_out=("tokens_out", "sum"), cost_usd=("cost_usd", "sum"),
                mean_latency_s=("latency_s", "mean")).reset_index()
    total = {k: "total" for k in keys}
    total.update(calls=int(out["calls"].sum()), ok=int(out["ok"].sum()), cached=int(out["cached"].sum()),
                 tokens_in=out["tokens_in"].sum(), tokens_out=out["tokens_out"].sum(),
                 cost_usd=out["cost_usd"].sum(), mean_latency_s=calls["latency_s"].mean())
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


# --------------------------------------------------------------------------- formats


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def md_escape(text) -> str:
    """Text made safe for a Markdown table cell or line, the one escape of every Markdown file
    rank1 writes: HTML (`&`, `<`, `>`) as entities, so GitHub, Jupyter and IDE previews show
    markup as text and never run it; pipes and backslashes escaped; newlines made spaces."""
    s = str(text).replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (cells through `md_escape`)."""
    head = "| " + " | ".join(md_escape(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(md_escape(_cell(v)) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def write_table(df: pd.DataFrame, out_dir: Path, name: str, display: Optional[pd.DataFrame] = None,
                caption: str = "") -> dict:
    """`<name>.csv` (the numbers) and `<name>.md` (the display form, with a caption)."""
    with atomic_local_path(out_dir / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    md = to_markdown(display if display is not None else df)
    write_text_atomic(out_dir / f"{name}.md", (f"{caption}\n\n" if caption else "") + md)
    return {"csv": f"{out_dir.name}/{name}.csv", "md": f"{out_dir.name}/{name}.md"}
