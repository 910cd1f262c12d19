"""Static HTML: the report page, the searchable feature index and one page per feature.

Pages open from disk (file://) with no network: CSS and JS come from `assets/` beside them,
and the data travels inside each page as JSON in a `<script type="application/json">`
block (`script_json` escapes `<`, `>`, `&` and the JS line separators, so no string of the
data can close the block) or, for the whole-trace tokens shared by many pages, as a small
`.js` file under `traces/`. HTML written here escapes every piece of text with
`html.escape(quote=True)`; the page scripts put data into the DOM only through
`textContent`, `title` and CSSOM colours, never `innerHTML`. A Content-Security-Policy
in every page forbids inline scripts and any network request, so even a missed escape
could not run.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from rank1_core.rundir import atomic_local_path

ASSETS = ("style.css", "index.js", "feature.js")
CSP = ("default-src 'none'; script-src 'self' file:; style-src 'self' file: 'unsafe-inline'; "
       "img-src 'self' file: data:; base-uri 'none'; form-action 'none'")
SOURCE_LABELS = {"adapter": "LoRA component", "neuron": "MLP neuron", "sae": "SAE feature",
                 "transcoder": "transcoder feature"}
SPARSE_SOURCES = ("sae", "transcoder")
CLASS_NAMES = {0: "clear", 1: "broad", 2: "polysemantic"}


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def script_json(obj: Any) -> str:
    """JSON safe inside <script type="application/json"> (and as a JS expression)."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_jsonable)
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return str(o)


def r3(v: Any) -> Optional[float]:
    """A float to 3 significant digits for the page (None for missing / NaN)."""
    if v is None:
        return None
    f = float(v)
    if not math.isfinite(f):
        return None
    if f == 0:
        return 0
    return float(f"{f:.3g}")


def r3_list(a: Iterable) -> list:
    return [0 if x == 0 else float(f"{x:.3g}") for x in np.asarray(a, dtype=np.float64).tolist()]


