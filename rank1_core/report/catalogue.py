"""The feature catalogue: every adapter component, baseline MLP neuron, live SAE feature and
live transcoder-adapter latent of a run, with what the later stages found about it
(explanation, classification, category, detection score, activation statistics, hesitation).

Which features exist comes from the stage that made them (extract's component and neuron
catalogues, the SAE's latents table, transcoder_extract's latents table); a feature that only
appears in topk or autointerp output is still listed. Keys follow `loaders.feature_key`.
Transcoder features are ordered hesitation features first (the ones transcoder_eval
ablates), then explained ones, then the rest, each by index, so `report.max_features`
keeps the interesting ones of a source that can have tens of thousands of live latents.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from rank1_core.config import LORA_MODULES
from rank1_core.report.loaders import SOURCES, RunInputs, feature_key, sae_index, sparse_index

COLUMNS = ["source", "key", "order", "layer", "module", "kind", "neuron", "live", "freq", "sign", "explanation",
           "classification", "classification_reasoning", "category", "category_name", "score", "model",
           "error", "explanation_neg", "classification_neg", "category_name_neg", "score_neg",
           "n_tokens", "mean", "std", "min", "max", "frac_active", "a_norm", "b_norm",
           "latent", "dec_norm", "enc_norm", "hesitation", "hesitation_selected"]
EXPLANATION_COLUMNS = ["source", "key", "sign", "explanation", "classification", "category", "category_name", "score"]
CLASS_NAMES = {0: "clear", 1: "broad", 2: "polysemantic"}


def present(v: Any) -> bool:
    """False for None, NaN and pd.NA."""
    if v is None:
        return False
    try:
        return not bool(pd.isna(v))
    except (TypeError, ValueError):
        return True


def category_names(categories: Any) -> dict[str, str]:
    """string_id -> human-readable name, from categories.json in any nesting (the paper's
    B.2 answer has {"categories": [{"string_id", "name", "definition", "examples"}]})."""
    out: dict[str, str] = {}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            sid = x.get("string_id", x.get("id"))
            if isinstance(sid, str) and isinstance(x.get("name"), str):
                out.setdefault(sid, x["name"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(categories)
    return out


def _parse_adapter(key: str) -> dict:
    m = re.fullmatch(r"L(\d+)_(\w+)", key)
    if not m:
        return {}
    module = m.group(2)
    return {"layer": int(m.group(1)), "module": module,
            "kind": "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "attn"}


def _parse_neuron(key: str) -> dict:
    m = re.fullmatch(r"N(\d+)_(\d+)", key)
    return {"layer": int(m.group(1)), "neuron": int(m.group(2)), "kind": "mlp"} if m else {}


def _sort_key(source: str, key: str, row: dict) -> tuple:
    if source == "adapter":
        mod = row.get("module")
        mi = LORA_MODULES.index(mod) if mod in LORA_MODULES else len(LORA_MODULES)
        return (row.get("layer", 1 << 30), mi, key)
    if source == "neuron":
        return (row.get("layer", 1 << 30), row.get("neuron", 1 << 30), key)
    if source == "transcoder":
        idx = sparse_index(key)
        rank = 0 if row.get("hesitation_selected") else 1 if present(row.get("explanation")) or \
            present(row.get("explanation_neg")) else 2
        return (rank, idx if idx is not None else 1 << 30, key)
    idx = sae_index(key)
    return (idx if idx is not None else 1 << 30, key)


def build_catalogue(inputs: RunInputs, sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per feature (COLUMNS), sources in SOURCES order, each in its natural order."""
    rows: dict[tuple[str, str], dict] = {}

    def add(source: str, key: str, **kw) -> dict:
        r = rows.setdefault((source, key), {"source": source, "key": key})
        for k, v in kw.items():
            if present(v):
                r[k] = v
        return r

    # ---- what exists --------------------------------------------------------------------
    comps = inputs.table("extract", "components.parquet", "adapter component catalogue", ["column"],
                         optional=["layer", "module", "kind", "a_norm", "b_norm"])
    if comps is not None:
        for r in comps.to_dict("records"):
            add("adapter", str(r["column"]), **{k: r.get(k) for k in ("layer", "module", "kind", "a_norm", "b_norm")})
    if inputs.exists("extract", "neuron_catalogue.parquet"):
        neu = inputs.table("extract", "neuron_catalogue.parquet", "MLP neuron catalogue", ["column"],
                           optional=["layer", "neuron"])
        for r in ([] if neu is None else neu.to_dict("records")):
            add("neuron", str(r["column"]), layer=r.get("layer"), neuron=r.get("neuron"), kind="mlp")
    lat = inputs.table("sae", "latents.parquet", "SAE feature list", ["feature"], optional=["name", "live", "freq"])
    if lat is not None:
        if "live" in lat:
            lat = lat[lat["live"].astype(bool)]
        for r in lat.to_dict("records"):
            add("sae", feature_key("sae", r.get("name") or int(r["feature"])), live=bool(r.get("live", True)),
                freq=r.get("freq"))

    if inputs.started("transcoder_extract"):
        tl = inputs.table("transcoder_extract", "latents.parquet", "transcoder feature list", ["feature"],
                          optional=["name", "layer", "latent", "live", "freq", "dec_norm", "enc_norm"])
        if tl is not None:
            if "live" in tl:
                tl = tl[tl["live"].astype(bool)]
            for r in tl.to_dict("records"):
                add("transcoder", feature_key("transcoder", r.get("name") or int(r["feature"])),
                    live=bool(r.get("live", True)), freq=r.get("freq"), layer=r.get("layer"), latent=r.get("latent"),
                    dec_norm=r.get("dec_norm"), enc_norm=r.get("enc_norm"))
        if inputs.exists("transcoder_extract", "hesitation_features.parquet"):
            hf = inputs.table("transcoder_extract", "hesitation_features.parquet", "transcoder hesitation features",
                              ["feature"], optional=["name", "contexts", "matches", "share", "selected"])
            for r in ([] if hf is None else hf.to_dict("records")):
                key = feature_key("transcoder", r.get("name") or int(r["feature"]))
                if (("transcoder", key) not in rows) and not r.get("selected"):
                    continue  # a candidate that is not a live latent: nothing to add it to
                m, c = r.get("matches"), r.get("contexts")
                text = (f"{int(m)}/{int(c)} top contexts at a hesitation word" if present(m) and present(c)
                        else "hesitation contexts")
                sel = bool(r.get("selected")) if present(r.get("selected")) else False
                add("transcoder", key, hesitation=text + ("; selected: ablated by transcoder_eval" if sel else ""),
                    hesitation_selected=sel)

    stats = inputs.table("topk", "stats.parquet", "activation statistics", ["source", "feature"],
                         optional=["n_tokens", "mean", "std", "min", "max", "frac_active"])
    if stats is not None:
        for r in stats.to_dict("records"):
            src = str(r["source"])
            add(src, feature_key(src, r["feature"]),
                **{k: r.get(k) for k in ("n_tokens", "mean", "std", "min", "max", "frac_active")})

    expl = inputs.table("autointerp", "explanations.parquet", "feature explanations, classifications and categories",
                        ["source", "feature"],
                        optional=["sign", "explanation", "classification", "classification_reasoning", "category",
                                  "score", "model", "error"])
    cats = inputs.json("autointerp", "categories.json", "category names") if inputs.done("autointerp") else None
    names = category_names(cats) if cats is not None else {}
    long_rows = []
    if expl is not None:
        # One explanation per feature and sign (autointerp explains each sign's top contexts):
        # the positive one is the feature's headline, the negative one is shown beside it.
        for r in expl.to_dict("records"):
            src = str(r["source"])
            key = feature_key(src, r["feature"])
            sign = "neg" if str(r.get("sign") or "pos").startswith("neg") else "pos"
            cat = str(r["category"]) if present(r.get("category")) else None
            cls = int(r["classification"]) if present(r.get("classification")) else None
            text = str(r["explanation"]) if present(r.get("explanation")) else None
            cname = names.get(cat, cat) if cat else None
            score = float(r["score"]) if present(r.get("score")) else None
            long_rows.append({"source": src, "key": key, "sign": sign, "explanation": text, "classification": cls,
                              "category": cat, "category_name": cname, "score": score})
            if sign == "neg":
                add(src, key, explanation_neg=text, classification_neg=cls, category_name_neg=cname, score_neg=score)
            else:
                add(src, key, sign="pos", explanation=text, classification=cls,
                    classification_reasoning=r.get("classification_reasoning"), category=cat, category_name=cname,
                    score=score, model=r.get("model"), error=r.get("error"))
        for r in rows.values():  # only the negative side explained: it is the headline
            if r.get("explanation") is None and r.get("explanation_neg") is not None:
                r.update(sign="neg", explanation=r["explanation_neg"], classification=r.get("classification_neg"),
                         category_name=r.get("category_name_neg"), score=r.get("score_neg"))

    # ---- shape ------------------------------------------------------------------------
    want = list(sources) if sources else list(SOURCES)
    out = []
    for (src, key), r in rows.items():
        if src not in want:
            continue
        parsed = _parse_adapter(key) if src == "adapter" else _parse_neuron(key) if src == "neuron" else {}
        for k, v in parsed.items():
            r.setdefault(k, v)
        out.append(r)
    out.sort(key=lambda r: (SOURCES.index(r["source"]) if r["source"] in SOURCES else 9,
                            _sort_key(r["source"], r["key"], r)))
    df = pd.DataFrame(out, columns=COLUMNS)
    df["order"] = np.arange(len(df))
    long = pd.DataFrame(long_rows, columns=EXPLANATION_COLUMNS)
    df.attrs["explanations"] = long[long["source"].isin(want)].reset_index(drop=True)
    # object columns keep None (not NaN) for missing text
    for c in ("explanation", "category", "category_name", "classification_reasoning", "model", "error", "module", "kind",
              "explanation_neg", "category_name_neg", "sign", "hesitation"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    return ground_truth_columns(inputs, df)


def ground_truth_columns(inputs: RunInputs, df: pd.DataFrame) -> pd.DataFrame:
    """Add the concepts stage's verdict per feature: gt_concept, gt_sign, gt_auroc,
    gt_precision, gt_class (best concept, true labels) and gt_aurocs (every concept's AUROC,
    best sign, highest first, as text); and explanation_copied (the explanation repeats the
    explain prompt's wording: never shown as the feature's headline)."""
    from rank1_core.autointerp import prompts as P

    df["explanation_copied"] = [bool(isinstance(e, str) and P.copied_from(e, P.EXPLAIN_INSTRUCTIONS))
                                for e in df["explanation"]]
    for c in ("gt_concept", "gt_sign", "gt_auroc", "gt_precision", "gt_class", "gt_aurocs"):
        df[c] = None
    if not inputs.done("concepts") or df.empty:
        return df
    feats = inputs.table("concepts", "features.parquet", "ground-truth concepts of each feature",
                         ["source", "feature", "labels", "concept", "sign", "auroc", "precision", "class"])
    scores = inputs.table("concepts", "scores.parquet", "concept AUROCs of each feature",
                          ["source", "feature", "sign", "labels", "concept", "auroc"])
    if feats is None:
        return df
    f = feats[feats["labels"] == "true"].set_index(["source", "feature"])
    aurocs: dict = {}
    if scores is not None:
        sc = scores[scores["labels"] == "true"].groupby(["source", "feature", "concept"])["auroc"].max().reset_index()
        for (src, feat), g in sc.groupby(["source", "feature"]):
            g = g.sort_values("auroc", ascending=False)
            aurocs[(src, feat)] = " · ".join(f"{c} {a:.3f}" for c, a in zip(g["concept"], g["auroc"]))
    for i, (src, key) in enumerate(zip(df["source"], df["key"])):
        if (src, key) in f.index:
            r = f.loc[(src, key)]
            if present(r["concept"]):
                df.at[i, "gt_concept"], df.at[i, "gt_sign"] = r["concept"], r["sign"]
                df.at[i, "gt_auroc"], df.at[i, "gt_precision"] = float(r["auroc"]), float(r["precision"])
                df.at[i, "gt_class"] = r["class"]
        df.at[i, "gt_aurocs"] = aurocs.get((src, key))
    return df


def where(row: dict) -> str:
    """'L03 gate_proj', 'L03 #0012', 'L03 latent 12' (transcoder) or '' (SAE features are
    cross-layer)."""
    if row["source"] == "adapter" and present(row.get("layer")) and present(row.get("module")):
        return f"L{int(row['layer']):02d} {row['module']}"
    if row["source"] == "neuron" and present(row.get("layer")) and present(row.get("neuron")):
        return f"L{int(row['layer']):02d} #{int(row['neuron']):04d}"
    if row["source"] == "transcoder" and present(row.get("layer")) and present(row.get("latent")):
        return f"L{int(row['layer']):02d} latent {int(row['latent'])}"
    return ""
