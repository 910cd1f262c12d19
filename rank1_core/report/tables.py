"""The paper's tables (and the small tables beside the figures) as DataFrames, Markdown and CSV.

- Table 1 (recovery): pass@1 of base, rank-1 LoRA and full fine-tune per benchmark, and
  % recovery = (LoRA - base) / (full - base).
- Table 2 (group ablations): each group-ablated adapter's score x and its share of the
  adapter's recovered gain (x - b) / (l - b), b = base, l = the whole LoRA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

VARIANT_NAMES = {"base": "Base", "lora": "Rank-1 LoRA", "full": "Full fine-tune"}


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
    """evaluate/summary.parquet (variant, benchmark, pass1[, stderr, n_problems, n_samples])
    -> one row per benchmark: <variant> and <variant>_stderr columns, recovery_pct."""
    variants = list(dict.fromkeys(["base", "lora", "full", *summary["variant"].astype(str)]))
    variants = [v for v in variants if (summary["variant"] == v).any()]
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
        row["recovery_pct"] = recovery(row.get("lora"), row.get("base"), row.get("full"))
        rows.append(row)
    return pd.DataFrame(rows)


def table1_display(t1: pd.DataFrame) -> pd.DataFrame:
    """Table 1 as the paper prints it: 4-decimal scores (± stderr), % recovery."""
    variants = [c for c in t1.columns if c not in ("benchmark", "n_problems", "n_samples", "recovery_pct")
                and not c.endswith("_stderr")]
    out = pd.DataFrame({"Benchmark": t1["benchmark"]})
    if "n_problems" in t1:
        out["Problems"] = t1["n_problems"]
    for v in variants:
        err = t1.get(f"{v}_stderr")
        out[VARIANT_NAMES.get(v, v)] = [
            _fmt_score(s, None if err is None else e) for s, e in zip(t1[v], err if err is not None else [None] * len(t1))]
    out["% Recovery"] = [("n/a" if r is None or (isinstance(r, float) and math.isnan(r)) else f"{r:.2f}%")
                         for r in t1["recovery_pct"]]
    return out


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


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes and newlines in cells escaped)."""
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    head = "| " + " | ".join(esc(str(c)) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(esc(_cell(v)) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def write_table(df: pd.DataFrame, out_dir: Path, name: str, display: Optional[pd.DataFrame] = None,
                caption: str = "") -> dict:
    """`<name>.csv` (the numbers) and `<name>.md` (the display form, with a caption)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}.csv", index=False)
    md = to_markdown(display if display is not None else df)
    (out_dir / f"{name}.md").write_text((f"{caption}\n\n" if caption else "") + md)
    return {"csv": f"{out_dir.name}/{name}.csv", "md": f"{out_dir.name}/{name}.md"}
