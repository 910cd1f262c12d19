"""The paper's figures and the run's curves as PNG files (matplotlib, Agg canvas, no pyplot).

Each function takes plain DataFrames and a path, draws with whatever columns exist and
returns the path. Labels that come from data go through `_label` (matplotlib would parse
`$...$` in them as mathtext).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from rank1_core.config import LORA_MODULES
from rank1_core.rundir import atomic_local_path

CLASS_LABELS = {0: "0 clear (monosemantic)", 1: "1 broad but consistent", 2: "2 polysemantic", -1: "unclassified"}
CLASS_COLORS = {0: "#2b8a3e", 1: "#74b816", 2: "#e8590c", -1: "#adb5bd"}
SOURCE_LABELS = {"adapter": "LoRA components", "neuron": "MLP neurons", "sae": "SAE features",
                 "transcoder": "transcoder features"}
SOURCE_COLORS = {"adapter": "#e8590c", "neuron": "#1c7ed6", "sae": "#7048e8", "transcoder": "#0ca678"}


def _label(s) -> str:
    return str(s).replace("$", r"\$")


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    FigureCanvasAgg(fig)
    with atomic_local_path(path) as tmp:  # the temporary name keeps the suffix savefig reads
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", facecolor="white")
    return path


def figure1(kl_layers: Optional[pd.DataFrame], kl_components: Optional[pd.DataFrame], path: Path,
            dpi: int = 130) -> Path:
    """(a) KL(ablated || full adapter) with each layer's adapters ablated; (b) each component
    ablated alone, as a modules x layers heatmap (log colour scale when every value is > 0)."""
    panels = [p for p in ("a", "b") if (kl_layers if p == "a" else kl_components) is not None]
    layers = sorted(set().union(*(set(int(x) for x in d["layer"]) for d in (kl_layers, kl_components)
                                  if d is not None)))
    width = max(6.0, min(18.0, 2.5 + 0.22 * len(layers)))
    fig = Figure(figsize=(width, 2.9 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    ax_i = 0
    if kl_layers is not None:
        ax = axes[ax_i]
        ax_i += 1
        d = kl_layers.sort_values("layer")
        err = d["kl_sem"] if "kl_sem" in d else None
        ax.bar(d["layer"], d["kl_mean"], yerr=err, color="#1c7ed6", ecolor="#495057", capsize=2, width=0.8)
        ax.set_xlabel("layer")
        ax.set_ylabel("KL (nats/token)")
        ax.set_title("(a) all adapter components of one layer ablated")
        ax.set_xlim(min(layers) - 0.6, max(layers) + 0.6)
        step = max(1, len(layers) // 32)
        ax.set_xticks(layers[::step])
        ax.grid(axis="y", alpha=0.3)
    if kl_components is not None:
        ax = axes[ax_i]
        mods = [m for m in LORA_MODULES if m in set(kl_components["module"])]
        mods += sorted(set(kl_components["module"]) - set(mods))
        grid = np.full((len(mods), len(layers)), np.nan)
        li = {l: j for j, l in enumerate(layers)}
        for r in kl_components.itertuples(index=False):  # rank r: the largest of a module's r directions
            grid[mods.index(r.module), li[r.layer]] = np.fmax(grid[mods.index(r.module), li[r.layer]], r.kl_mean)
        per_cell = len(kl_components) > len(kl_components[["layer", "module"]].drop_duplicates())
        finite = grid[np.isfinite(grid)]
        norm = (LogNorm(vmin=max(finite.min(), finite.max() * 1e-6), vmax=finite.max())
                if finite.size and (finite > 0).all() and finite.max() > finite.min() else Normalize())
        im = ax.imshow(grid, aspect="auto", cmap="magma_r", norm=norm, interpolation="nearest")
        ax.set_yticks(range(len(mods)), [_label(m) for m in mods])
        step = max(1, len(layers) // 32)
        ax.set_xticks(range(0, len(layers), step), [str(layers[j]) for j in range(0, len(layers), step)])
        ax.set_xlabel("layer")
        ax.set_title("(b) one adapter component ablated (KL, nats/token)" if not per_cell else
                     "(b) one direction ablated (KL, nats/token; the module's largest)")
        if len(layers) * len(mods) <= 120 and finite.size:
            for i in range(len(mods)):
                for j in range(len(layers)):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=7,
                                color="white" if norm(grid[i, j]) > 0.6 else "black")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    fig.suptitle("Figure 1: effect of ablating LoRA components (KL to the full adapter)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi)


def classification_shares(features: pd.DataFrame, sources: Sequence[str]) -> pd.DataFrame:
    """Share (%) of each classification per source among the explained features."""
    rows = []
    for src in sources:
        d = features[(features["source"] == src) & features["explanation"].notna()]
        cls = d["classification"].fillna(-1).astype(int)
        n = len(d)
        for c in (0, 1, 2, -1):
            k = int((cls == c).sum())
            rows.append({"source": src, "classification": c, "label": CLASS_LABELS[c], "features": k,
                         "share_pct": 100.0 * k / n if n else 0.0})
    return pd.DataFrame(rows)


def category_shares(features: pd.DataFrame, sources: Sequence[str]) -> pd.DataFrame:
    """Share (%) of features per category for each source (categorised features only)."""
    rows = []
    for src in sources:
        d = features[(features["source"] == src) & features["category_name"].notna()]
        n = len(d)
        for cat, k in d["category_name"].value_counts().items():
            rows.append({"source": src, "category": cat, "features": int(k), "share_pct": 100.0 * k / n})
    return pd.DataFrame(rows, columns=["source", "category", "features", "share_pct"])


def figure2(cls_shares: pd.DataFrame, cat_shares: pd.DataFrame, path: Path, dpi: int = 130) -> Path:
    """(left) monosemanticity: share of features per classification, per source;
    (right) category distribution of adapter components vs MLP neurons."""
    srcs = list(dict.fromkeys(cls_shares["source"])) if len(cls_shares) else []
    cats = (cat_shares.groupby("category")["share_pct"].max().sort_values(ascending=True).index.tolist()
            if len(cat_shares) else [])
    fig = Figure(figsize=(12, max(3.2, 1.0 + 0.42 * max(len(cats), 4))))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    y = np.arange(len(srcs))
    acc = np.zeros(len(srcs))
    for c in (0, 1, 2, -1):
        vals = np.array([float(cls_shares[(cls_shares["source"] == s) & (cls_shares["classification"] == c)]
                               ["share_pct"].sum()) for s in srcs])
        if not vals.any():
            continue
        left.barh(y, vals, left=acc, color=CLASS_COLORS[c], label=CLASS_LABELS[c])
        for yi, (a, v) in enumerate(zip(acc, vals)):
            if v >= 7:
                left.text(a + v / 2, yi, f"{v:.0f}%", ha="center", va="center", fontsize=8, color="white")
        acc += vals
    left.set_yticks(y, [SOURCE_LABELS.get(s, _label(s)) for s in srcs])
    left.set_xlim(0, 100)
    left.set_xlabel("% of explained features")
    left.set_title("monosemanticity (LLM classification)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    left.invert_yaxis()
    pair = [s for s in ("adapter", "neuron") if s in set(cat_shares["source"])] or \
        list(dict.fromkeys(cat_shares["source"]))[:2]
    h = 0.8 / max(1, len(pair))
    yc = np.arange(len(cats))
    for i, s in enumerate(pair):
        vals = [float(cat_shares[(cat_shares["source"] == s) & (cat_shares["category"] == c)]["share_pct"].sum())
                for c in cats]
        right.barh(yc + (i - (len(pair) - 1) / 2) * h, vals, height=h, color=SOURCE_COLORS.get(s, None),
                   label=SOURCE_LABELS.get(s, _label(s)))
    right.set_yticks(yc, [_label(c) for c in cats], fontsize=8)
    right.set_xlabel("% of categorised features")
    right.set_title("categories")
    if pair:
        right.legend(fontsize=8, loc="lower right")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle("Figure 2: LoRA components vs MLP neurons", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi)


def figure3(densities: pd.DataFrame, path: Path, dpi: int = 130) -> Path:
    """Category activation densities of SAE features: the normalised sum of feature
    activations within each category (columns category, density_pct, features)."""
    d = densities.sort_values("density_pct")
    fig = Figure(figsize=(8, max(2.5, 0.8 + 0.38 * len(d))))
    ax = fig.subplots()
    y = np.arange(len(d))
    ax.barh(y, d["density_pct"], color="#7048e8")
    for yi, (v, n) in enumerate(zip(d["density_pct"], d["features"])):
        ax.text(v + 0.5, yi, f"{v:.1f}%  ({n} features)", va="center", fontsize=8)
    ax.set_yticks(y, [_label(c) for c in d["category"]], fontsize=9)
    ax.set_xlim(0, max(100.0 if d.empty else d["density_pct"].max() * 1.35, 1.0))
    ax.set_xlabel("% of summed SAE feature activation")
    ax.set_title("Figure 3: category activation densities of SAE features", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


SAE_CURVES = (("loss", "loss"), ("mse", "MSE (normalised)"), ("aux_loss", "AuxK loss"), ("fvu", "FVU"),
              ("l0", "L0 (active latents/token)"), ("dead_fraction", "dead latent fraction"),
              ("dead_frac", "dead latent fraction"), ("lr", "learning rate"))


def curves(metrics: pd.DataFrame, path: Path, title: str, specs=SAE_CURVES, x: str = "step",
           dpi: int = 130, others: Optional[dict[str, pd.DataFrame]] = None) -> Optional[Path]:
    """One small panel per metric that exists; `others` adds more runs (label -> frame)
    to the same panels."""
    runs = {"": metrics, **(others or {})}
    present, seen = [], set()
    for col, label in specs:
        if label in seen:
            continue
        if any(col in m.columns and m[col].notna().any() for m in runs.values()):
            present.append((col, label))
            seen.add(label)
    if not present:
        return None
    n = len(present)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (col, label) in zip(axes, present):
        for name, m in runs.items():
            if col not in m.columns:
                continue
            xs = m[x] if x in m.columns else np.arange(len(m))
            ok = m[col].notna()
            ax.plot(xs[ok], m[col][ok], lw=1.2, label=name or None, marker="o" if ok.sum() < 30 else None, ms=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        vals = pd.concat([m[col].dropna() for m in runs.values() if col in m])
        if col in ("loss", "mse", "aux_loss", "heldout_loss") and len(vals) and (vals > 0).all() \
                and vals.max() > 10 * vals.min():  # log only over a decade or more (else slow, unreadable ticks)
            ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(_label(title), fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi)


TRAIN_CURVES = (("loss", "training loss"), ("heldout_loss", "held-out loss"), ("lr", "learning rate"),
                ("tokens_per_s", "tokens/s"))
TRANSCODER_CURVES = (("loss", "loss"), ("kl", "KL(target || base + adapters)"), ("recon", "recon (mean FVU)"),
                     ("fve", "FVE of the MLP difference"), ("sparsity", "sparsity term"),
                     ("l0", "L0 (latents/layer/token)"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))


def transcoder_layers(layers: pd.DataFrame, path: Path, dpi: int = 130) -> Path:
    """Per adapted layer: (a) explained variance of the MLP difference by the transcoder
    branch (fve_difference; 1 = the fine-tune's change of that MLP reproduced exactly);
    (b) when the columns exist, mean norm of the difference vs the branch's output, and L0."""
    d = layers.sort_values("layer")
    has_norms = {"diff_norm", "adapter_norm"} <= set(d.columns)
    has_l0 = "l0" in d.columns
    n = 1 + int(has_norms or has_l0)
    width = max(6.0, min(18.0, 2.5 + 0.22 * len(d)))
    fig = Figure(figsize=(width, 2.9 * n + 0.5))
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    ls = [int(v) for v in d["layer"]]
    ticks = ls[:: max(1, len(ls) // 32)]
    for a in axes:
        a.set_xticks(ticks)
        if ls:
            a.set_xlim(min(ls) - 0.6, max(ls) + 0.6)
    ax = axes[0]
    fve = pd.to_numeric(d["fve_difference"], errors="coerce")
    colors = ["#0ca678" if v >= 0 else "#e03131" for v in fve.fillna(0)]
    ax.bar(d["layer"], fve.fillna(0), color=colors, width=0.8)
    ax.axhline(1.0, color="#495057", lw=0.8, ls="--")
    ax.axhline(0.0, color="#495057", lw=0.8)
    ax.set_ylabel("FVE of MLP difference")
    ax.set_xlabel("layer")
    lo = float(fve.min()) if fve.notna().any() else 0.0
    ax.set_ylim(max(min(0.0, lo * 1.1), -5.0), 1.05)
    if lo < -5:
        ax.text(0.01, 0.02, f"(clipped; lowest {lo:.3g})", transform=ax.transAxes, fontsize=7)
    ax.set_title("(a) explained variance of target_mlp(x) - base_mlp(x) by the adapter, per layer", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if n > 1:
        ax = axes[1]
        if has_norms:
            ax.plot(d["layer"], d["diff_norm"], marker="o", ms=3, lw=1.2, color="#495057", label="|difference|")
            ax.plot(d["layer"], d["adapter_norm"], marker="o", ms=3, lw=1.2, color="#0ca678", label="|adapter output|")
            ax.set_ylabel("mean norm per token")
            ax.legend(fontsize=7, loc="upper left")
        if has_l0:
            ax2 = ax.twinx() if has_norms else ax
            ax2.bar(d["layer"], d["l0"], color="#dee2e6" if has_norms else "#adb5bd", width=0.8, label="L0")
            ax2.set_ylabel("L0 (active latents/token)")
            if has_norms:  # the lines over the bars
                ax.set_zorder(ax2.get_zorder() + 1)
                ax.patch.set_visible(False)
        ax.set_xlabel("layer")
        ax.set_title("(b) size of the MLP difference and of the adapter's output; L0 (bars)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Transcoder adapters: faithfulness per layer (held-out traces)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path, dpi)


def detection_scores(features: pd.DataFrame, path: Path, dpi: int = 130) -> Optional[Path]:
    """Distribution of explanation detection scores per source, and their mean per class."""
    d = features[features["score"].notna()]
    if d.empty:
        return None
    srcs = list(dict.fromkeys(d["source"]))
    fig = Figure(figsize=(11, 3.4))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    lo, hi = float(d["score"].min()), float(d["score"].max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 21)
    for s in srcs:
        v = d[d["source"] == s]["score"].astype(float)
        left.hist(v, bins=bins, histtype="step", linewidth=1.8, color=SOURCE_COLORS.get(s), density=True,
                  label=f"{SOURCE_LABELS.get(s, _label(s))} (n={len(v)}, mean {v.mean():.2f})")
    left.set_xlabel("detection score")
    left.set_ylabel("density")
    left.legend(fontsize=8)
    left.set_title("explanation detection scores", fontsize=10)
    width = 0.8 / max(1, len(srcs))
    for i, s in enumerate(srcs):
        ds = d[d["source"] == s]
        cls = ds["classification"].fillna(-1).astype(int)
        means = [float(ds["score"][cls == c].mean()) if (cls == c).any() else 0.0 for c in (0, 1, 2)]
        right.bar(np.arange(3) + (i - (len(srcs) - 1) / 2) * width, means, width=width,
                  color=SOURCE_COLORS.get(s), label=SOURCE_LABELS.get(s, _label(s)))
    right.set_xticks(range(3), ["clear", "broad", "polysemantic"])
    right.set_ylabel("mean detection score")
    right.set_title("by classification", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


GT_CLASS_COLORS = {"clean": "#2b8a3e", "broad": "#74b816", "unmatched": "#adb5bd"}


def ground_truth(summary: pd.DataFrame, path: Path, dpi: int = 130) -> Path:
    """The objective Figure 2: per source, the share of features whose best ground-truth
    concept is clean / broad, with 95% bootstrap intervals; hatched bars: the same features
    against shuffled labels (chance). `summary`: the concepts stage's summary.parquet."""
    srcs = list(dict.fromkeys(summary["source"]))
    fig = Figure(figsize=(max(5.0, 1.3 * len(srcs) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.18
    for i, src in enumerate(srcs):
        for j, (lab, cl) in enumerate((("true", "clean"), ("true", "broad"), ("shuffled", "clean"),
                                       ("shuffled", "broad"))):
            r = summary[(summary["source"] == src) & (summary["labels"] == lab)]
            if r.empty:
                continue
            r = r.iloc[0]
            x = i + (j - 1.5) * width
            err = None
            if np.isfinite(r.get(f"{cl}_lo", np.nan)):
                err = [[max(0.0, r[cl] - r[f"{cl}_lo"])], [max(0.0, r[f"{cl}_hi"] - r[cl])]]
            ax.bar(x, r[cl], width, color=GT_CLASS_COLORS[cl], hatch="//" if lab == "shuffled" else None,
                   edgecolor="white" if lab == "true" else "#495057", yerr=err, capsize=2,
                   label=f"{cl}{' (shuffled labels)' if lab == 'shuffled' else ''}" if i == 0 else None)
    ax.set_xticks(range(len(srcs)), [_label(SOURCE_LABELS.get(s, "random directions" if s == "random" else s))
                                      for s in srcs], fontsize=8)
    ax.set_ylabel("share of features")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title("Features whose best ground-truth concept is clean / broad", fontsize=9)
    return _save(fig, path, dpi)