def safe_name(key: str, taken: set[str]) -> str:
    """A file name for a feature key: [A-Za-z0-9_.-] only, unique within `taken`."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:80].strip(".") or "feature"
    name = base
    if base != key or base.lower() in taken:
        name = f"{base}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    taken.add(name.lower())
    return name


def copy_assets(out: Path) -> None:
    dest = out / "assets"
    dest.mkdir(parents=True, exist_ok=True)
    src = resources.files("rank1_core.report") / "assets"
    for name in ASSETS:
        with resources.as_file(src / name) as p, atomic_local_path(dest / name) as tmp:
            shutil.copyfile(p, tmp)


def page(title: str, body: str, root: str, scripts: Sequence[str] = (), body_class: str = "") -> str:
    tags = "".join(f'<script src="{esc(s)}"></script>' for s in scripts)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title>"
        f'<link rel="stylesheet" href="{root}assets/style.css"></head>\n'
        f'<body class="{esc(body_class)}">\n{body}\n{tags}\n</body></html>\n'
    )


def html_table(df: pd.DataFrame, cls: str = "data") -> str:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v)

    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{esc(cell(v))}</td>" for v in r) + "</tr>"
                   for r in df.itertuples(index=False))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


# --------------------------------------------------------------------------- histogram


def histogram_svg(counts: np.ndarray, edges: np.ndarray, label: str, note: str = "") -> str:
    """An inline SVG bar chart of one histogram (log-scaled counts), bars coloured by sign."""
    w, h, pad_l, pad_b, pad_t = 520, 170, 46, 34, 10
    counts = np.asarray(counts, dtype=np.float64)
    n = len(counts)
    if n == 0 or counts.sum() == 0:
        return '<p class="muted">no activations in the sample</p>'
    ymax = math.log10(counts.max() + 1)
    bw = (w - pad_l - 8) / n
    bars = []
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        bh = (h - pad_b - pad_t) * math.log10(c + 1) / ymax
        mid = (edges[i] + edges[i + 1]) / 2
        color = "#e8590c" if mid > 0 else "#1c7ed6" if mid < 0 else "#868e96"
        x = pad_l + i * bw
        bars.append(f'<rect x="{x:.1f}" y="{h - pad_b - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                    f'height="{bh:.1f}" fill="{color}"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): '
                    f'{int(c)}</title></rect>')
    lo, hi = float(edges[0]), float(edges[-1])
    ticks = [(lo, "start"), (hi, "end")]
    if lo < 0 < hi:
        ticks.append((0.0, "middle"))
    tick_svg = "".join(
        f'<text x="{pad_l + (v - lo) / (hi - lo) * (w - pad_l - 8):.1f}" y="{h - pad_b + 14}" '
        f'text-anchor="{a}">{v:.3g}</text>' for v, a in ticks)
    ylab = "".join(
        f'<text x="{pad_l - 4}" y="{h - pad_b - (h - pad_b - pad_t) * math.log10(10 ** e + 1) / ymax + 4:.1f}" '
        f'text-anchor="end">{10 ** e:,}</text>'
        for e in range(0, int(ymax) + 1) if 10 ** e <= counts.max())
    return (f'<svg class="hist" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-label="{esc(label)}"><title>{esc(label)}</title>'
            f'<line x1="{pad_l}" y1="{h - pad_b}" x2="{w - 8}" y2="{h - pad_b}" stroke="#adb5bd"/>'
            f'{"".join(bars)}{tick_svg}{ylab}'
            f'<text x="{(w + pad_l) / 2:.0f}" y="{h - 4}" text-anchor="middle">activation{esc(note)}</text>'
            "</svg>")


# --------------------------------------------------------------------------- feature pages


def feature_page(row: dict, data: dict, hist_html: str, nav: dict[str, Optional[str]],
                 trace_script: Optional[str]) -> str:
    """One feature: facts, histogram, top contexts of both signs, one whole trace.
    The page lives at features/<source>/<name>.html (root '../../')."""
    root = "../../"
    src = row["source"]
    cls = row.get("classification")
    cls = int(cls) if cls is not None else None
    facts = [("source", SOURCE_LABELS.get(src, src))]
    if row.get("where"):
        facts.append(("where", row["where"]))
    facts += [("classification", f"{cls} ({CLASS_NAMES.get(cls, '?')})" if cls is not None else "—"),
              ("category", row.get("category_name") or "—"),
              ("detection score", _fmt(row.get("score")))]
    if row.get("classification_reasoning"):
        facts.append(("why", row["classification_reasoning"]))
    if row.get("sign") == "neg":
        facts.append(("explains", "the negative side (no positive explanation)"))
    elif row.get("explanation_neg"):
        cn = row.get("classification_neg")
        neg = row["explanation_neg"] + (f"  [{int(cn)} {CLASS_NAMES.get(int(cn), '?')}" if cn is not None else "  [")
        neg += f"; {row['category_name_neg']}" if row.get("category_name_neg") else ""
        neg += f"; score {_fmt(row.get('score_neg'))}]" if row.get("score_neg") is not None else "]"
        facts.append(("negative side", neg))
    for k, label in (("n_tokens", "tokens"), ("mean", "mean"), ("std", "std"), ("min", "min"), ("max", "max"),
                     ("frac_active", "fraction active"), ("freq", "firing frequency"), ("a_norm", "|lora_A|"),
                     ("b_norm", "|lora_B|"), ("dec_norm", "|W_dec row|"), ("enc_norm", "|W_enc column|"),
                     ("hesitation", "hesitation")):
        if row.get(k) is not None and not (isinstance(row[k], float) and math.isnan(row[k])):
            facts.append((label, _fmt(row[k])))
    if row.get("gt_concept"):
        facts.append(("ground truth", f"{row['gt_concept']}{' (negative side)' if row.get('gt_sign') == 'neg' else ''}: "
                      f"AUROC {_fmt(row.get('gt_auroc'))}, top-k precision {_fmt(row.get('gt_precision'))} "
                      f"({row.get('gt_class')})"))
    if row.get("gt_aurocs"):
        facts.append(("concept AUROCs", row["gt_aurocs"]))
    if row.get("model"):
        facts.append(("explained by", row["model"]))
    if row.get("error"):
        facts.append(("autointerp error", row["error"]))
    facts_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    links = [f'<a href="{root}index.html">report</a>', f'<a href="{root}features.html">all features</a>']
    if nav.get("prev"):
        links.append(f'<a id="prev" href="{esc(nav["prev"])}">&larr; previous</a>')
    if nav.get("next"):
        links.append(f'<a id="next" href="{esc(nav["next"])}">next &rarr;</a>')
    expl = row.get("explanation")
    # Headline rule: an explanation flagged as a copy of the prompt is never the headline; the
    # best ground-truth concept with its AUROC is, and the copy is shown only as flagged.
    copied = bool(expl) and bool(row.get("explanation_copied"))
    if copied:
        facts.append(("flagged explanation", f"copies the prompt's wording: {expl}"))
    gt_head = (f"ground truth: {row['gt_concept']} (AUROC {_fmt(row.get('gt_auroc'))})"
               if row.get("gt_concept") else None)
    headline = gt_head if copied or not expl else expl
    facts_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    steer_html = ""
    if row.get("steer_figure"):
        fig = esc(row["steer_figure"])
        steer_html = (f'<section class="steering" id="steering"><h2>Steering</h2><figure><a href="{fig}">'
                      f'<img src="{fig}" alt="steering curves of {esc(row["key"])}" loading="lazy"></a>'
                      "<figcaption>This feature steered by alpha (0 = ablated, 1 = unchanged) against random "
                      "directions of equal norm: hesitation rate, response length, accuracy, KL.</figcaption>"
                      "</figure></section>\n")
    body = f"""<nav class="top">{" · ".join(links)}</nav>
<header class="feature-head">
<h1><span class="src src-{esc(src)}">{esc(SOURCE_LABELS.get(src, src))}</span> <code id="fid">{esc(row["key"])}</code></h1>
<p id="explanation" class="explanation{'' if headline else ' muted'}">{esc(headline) if headline else ('(explanation flagged: it copies the prompt)' if copied else '(no explanation yet)')}</p>
</header>
<div class="feature-top">
<table class="facts">{facts_html}</table>
<figure class="histogram"><figcaption>activation histogram (sample of {esc(data.get("hist_tokens", 0))} tokens{'; tokens where the feature fires' if src in SPARSE_SOURCES else ''})</figcaption>{hist_html}</figure>
</div>
{steer_html}<p class="legend">Token colour: <span class="swatch pos">positive</span> <span class="swatch neg">negative</span>,
intensity = activation / the largest activation of its sign on this page (+{esc(_fmt(data.get("maxpos")))},
−{esc(_fmt(data.get("maxneg")))}); hover a token for its value; the outlined token is the hit.</p>
<section class="contexts">
<div><h2>Top positive activations <small id="n-pos"></small></h2><ol id="ctx-pos" class="ctx-list"></ol></div>
<div><h2>Top negative activations <small id="n-neg"></small></h2><ol id="ctx-neg" class="ctx-list"></ol></div>
</section>
<section class="trace-section"><h2>Whole trace <small id="trace-note"></small></h2><div id="trace" class="trace"></div></section>
<noscript><p>The contexts and the trace are drawn by assets/feature.js; enable JavaScript.</p></noscript>
<script type="application/json" id="feature-data">{script_json(data)}</script>"""
    scripts = ([f"{root}{trace_script}"] if trace_script else []) + [f"{root}assets/feature.js"]
    return page(f"{row['key']} · {SOURCE_LABELS.get(src, src)} · rank1", body, root, scripts, "feature")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}"
    return str(v)


def trace_file(doc: int, start: int, tokens: Sequence[str]) -> str:
    """traces/d<doc>.js: the tokens of one document (from `start`), shared by the pages."""
    return ("(window.RANK1_TRACES = window.RANK1_TRACES || {})[" + json.dumps(str(doc)) + "] = "
            + script_json({"start": int(start), "tokens": list(tokens)}) + ";\n")


def feature_index_page(rows: list[list], columns: list[str], run_label: str) -> str:
    """features.html: every feature in one table, filtered and sorted in the page."""
    data = {"columns": columns, "rows": rows}
    body = f"""<nav class="top"><a href="index.html">report</a> · <b>features</b></nav>
<h1>Features <small>{esc(run_label)}</small></h1>
<form id="filters" class="filters" autocomplete="off">
<input id="q" type="search" placeholder="search id, explanation, category…" size="34" aria-label="search">
<select id="source" aria-label="source"><option value="">every source</option></select>
<select id="cls" aria-label="classification"><option value="">any classification</option>
<option value="0">0 clear</option><option value="1">1 broad</option><option value="2">2 polysemantic</option>
<option value="none">unclassified</option></select>
<select id="cat" aria-label="category"><option value="">any category</option></select>
<label>min score <input id="minscore" type="number" step="0.05" size="5" aria-label="minimum score"></label>
<label><input id="explained" type="checkbox"> explained only</label>
<button id="clear-filters" type="button">reset</button>
<span id="count" class="count"></span>
</form>
<table id="features" class="data features"><thead><tr>
<th data-k="id">feature</th><th data-k="source">source</th><th data-k="where">where</th>
<th data-k="explanation">explanation</th><th data-k="classification">class</th><th data-k="category">category</th>
<th data-k="score" class="num">score</th><th data-k="max" class="num">max act</th><th data-k="density" class="num">active</th>
<th data-k="gt_auroc" class="num" title="best ground-truth concept (concepts stage) and its AUROC; click to sort by the AUROC">concept AUROC</th>
</tr></thead><tbody id="rows"></tbody></table>
<script type="application/json" id="index-data">{script_json(data)}</script>"""
    return page("rank1 features", body, "", ["assets/index.js"], "index")
