"""Build the whole report of a run into a local folder: what exists is drawn, the rest listed.

    result = build_report(RunDir("runs/demo"), ReportConfig(), Path("runs/demo/report"))

Layout of the folder:

    index.html            the report: stage status, Table 1, Table 2, Figures 1-3, curves,
                          detection scores, autointerp spend, steering, transcoder adapters
                          (when their stages ran), what is missing and why
    features.html         every feature, searchable and filterable in the page
    features/<source>/<name>.html   one page per feature
    traces/d<doc>.js      tokens of the documents shown as whole traces (shared by pages)
    tables/*.md|csv       Table 1, Table 2, the transcoder tables and the data behind each figure
    figures/*.png         Figure 1-3, SAE, transcoder and training curves, detection scores
    assets/               style.css, index.js, feature.js
    report.json           what was rendered, what is missing, sizes
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rank1_core.config import ReportConfig
from rank1_core.report import activations as act
from rank1_core.report import dashboards as dash
from rank1_core.report import figures as figs
from rank1_core.report import tables as tabs
from rank1_core.report.catalogue import build_catalogue, present, where
from rank1_core.report.loaders import (SOURCES, SPARSE_STORE, TRANSCODER_STAGES, Missing, RunInputs, feature_key,
                                       sparse_index, stage_rows)
from rank1_core.rundir import RunDir, atomic_local_path, code_version, write_text_atomic

CONTEXT_COLUMNS = ["feature", "sign", "rank", "doc_id", "pos", "value", "context_tokens", "context_values",
                   "hit_index"]
DENSE_STORE = {"adapter": ("extract", "activations"), "neuron": ("extract", "neurons")}
PAGE_CHUNK = 4096  # feature pages whose contexts and trace values are read together


@dataclass
class ReportResult:
    out_dir: Path
    rendered: list[str] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    pages: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"rendered": self.rendered, "missing": [{"what": m.what, "why": m.why} for m in self.missing],
                "pages": self.pages, "files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 2)}


class Section:
    def __init__(self, anchor: str, title: str):
        self.anchor, self.title, self.parts = anchor, title, []

    def add(self, html_text: str) -> "Section":
        self.parts.append(html_text)
        return self

    def html(self) -> str:
        return f'<section id="{self.anchor}"><h2>{dash.esc(self.title)}</h2>{"".join(self.parts)}</section>'


def _figure(rel: str, caption: str) -> str:
    return (f'<figure><a href="{dash.esc(rel)}"><img src="{dash.esc(rel)}" alt="{dash.esc(caption)}"></a>'
            f"<figcaption>{dash.esc(caption)}</figcaption></figure>")


def _is_num(v: Any) -> bool:
    try:
        return v is not None and not isinstance(v, str) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def present_str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _tokens(v: Any, n: int = 8) -> str:
    """A list of tokens as text: 'Wait', ' Hmm' (the first n)."""
    if v is None or isinstance(v, (float, str)):
        return "" if v is None or isinstance(v, float) else v
    return ", ".join(repr(str(t)) for t in list(v)[:n])


def _links(files: dict) -> str:
    return '<p class="muted">' + " · ".join(f'<a href="{dash.esc(v)}">{dash.esc(k)}</a>' for k, v in files.items()) + "</p>"


def prompt_copy_warning(extra: dict) -> str:
    """A warning paragraph when autointerp's answers repeat its prompts' wording (the
    explainer model is too weak for the task), else ''."""
    pc = extra.get("prompt_copies") or {}
    expl, total, cats = pc.get("explanations") or {}, pc.get("explained") or {}, pc.get("categories") or {}
    if not expl and not cats:
        return ""
    model = (extra.get("models") or {}).get("explain", "the explainer model")
    parts = [f"{n} of {total.get(s, '?')} {s} explanations" for s, n in expl.items()]
    parts += [f"the categories of group {g} ({', '.join(ids)})" for g, ids in cats.items()]
    return (f'<p class="warning"><b>Warning:</b> {dash.esc("; ".join(parts))} repeat the wording of the prompt '
            f"instead of describing the contexts: {dash.esc(model)} is too weak for the task, and the "
            "explanations, categories and Figures 2-3 below carry no information about the features. Rerun "
            "autointerp with a stronger model (API keys, or <code>autointerp.local_server.model</code>).</p>")


def page_selection(sub: pd.DataFrame, cap: int) -> pd.DataFrame:
    """The `cap` features of one source that get a page: explained ones and the transcoder's
    selected hesitation features first, then the rest, each in catalogue order (a capped
    report never drops a feature autointerp explained in favour of one it did not)."""
    first = sub["explanation"].notna() | sub["explanation_neg"].notna() | sub["hesitation_selected"].eq(True)
    keep = [*sub.index[first.to_numpy()], *sub.index[~first.to_numpy()]][:cap]
    return sub.loc[keep].sort_values("order")


class ReportBuilder:
    def __init__(self, run: RunDir, cfg: ReportConfig, out: Path, log: Callable[[str], None] = print,
                 on_page: Optional[Callable[[int], None]] = None):
        self.run, self.cfg, self.out, self.log = run, cfg, Path(out), log
        self.on_page = on_page or (lambda n: None)
        self.inputs = RunInputs(run)
        self.result = ReportResult(self.out)
        self.sections: list[Section] = []

    # ---- helpers --------------------------------------------------------------------

    def done(self, name: str) -> None:
        self.result.rendered.append(name)

    def _miss(self, what: str, why: str) -> None:
        self.inputs.miss(what, why)

    # ---- tables ---------------------------------------------------------------------

    def tables(self) -> None:
        inp = self.inputs
        tdir = self.out / "tables"
        summary = inp.table("evaluate", "summary.parquet", "Table 1 (recovery)", ["variant", "benchmark", "pass1"],
                            optional=["stderr", "n_problems", "n_samples", "marker_rate", "prompt"])
        sec = Section("table1", "Table 1: recovery of the full fine-tune's gain by the rank-1 LoRA")
        if summary is not None and len(summary):
            t1 = tabs.table1(summary)
            caption = ("Table 1: pass@1 of the base model, the rank-1 LoRA and the full fine-tune; % Recovery = "
                       "(LoRA - base) / (full - base).")
            tsum = self._transcoder_summary("Table 1: transcoder adapters")
            if tsum is not None:
                t1 = tabs.table1_add_transcoder(t1, tsum)
                caption += (" Transcoder adapters: the base model with the transcoder adapters (transcoder_eval); "
                            "% Recovery (transcoder) = (transcoder - base) / (full - base) with this table's base "
                            "and full.")
            disp = tabs.table1_display(t1)
            if any(c.startswith("Answer marker reached") for c in disp.columns):
                caption += (" Answer marker reached: share of the responses to the s1-format prompt that wrote the "
                            "answer marker (the others are graded per evaluate.missing_marker, by default wrong).")
            files = tabs.write_table(t1, tdir, "table1", disp, caption)
            sec.add(dash.html_table(disp)).add(_links(files))
            if "transcoder" in t1.columns:
                note = ("<p class=\"muted\">Transcoder adapters: base model + the transcoder adapters trained to match "
                        "the full fine-tune (stage transcoder_eval, variant <code>transcoder</code>); % Recovery "
                        "(transcoder) uses this table's base and full.")
                if "Transcoder problems" in disp.columns:
                    note += (" transcoder_eval scored another number of problems than evaluate "
                             "(transcoder_eval.limit): see "
                             "<a href=\"#transcoder\">its recovery on the same problems</a>.")
                sec.add(note + "</p>")
                if t1["transcoder"].isna().all():
                    self._miss("Table 1: transcoder adapters", "transcoder_eval/summary.parquet has no variant "
                               "'transcoder'")
            if "full" not in t1.columns or "lora" not in t1.columns or "base" not in t1.columns:
                lacking = [v for v in ("base", "lora", "full") if v not in t1.columns]
                self._miss("Table 1 % recovery", f"evaluate/summary.parquet has no variant(s) {', '.join(lacking)}")
            self.done("table1")
        elif summary is not None:
            self._miss("Table 1 (recovery)", "evaluate/summary.parquet has no rows")
        self.sections.append(sec)

        sec = Section("table2", "Table 2: group ablations (share of the LoRA's recovered gain)")
        t2 = None
        if self.inputs.exists("ablate", "groups.parquet"):
            groups = inp.table("ablate", "groups.parquet", "Table 2 (group ablations)", [], all_columns=True)
            if groups is not None:
                t2 = tabs.table2_from_groups(groups, summary)
                kl_cols = [c for c in ("group", "variant", "modules", "kl_mean", "kl_sem", "n_tokens") if c in groups]
                if "kl_mean" in groups and kl_cols:
                    kl = groups[kl_cols].drop_duplicates()
                    tabs.write_table(kl, tdir, "group_kl")
                    sec.add("<p>KL(group ablated ‖ full adapter) on held-out traces:</p>" + dash.html_table(kl))
        if t2 is not None and len(t2):
            disp = tabs.table2_display(t2)
            files = tabs.write_table(t2, tdir, "table2", disp, "Table 2: absolute scores with (x - b)/(l - b) in "
                                     "parentheses, b the base model and l the full rank-1 LoRA.")
            sec.add(dash.html_table(disp)).add(_links(files))
            self.done("table2")
        elif inp.exists("ablate", "table2.csv"):
            t2 = pd.read_csv(io.StringIO(inp.text("ablate", "table2.csv")))
            files = tabs.write_table(t2, tdir, "table2")
            sec.add(dash.html_table(t2)).add(_links(files))
            self.done("table2")
        elif not sec.parts:
            st = inp.need("ablate", "Table 2 (group ablations)")
            if st is not None:
                self._miss("Table 2 (group ablations)", "ablate has neither groups.parquet with benchmark scores "
                           "(benchmark, pass1) nor table2.csv")
        self.sections.append(sec)

    # ---- figure 1 -------------------------------------------------------------------

    def figure1(self) -> None:
        inp = self.inputs
        sec = Section("figure1", "Figure 1: effect of ablating LoRA components")
        kl_layers = inp.table("ablate", "kl_layers.parquet", "Figure 1a (KL by layer)", ["layer", "kl_mean"],
                              optional=["kl_sem", "n_tokens"])
        kl_comp = inp.table("ablate", "kl_components.parquet", "Figure 1b (KL per component)",
                            ["layer", "module", "kl_mean"], optional=["column", "kind", "kl_sem", "n_tokens"])
        kl_layers = kl_layers if kl_layers is not None and len(kl_layers) else None
        kl_comp = kl_comp if kl_comp is not None and len(kl_comp) else None
        if kl_layers is None and kl_comp is None:
            self.sections.append(sec)
            return
        figs.figure1(kl_layers, kl_comp, self.out / "figures" / "figure1.png", self.cfg.figure_dpi)
        sec.add(_figure("figures/figure1.png", "(a) KL(ablated ‖ full adapter) with every adapter component of a "
                        "layer zeroed; (b) each component zeroed alone, modules × layers."))
        tdir = self.out / "tables"
        if kl_layers is not None:
            tabs.write_table(kl_layers.sort_values("layer"), tdir, "figure1a_kl_layers")
        if kl_comp is not None:
            tabs.write_table(kl_comp, tdir, "figure1b_kl_components")
            top = tabs.top_components(kl_comp)
            sec.add("<p>Components with the largest KL when ablated alone:</p>" + dash.html_table(top))
            if "kind" in kl_comp:
                by = kl_comp.groupby("kind")["kl_mean"].agg(["mean", "median", "count"]).reset_index()
                sec.add("<p>By kind:</p>" + dash.html_table(by))
        self.done("figure1")
        self.sections.append(sec)

    # ---- ground truth -------------------------------------------------------------------

    def ground_truth(self) -> None:
        """The concepts stage: shares of clean / broad / unmatched features per source with
        intervals and controls, the best feature per concept, explanation accuracy."""
        inp = self.inputs
        sec = Section("groundtruth", "Ground truth: what features detect, measured against planted concepts")
        if not inp.started("concepts"):  # a run that never ran the stage: nothing to say about it
            return
        summary = inp.table("concepts", "summary.parquet", "Ground truth (shares of clean features)",
                            ["source", "labels", "n_features", "clean", "broad", "unmatched"], all_columns=True)
        if summary is None or summary.empty:
            self.sections.append(sec)
            return
        r0 = summary.iloc[0]
        figs.ground_truth(summary, self.out / "figures" / "ground_truth.png", self.cfg.figure_dpi)
        sec.add(f"<p>Every feature is scored against every concept (AUROC of its activation over all tokens; "
                f"precision of its top contexts). <b>Clean</b>: best concept AUROC &ge; {r0['clean_auroc']:g} and "
                f"top-k precision &ge; {r0['clean_precision']:g}; <b>broad</b>: AUROC &ge; {r0['broad_auroc']:g}; "
                "else unmatched. Controls: random directions in the adapter's activation space, and every source "
                "against shuffled labels (chance). Intervals: 95% bootstrap over documents.</p>")
        sec.add(_figure("figures/ground_truth.png", "Share of features per source whose best concept is clean or "
                        "broad; hatched: the same features against shuffled labels."))
        show = summary.copy()
        for c in ("clean", "broad", "unmatched"):
            show[c] = [f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else "")
                       for v, lo, hi in zip(show[c], show[f"{c}_lo"], show[f"{c}_hi"])]
        sec.add(dash.html_table(show[["source", "labels", "n_features", "clean", "broad", "unmatched",
                                      "max_auroc_bound"]]))
        tdir = self.out / "tables"
        tabs.write_table(summary, tdir, "ground_truth_summary")
        best = inp.table("concepts", "best.parquet", "Ground truth (best feature per concept)",
                         ["concept", "source", "feature", "auroc"], all_columns=True)
        if best is not None and len(best):
            wide = best.pivot_table(index="concept", columns="source", values="auroc", sort=False)
            ctrl = best.groupby("concept", sort=False).agg(random=("random_auroc", "first"),
                                                           shuffled=("shuffled_auroc", "max"))
            table = wide.join(ctrl).reset_index().round(3)
            sec.add("<p>Best feature per concept and source (AUROC), beside the best random direction and the "
                    "best feature against shuffled labels:</p>" + dash.html_table(table))
            tabs.write_table(best, tdir, "ground_truth_best")
        if inp.done("concepts") and inp.stage("concepts").exists("explanations.parquet"):
            ex = inp.table("concepts", "explanations.parquet", "explanation accuracy", ["model", "names_concept",
                                                                                       "copied"])
            if ex is not None and len(ex):
                acc = ex.groupby("model").agg(clean_features_explained=("names_concept", "size"),
                                              name_their_concept=("names_concept", "sum"),
                                              copied_the_prompt=("copied", "sum")).reset_index()
                acc["accuracy"] = (acc["name_their_concept"] / acc["clean_features_explained"]).round(3)
                sec.add("<p>Explanations checked against the truth: of the features with a clean best concept, "
                        "how many explanations name that concept (keyword lists per concept, "
                        "<code>rank1_core.concepts.KEYWORDS</code>):</p>" + dash.html_table(acc))
        self.done("ground_truth")
        self.sections.append(sec)

    # ---- steering -----------------------------------------------------------------------

    def steering(self) -> None:
        """The steer stage's curves (one figure per steered feature, copied next to the report)
        and its numbers; each steered feature's dashboard page links its figure."""
        self.steer_figures: dict[tuple[str, str], str] = {}
        inp = self.inputs
        if inp.stage_state("steer") == "missing":
            return  # not every run steers (it is not in every config's stages): nothing to say
        sec = Section("steering", "Steering: measures vs alpha per steered feature")
        targets = inp.table("steer", "targets.parquet", "steering curves", ["target", "source", "figure"],
                            optional=["kind", "chosen_by", "typical", "n_contexts", "n_hesitation"])
        if targets is None or not len(targets):
            return
        st = inp.stage("steer")
        fdir = self.out / "figures" / "steer"
        for t in targets.itertuples():
            rel = str(t.figure)
            if not st.exists(rel):
                self._miss(f"steering figure of {t.source} {t.target}", f"{st.uri_of(rel)} does not exist")
                continue
            fdir.mkdir(parents=True, exist_ok=True)
            name = Path(rel).name
            with st.fs.open_input_stream(st.path(rel)) as f, atomic_local_path(fdir / name) as tmp:
                tmp.write_bytes(f.read())
            self.steer_figures[(str(t.source), str(t.target))] = f"figures/steer/{name}"
            how = f" (chosen: {t.chosen_by})" if "chosen_by" in targets else ""
            sec.add(_figure(f"figures/steer/{name}", f"{t.source} {t.target}{how}: hesitation rate, response "
                            "length, accuracy and KL from the unsteered model vs alpha; band: random directions "
                            "of equal norm."))
        results = inp.table("steer", "results.parquet", "steering results table", [], all_columns=True)
        if results is not None and len(results):
            tabs.write_table(results, self.out / "tables", "steering_results")
            sec.add(_links({"steering results (CSV)": "tables/steering_results.csv",
                            "(Markdown)": "tables/steering_results.md"}))
        self.done("steering")
        self.sections.append(sec)

    # ---- transcoder adapters -------------------------------------------------------------

    def _transcoder_run(self) -> bool:
        """Did this run start any transcoder stage? (Never started: the report says nothing.)"""
        return any(self.inputs.started(s) for s in TRANSCODER_STAGES)

    def _transcoder_summary(self, what: str) -> Optional[pd.DataFrame]:
        """transcoder_eval/summary.parquet (None, with a reason for `what`, when it cannot be read;
        None and no reason when the run has no transcoder stage at all)."""
        if not self._transcoder_run():
            return None
        t = self.inputs.table("transcoder_eval", "summary.parquet", what, ["variant", "benchmark", "pass1"],
                              all_columns=True)
        if t is not None and not len(t):
            self._miss(what, "transcoder_eval/summary.parquet has no rows")
            return None
        return t

    def transcoder(self) -> None:
        """Faithfulness of the transcoder adapters to their target (table), the explained
        variance of each MLP's difference (figure + table), the training curves, the gain
        recovered on transcoder_eval's own problems, the hesitation ablation table and the
        hesitation features with links to their pages. Runs after the feature pages."""
        inp = self.inputs
        if not self._transcoder_run():
            return
        sec = Section("transcoder", "Transcoder adapters: a second lens on what fine-tuning changed")
        tdir, fdir = self.out / "tables", self.out / "figures"
        sec.add("<p>A sparse branch on every MLP of the frozen base model, trained so that base + adapters "
                "matches the fine-tuned target (stage <code>transcoder</code>); its latents are features like "
                "the SAE's (<code>transcoder_extract</code>), benchmarked with hesitation features ablated "
                "(<code>transcoder_eval</code>).</p>")

        # faithfulness.json (or the manifest's copy of it)
        what = "transcoder faithfulness"
        faith = None
        if inp.exists("transcoder", "faithfulness.json"):
            faith = inp.json("transcoder", "faithfulness.json", what)
        elif inp.done("transcoder") and isinstance(inp.manifest("transcoder").get("extra", {}).get("faithfulness"), dict):
            faith = inp.manifest("transcoder")["extra"]["faithfulness"]
        else:
            faith = inp.json("transcoder", "faithfulness.json", what)
        if isinstance(faith, dict):
            ft = tabs.faithfulness_table(faith)
            if len(ft):
                disp = tabs.faithfulness_display(ft)
                files = tabs.write_table(ft, tdir, "transcoder_faithfulness", disp,
                                         "Transcoder adapters: faithfulness to the target on held-out traces.")
                sec.add("<h3>Faithfulness to the target (held-out traces)</h3>").add(dash.html_table(disp))
                sec.add(_links(files))
                self.done("transcoder_faithfulness")
            else:
                self._miss(what, "transcoder/faithfulness.json has none of the keys kl_base, kl_adapted, ce_*, "
                           "top1_agree_*, kl_closed, fve_difference_mean, l0_per_layer, live_latents")
        elif faith is not None:
            self._miss(what, "transcoder/faithfulness.json is not a JSON object")

        # per-layer explained variance of the MLP difference
        layers = inp.table("transcoder", "faithfulness_layers.parquet", "transcoder per-layer FVE (figure and table)",
                           ["layer", "fve_difference"], optional=["tokens", "fvu_difference", "diff_norm",
                                                                 "adapter_norm", "l0", "live_latents", "d_latent"])
        if layers is not None and len(layers):
            layers = layers.sort_values("layer").reset_index(drop=True)
            figs.transcoder_layers(layers, fdir / "transcoder_layers.png", self.cfg.figure_dpi)
            files = tabs.write_table(layers, tdir, "transcoder_layers", caption="Transcoder adapters per layer: "
                                     "explained variance of target_mlp(x) - base_mlp(x) (fve_difference), mean "
                                     "norms of that difference and of the adapter's output, L0, live latents.")
            sec.add("<h3>Explained variance of each MLP's difference</h3>")
            sec.add(_figure("figures/transcoder_layers.png", "(a) per layer: the share of the variance of "
                            "target_mlp(x) - base_mlp(x) that the layer's adapter reproduces; (b) mean norms of "
                            "the difference and of the adapter output, and L0."))
            sec.add(dash.html_table(layers.round(4))).add(_links(files))
            self.done("transcoder_layers")
        elif layers is not None:
            self._miss("transcoder per-layer FVE (figure and table)", "transcoder/faithfulness_layers.parquet has no rows")

        # training curves (when the stage left its metrics)
        if inp.exists("transcoder", "metrics.parquet"):
            m = inp.table("transcoder", "metrics.parquet", "transcoder training curves", [], all_columns=True)
            if m is not None and len(m):
                x = "step" if "step" in m else m.columns[0]
                if figs.curves(m, fdir / "transcoder_curves.png", "Transcoder adapters: training",
                               figs.TRANSCODER_CURVES, x=x, dpi=self.cfg.figure_dpi) is not None:
                    sec.add(_figure("figures/transcoder_curves.png", "transcoder training per optimizer step: loss, "
                                    "KL to the target, mean FVU of the MLP differences, FVE, sparsity term, L0, "
                                    "learning rate, throughput"))
                    self.done("transcoder_curves")
                else:
                    self._miss("transcoder training curves", "transcoder/metrics.parquet has none of the columns "
                               + ", ".join(c for c, _ in figs.TRANSCODER_CURVES))

        # benchmark gain recovered on transcoder_eval's own problems
        if inp.exists("transcoder_eval", "recovery.csv"):
            try:
                rec = pd.read_csv(io.StringIO(inp.text("transcoder_eval", "recovery.csv")))
            except (ValueError, pd.errors.ParserError) as e:
                rec = None
                self._miss("transcoder recovered gain", f"transcoder_eval/recovery.csv is not readable CSV ({e})")
            if rec is not None and len(rec):
                files = tabs.write_table(rec, tdir, "transcoder_recovery", caption="Transcoder adapters: pass@1 of "
                                         "base, target and base + adapters on transcoder_eval's problems; "
                                         "recovered_pct = (transcoder - base) / (target - base).")
                sec.add("<h3>Benchmark gain recovered (transcoder_eval's problems)</h3>")
                sec.add(dash.html_table(rec)).add(_links(files))
                self.done("transcoder_recovery")

        # the hesitation ablation
        what = "transcoder hesitation ablation table"
        tsum = self._transcoder_summary(what)
        if tsum is not None:
            lacking = [c for c in tabs.HESITATION_REQUIRED if c not in tsum.columns]
            if lacking:
                self._miss(what, f"transcoder_eval/summary.parquet lacks column(s) {', '.join(lacking)} "
                           f"(has {', '.join(map(str, tsum.columns))})")
            else:
                h = tabs.hesitation_table(tsum)
                disp = tabs.hesitation_display(h)
                files = tabs.write_table(h, tdir, "transcoder_hesitation", disp, "Transcoder adapters with their "
                                         "hesitation features ablated, against a control with as many random live "
                                         "features ablated; in parentheses the change from the unablated adapters.")
                sec.add("<h3>Hesitation features ablated</h3><p>Each condition on the same problems: the adapters as "
                        "trained, their hesitation features zeroed during generation, and as many random live "
                        "features zeroed (control); in parentheses the change from the adapters.</p>")
                sec.add(dash.html_table(disp)).add(_links(files))
                if not set(tsum["variant"].astype(str)) & {"transcoder_no_hesitation", "transcoder_random_ablated"}:
                    sec.add('<p class="muted">transcoder_extract found no hesitation feature: only the adapters '
                            "as trained were benchmarked.</p>")
                self.done("transcoder_hesitation")

        # the hesitation features, linked to their pages
        if inp.started("transcoder_extract") or inp.done("transcoder"):
            hf = inp.table("transcoder_extract", "hesitation_features.parquet", "transcoder hesitation feature list",
                           ["feature"], optional=["name", "layer", "latent", "contexts", "matches", "share",
                                                  "selected", "top_tokens", "next_tokens"])
            if hf is not None:
                sec.add(self._hesitation_features_html(hf))
                self.done("transcoder_hesitation_features")

        n = self.result.pages.get("transcoder", 0)
        if n:
            sec.add(f'<p><a href="features.html#source=transcoder">Browse the {n:,} transcoder feature pages</a> '
                    "(hesitation features first, then explained ones, then by index).</p>")
        self.sections.append(sec)

    def _hesitation_features_html(self, hf: pd.DataFrame, limit: int = 50) -> str:
        if not len(hf):
            return ('<h3>Hesitation features</h3><p class="muted">transcoder_extract found no feature with a '
                    "hesitation word among its top contexts.</p>")
        hf = hf.copy()
        hf["selected"] = hf["selected"].fillna(False).astype(bool) if "selected" in hf else False
        hf = hf.sort_values("selected", ascending=False, kind="stable")
        n_sel, total = int(hf["selected"].sum()), len(hf)
        hf = hf.head(limit)
        expl = {}
        cat = getattr(self, "catalogue", None)
        if cat is not None and len(cat):
            sub = cat[cat["source"] == "transcoder"]
            expl = dict(zip(sub["key"], sub["explanation"]))
        pages = getattr(self, "page_names", {})
        head = ["feature", "layer", "latent", "hesitation contexts", "share", "selected", "top tokens",
                "next tokens", "explanation"]
        trs = []
        for r in hf.to_dict("records"):
            key = feature_key("transcoder", r.get("name") if present_str(r.get("name")) else int(r["feature"]))
            href = pages.get(("transcoder", key))
            fid = f'<a href="{dash.esc(href)}">{dash.esc(key)}</a>' if href else dash.esc(key)
            m, c = r.get("matches"), r.get("contexts")
            ctx = f"{int(m)}/{int(c)}" if _is_num(m) and _is_num(c) else ""
            cells = [fid] + [dash.esc(x) for x in (
                "" if not _is_num(r.get("layer")) else int(r["layer"]),
                "" if not _is_num(r.get("latent")) else int(r["latent"]), ctx,
                "" if not _is_num(r.get("share")) else f"{float(r['share']):.2f}",
                "yes" if r["selected"] else "", _tokens(r.get("top_tokens")), _tokens(r.get("next_tokens")),
                expl.get(key) or "")]
            trs.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        more = f" (the first {limit} of {total} listed)" if total > limit else ""
        return (f"<h3>Hesitation features</h3><p>{n_sel} selected (ablated by transcoder_eval){dash.esc(more)}: "
                "features whose top contexts sit at a hesitation word (or right before one).</p>"
                '<table class="data"><thead><tr>' + "".join(f"<th>{dash.esc(h)}</th>" for h in head)
                + "</tr></thead><tbody>" + "".join(trs) + "</tbody></table>")

    # ---- curves ------------------------------------------------------------------------

    def curves(self) -> None:
        inp = self.inputs
        sec = Section("training", "Training curves")
        runs = {}
        for stage, label in (("train", "rank-1 LoRA"), ("train_full", "full fine-tune")):
            if inp.done(stage):
                m = inp.table(stage, "metrics.parquet", f"{label} training curve", [], all_columns=True)
                if m is not None and len(m):
                    runs[label] = m
            else:
                inp.need(stage, f"{label} training curve")
        if runs:
            p = figs.curves(pd.DataFrame(), self.out / "figures" / "training_curves.png", "Fine-tuning",
                            figs.TRAIN_CURVES, dpi=self.cfg.figure_dpi, others=runs)
            if p is not None:
                sec.add(_figure("figures/training_curves.png", "loss, held-out loss, learning rate and "
                                "throughput per optimizer step: " + ", ".join(runs)))
                self.done("training_curves")
        self.sections.append(sec)

        sec = Section("sae", "SAE")
        m = inp.table("sae", "metrics.parquet", "SAE training curves", [], all_columns=True)
        summ = inp.manifest("sae").get("extra", {}) if inp.done("sae") else {}
        if not summ and inp.exists("sae", "summary.json"):
            summ = inp.json("sae", "summary.json", "SAE summary") or {}
        keys = [k for k in ("fvu", "fve", "nmse", "l0", "live_features", "latents", "dead_fraction", "tokens",
                            "train_steps", "k") if k in summ]
        if keys:
            sec.add(dash.html_table(pd.DataFrame([{k: summ[k] for k in keys}])))
        if m is not None and len(m):
            x = "step" if "step" in m else m.columns[0]
            if figs.curves(m, self.out / "figures" / "sae_curves.png", "SAE training", x=x,
                           dpi=self.cfg.figure_dpi) is not None:
                sec.add(_figure("figures/sae_curves.png", "SAE training: loss, normalised MSE, AuxK loss, fraction "
                                "of variance unexplained, L0, dead latents, learning rate"))
                self.done("sae_curves")
            else:
                self._miss("SAE training curves", "sae/metrics.parquet has none of the columns "
                           + ", ".join(c for c, _ in figs.SAE_CURVES))
        self.sections.append(sec)

    # ---- features ------------------------------------------------------------------

    def features(self) -> None:
        inp, cfg = self.inputs, self.cfg
        cat = build_catalogue(inp, cfg.sources)
        self.catalogue = cat
        self.explanations = cat.attrs.get("explanations")  # one row per explained feature and sign
        if cat.empty:
            self._miss("feature dashboards", "no stage has listed any feature yet (extract, sae, topk, autointerp)")
            self._figure2(self.explanations)
            self._figure3(cat, None)
            self._scores(self.explanations)
            return
        if not inp.done("topk"):
            inp.need("topk", "top-64 contexts on feature pages")
        sample: dict[str, dict] = {}
        for src in [s for s in SOURCES if (cat["source"] == s).any()]:
            sub = cat[cat["source"] == src]
            if cfg.max_features:
                sub = page_selection(sub, cfg.max_features)
            sample[src] = self._histograms(src, sub)
            self._pages(src, sub, sample[src])
        self._feature_index(cat)
        self._figure2(self.explanations)
        self._figure3(cat, sample.get("sae"))
        self._scores(self.explanations)

    def _histograms(self, src: str, sub: pd.DataFrame) -> dict:
        inp, cfg = self.inputs, self.cfg
        keys = sub["key"].tolist()
        lo = pd.to_numeric(sub["min"], errors="coerce").to_numpy(dtype=np.float64)
        hi = pd.to_numeric(sub["max"], errors="coerce").to_numpy(dtype=np.float64)
        if src in DENSE_STORE:
            stage, rel = DENSE_STORE[src]
            schema = inp.parts_schema(stage, rel)
            if schema is None:
                inp.need(stage, f"activation histograms ({src})") if not inp.done(stage) else \
                    self._miss(f"activation histograms ({src})", f"{stage}/{rel}/ has no Parquet files")
                return {}
            cols = [k for k in keys if k in schema.names]
            if not cols:
                self._miss(f"activation histograms ({src})", f"{stage}/{rel} has none of the feature columns")
                return {}
            idx = [keys.index(c) for c in cols]
            t0 = time.perf_counter()
            h, n = act.dense_histograms(inp, stage, rel, cols, lo[idx], hi[idx], cfg.histogram_bins, cfg.sample_tokens)
            self.log(f"[report] {src}: histograms of {len(cols)} features over {n:,} tokens "
                     f"({time.perf_counter() - t0:.1f}s)")
            return {"hist": h, "row": {c: i for i, c in enumerate(cols)}, "tokens": n}
        stage, rel = SPARSE_STORE[src]
        what = "SAE activation histograms and Figure 3" if src == "sae" else f"activation histograms ({src})"
        if not inp.done(stage) or not inp.part_files(stage, rel):
            inp.need(stage, what) if not inp.done(stage) else \
                self._miss(what, f"{stage}/{rel}/ has no Parquet files")
            return {}
        index = [sparse_index(k) for k in keys]
        ok = [i for i, x in enumerate(index) if x is not None]
        lo_s = np.minimum(np.nan_to_num(lo[ok], nan=np.nan), 0.0) if len(ok) else lo[ok]
        t0 = time.perf_counter()
        s = act.sae_sample(inp, [index[i] for i in ok], lo_s, hi[ok], cfg.histogram_bins, cfg.sample_tokens,
                           stage, rel)
        self.log(f"[report] {src}: histograms and sums of {len(ok)} features over {s.tokens:,} tokens "
                 f"({time.perf_counter() - t0:.1f}s)")
        return {"hist": s.hist, "row": {keys[i]: j for j, i in enumerate(ok)}, "tokens": s.tokens,
                "sums": {keys[i]: float(s.sums[j]) for j, i in enumerate(ok)},
                "fired": {keys[i]: int(s.fired[j]) for j, i in enumerate(ok)}}

    def _contexts(self, src: str, keys: set[str]) -> dict[str, dict[str, list]]:
        """feature key -> {'pos': [...], 'neg': [...]} rows (dicts) ordered by rank."""
        inp = self.inputs
        if not inp.exists("topk", "contexts.parquet"):
            if inp.done("topk"):
                self._miss("top contexts on feature pages", "topk/contexts.parquet does not exist")
            return {}
        schema = inp.schema("topk", "contexts.parquet")
        lacking = [c for c in ["source", *CONTEXT_COLUMNS] if c not in schema.names]
        if lacking:
            self._miss("top contexts on feature pages", f"topk/contexts.parquet lacks column(s) {', '.join(lacking)}")
            return {}
        st = inp.stage("topk")
        # only the rows of the wanted features (a sparse source may have tens of thousands; its
        # features may be spelled as the index alone by an older topk)
        raw = set(keys) | ({str(sparse_index(k)) for k in keys if sparse_index(k) is not None}
                           if src in SPARSE_STORE else set())
        if not raw:
            return {}
        with st.fs.open_input_file(st.path("contexts.parquet")) as f:
            t = pq.read_table(f, columns=CONTEXT_COLUMNS, filters=[("source", "==", src),
                                                                   ("feature", "in", sorted(raw))])
        if t.num_rows == 0:
            return {}
        fk = [feature_key(src, x) for x in t.column("feature").to_pylist()]
        t = t.append_column("_key", pa.array(fk, pa.string()))
        t = t.filter(pc.is_in(t.column("_key"), value_set=pa.array(sorted(keys), pa.string())))
        t = t.sort_by([("_key", "ascending"), ("sign", "ascending"), ("rank", "ascending")])
        keys_col = t.column("_key").to_numpy(zero_copy_only=False)
        out: dict[str, dict[str, list]] = {}
        if len(keys_col) == 0:
            return out
        bounds = np.flatnonzero(keys_col[1:] != keys_col[:-1]) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(keys_col)]])
        limit = self.cfg.contexts
        for s, e in zip(starts, ends):
            rows = t.slice(int(s), int(e - s)).drop_columns(["_key", "feature"]).to_pylist()
            d: dict[str, list] = {"pos": [], "neg": []}
            for r in rows:
                sign = "neg" if str(r["sign"]).startswith("neg") or str(r["sign"]) == "-" else "pos"
                if len(d[sign]) < limit:
                    d[sign].append(r)
            out[str(keys_col[s])] = d
        return out

    def _trace_windows(self, src: str, ctx: dict) -> dict[str, act.Window]:
        inp = self.inputs
        hits = {}
        for k, d in ctx.items():
            top = (d["pos"] or d["neg"])
            if top:
                hits[k] = (int(top[0]["doc_id"]), int(top[0]["pos"]))
        if not hits:
            return {}
        if not inp.done("extract") or inp.parts_schema("extract", "tokens") is None:
            inp.need("extract", "whole traces on feature pages") if not inp.done("extract") else \
                self._miss("whole traces on feature pages", "extract/tokens/ has no Parquet files")
            return {}
        docs = {d for d, _ in hits.values()}
        missing_docs = docs - set(self.doc_tokens)
        if missing_docs:
            self.doc_tokens.update(act.read_doc_tokens(inp, missing_docs))
        out = {}
        for k, (doc, pos) in hits.items():
            toks = self.doc_tokens.get(doc)
            if toks:
                out[k] = act.window_for(doc, min(pos, len(toks) - 1), len(toks), self.cfg.trace_max_tokens)
        return out

    def _trace_values(self, src: str, windows: dict[str, act.Window]) -> dict[str, np.ndarray]:
        if not windows:
            return {}
        if src in DENSE_STORE:
            stage, rel = DENSE_STORE[src]
            return act.dense_window_values(self.inputs, stage, rel, windows)
        stage, rel = SPARSE_STORE[src]
        return act.sae_window_values(self.inputs, windows, {k: sparse_index(k) for k in windows
                                                            if sparse_index(k) is not None}, stage, rel)

    def _pages(self, src: str, sub: pd.DataFrame, sample: dict) -> None:
        """One page per feature of `sub`, PAGE_CHUNK features at a time (their contexts and
        trace values read per chunk, so a source of tens of thousands of features never has
        all its contexts in memory)."""
        inp, cfg = self.inputs, self.cfg
        keys = sub["key"].tolist()
        if not hasattr(self, "doc_tokens"):
            self.doc_tokens: dict[int, list[str]] = {}
            self.trace_ranges: dict[int, list[int]] = {}
        pdir = self.out / "features" / src
        pdir.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        names = [dash.safe_name(k, taken) for k in keys]
        self.page_names = getattr(self, "page_names", {})
        for k, n in zip(keys, names):
            self.page_names[(src, k)] = f"features/{src}/{n}.html"
        hist = sample.get("hist")
        records = sub.to_dict("records")
        cb, ca = cfg.context_before, cfg.context_after
        n_ctx = n_win = 0
        ctx: dict = {}
        windows: dict = {}
        tvals: dict = {}
        for i, row in enumerate(records):
            if i % PAGE_CHUNK == 0:
                chunk = set(keys[i:i + PAGE_CHUNK])
                ctx = self._contexts(src, chunk) if inp.done("topk") else {}
                windows = self._trace_windows(src, ctx)
                tvals = self._trace_values(src, windows)
                for w in windows.values():
                    r = self.trace_ranges.setdefault(w.doc, [w.start, w.end])
                    r[0], r[1] = min(r[0], w.start), max(r[1], w.end)
                n_ctx, n_win = n_ctx + len(ctx), n_win + len(windows)
            k = row["key"]
            row = {c: (v if present(v) else None) for c, v in row.items()}
            row["where"] = where(row)
            fig = getattr(self, "steer_figures", {}).get((src, k))
            row["steer_figure"] = f"../../{fig}" if fig else None
            vocab: dict[str, int] = {}
            maxpos = maxneg = 0.0
            sides = {}
            for sign in ("pos", "neg"):
                out = []
                for r in ctx.get(k, {}).get(sign, []):
                    toks, vals, hit = list(r["context_tokens"] or []), list(r["context_values"] or []), r["hit_index"]
                    hit = int(hit) if hit is not None else 0
                    lo = 0 if cb is None else max(0, hit - cb)
                    hi_ = len(toks) if ca is None else min(len(toks), hit + ca + 1)
                    toks, vals = toks[lo:hi_], [0.0 if v is None else v for v in vals[lo:hi_]]
                    ids = [vocab.setdefault("" if t is None else str(t), len(vocab)) for t in toks]
                    for v in [*vals, float(r["value"] or 0.0)]:
                        if v > maxpos:
                            maxpos = v
                        elif -v > maxneg:
                            maxneg = -v
                    out.append([int(r["doc_id"]), int(r["pos"]), dash.r3(r["value"]), hit - lo,
                                int(r["pos"]) - (hit - lo), ids, dash.r3_list(vals)])
                sides[sign] = out
            trace = None
            if k in windows and k in tvals:
                w = windows[k]
                v = tvals[k]
                if len(v):
                    maxpos, maxneg = max(maxpos, float(v.max())), max(maxneg, float(-v.min()))
                trace = {"doc": w.doc, "start": w.start, "end": w.end, "total": w.total, "hit": w.hit,
                         "vals": dash.r3_list(v)}
            data = {"id": k, "source": src, "maxpos": dash.r3(maxpos) or 0, "maxneg": dash.r3(maxneg) or 0,
                    "maxabs": dash.r3(max(maxpos, maxneg)) or 0, "toks": list(vocab),
                    "pos": sides["pos"], "neg": sides["neg"], "trace": trace, "hist_tokens": sample.get("tokens", 0)}
            if hist is not None and k in sample["row"]:
                j = sample["row"][k]
                hist_html = dash.histogram_svg(hist.counts[j], hist.edges(j), f"activation histogram of {k}")
            else:
                hist_html = ('<p class="muted">no activation sample (' + dash.esc(
                    "/".join(DENSE_STORE.get(src) or SPARSE_STORE.get(src) or ("extract",))) + " output missing)</p>")
            nav = {"prev": f"{names[i - 1]}.html" if i > 0 else None,
                   "next": f"{names[i + 1]}.html" if i + 1 < len(names) else None}
            script = f"traces/d{trace['doc']}.js" if trace else None
            write_text_atomic(pdir / f"{names[i]}.html", dash.feature_page(row, data, hist_html, nav, script))
            self.on_page(1)
        if inp.done("topk") and not n_ctx and records:
            self._miss(f"top contexts of {src} features", f"topk/contexts.parquet has none for source '{src}'"
                       + (f" (topk ran before {SPARSE_STORE[src][0]} finished? rerun topk)"
                          if src in SPARSE_STORE else ""))
        self.result.pages[src] = len(records)
        self.log(f"[report] {src}: {len(records)} feature pages ({n_ctx} with contexts, {n_win} with traces)")

    def _write_traces(self) -> None:
        tdir = self.out / "traces"
        for doc, (s, e) in getattr(self, "trace_ranges", {}).items():
            tdir.mkdir(parents=True, exist_ok=True)
            toks = self.doc_tokens.get(doc, [])[s:e]
            write_text_atomic(tdir / f"d{doc}.js", dash.trace_file(doc, s, toks))

    def _feature_index(self, cat: pd.DataFrame) -> None:
        cols = ["id", "source", "where", "explanation", "classification", "category", "score", "max", "density",
                "href", "order", "explanation_neg", "gt_concept", "gt_sign", "gt_auroc"]
        rows = []
        for r in cat.to_dict("records"):
            r = {c: (v if present(v) else None) for c, v in r.items()}
            href = getattr(self, "page_names", {}).get((r["source"], r["key"]))
            density = r.get("frac_active") if r.get("frac_active") is not None else r.get("freq")
            cls = None if r.get("classification") is None else int(r["classification"])
            rows.append([r["key"], r["source"], where(r), r.get("explanation"), cls,
                         r.get("category_name"), dash.r3(r.get("score")), dash.r3(r.get("max")), dash.r3(density),
                         href, int(r["order"]), r.get("explanation_neg") if r.get("sign") != "neg" else None,
                         r.get("gt_concept"), r.get("gt_sign"), dash.r3(r.get("gt_auroc"))])
        write_text_atomic(self.out / "features.html", dash.feature_index_page(rows, cols, self.run.uri))
        self.done("features_index")

    def _figure2(self, cat: pd.DataFrame) -> None:
        """`cat`: one row per explanation (feature and sign), as autointerp classified them."""
        sec = Section("figure2", "Figure 2: monosemanticity and categories, LoRA components vs MLP neurons")
        explained = cat[cat["explanation"].notna()]
        if explained.empty:
            if self.inputs.done("autointerp"):
                self._miss("Figure 2", "autointerp/explanations.parquet has no explanation")
            else:
                self.inputs.need("autointerp", "Figure 2")
            self.sections.append(sec)
            return
        srcs = [s for s in SOURCES if (explained["source"] == s).any()]
        cls = figs.classification_shares(cat, srcs)
        cats = figs.category_shares(cat, [s for s in srcs if s in ("adapter", "neuron")] or srcs)
        figs.figure2(cls, cats, self.out / "figures" / "figure2.png", self.cfg.figure_dpi)
        tabs.write_table(cls, self.out / "tables", "figure2_classification")
        tabs.write_table(cats, self.out / "tables", "figure2_categories")
        sec.add(_figure("figures/figure2.png", "(left) share of explanations (one per feature and sign) the LLM "
                        "classified clear, broad or polysemantic; (right) share of categorised explanations per "
                        "category."))
        if "neuron" not in srcs:
            self._miss("Figure 2 baseline (MLP neurons)", "no neuron was explained (extract.mlp_neurons = 0, or "
                       "autointerp skipped the neuron source)")
        piv = cls.pivot_table(index="source", columns="label", values="share_pct", aggfunc="sum").reset_index()
        sec.add(dash.html_table(piv.round(1)))
        self.done("figure2")
        self.sections.append(sec)

    def _figure3(self, cat: pd.DataFrame, sample: Optional[dict]) -> None:
        sec = Section("figure3", "Figure 3: category activation densities of SAE features")
        sae = cat[cat["source"] == "sae"]
        if sae.empty:
            self.inputs.need("sae", "Figure 3")
            if self.inputs.done("sae"):
                self._miss("Figure 3", "the SAE has no live feature")
        elif not sample or "sums" not in sample:
            pass  # the reason was recorded by _histograms
        elif sae["category_name"].isna().all():
            if self.inputs.done("autointerp"):
                self._miss("Figure 3", "no SAE feature has a category in autointerp/explanations.parquet")
            else:
                self.inputs.need("autointerp", "Figure 3")
        else:
            d = sae[["key", "category_name"]].dropna()
            d = d.assign(sum=[sample["sums"].get(k, 0.0) for k in d["key"]])
            g = d.groupby("category_name").agg(activation_sum=("sum", "sum"), features=("key", "size")).reset_index()
            total = g["activation_sum"].sum()
            g["density_pct"] = 100 * g["activation_sum"] / total if total > 0 else 0.0
            g = g.rename(columns={"category_name": "category"}).sort_values("density_pct", ascending=False)
            figs.figure3(g, self.out / "figures" / "figure3.png", self.cfg.figure_dpi)
            tabs.write_table(g, self.out / "tables", "figure3_densities")
            sec.add(_figure("figures/figure3.png", f"normalised sum of SAE feature activations within each category "
                            f"over {sample['tokens']:,} tokens ({len(d)} categorised live features)."))
            sec.add(dash.html_table(g.round(3)))
            self.done("figure3")
        self.sections.append(sec)

    def _scores(self, cat: pd.DataFrame) -> None:
        sec = Section("autointerp", "Autointerpretation")
        if self.inputs.done("autointerp"):
            sec.add(prompt_copy_warning(self.inputs.manifest("autointerp").get("extra", {})))
        if cat["score"].notna().any():
            if figs.detection_scores(cat, self.out / "figures" / "detection_scores.png", self.cfg.figure_dpi):
                sec.add(_figure("figures/detection_scores.png", "detection scores of the explanations per source, "
                                "and their mean per classification"))
                self.done("detection_scores")
        elif self.inputs.done("autointerp"):
            self._miss("explanation detection scores", "autointerp/explanations.parquet has no score")
        summ = self.inputs.table("autointerp", "score_summary.parquet", "explanation score summary", ["source"],
                                 all_columns=True) \
            if self.inputs.done("autointerp") and self.inputs.exists("autointerp", "score_summary.parquet") else None
        if summ is not None and len(summ) and "mean_fuzz" in summ.columns:
            tabs.write_table(summ, self.out / "tables", "score_summary")
            sec.add("<p>Mean explanation scores per source (detection and fuzzing: balanced accuracy, chance "
                    "0.5; simulation: correlation of predicted and true activations, chance 0; weighted_*: "
                    "weighted by firing rate):</p>" + dash.html_table(summ.round(3)))
            self.done("score_summary")
        calls = self.inputs.table("autointerp", "calls.parquet", "LLM calls and spend", [], all_columns=True) \
            if self.inputs.done("autointerp") else None
        if calls is not None and len(calls):
            sp = tabs.spend_table(calls)
            tabs.write_table(sp, self.out / "tables", "autointerp_spend")
            sec.add("<p>LLM calls, tokens and spend:</p>" + dash.html_table(sp))
            self.done("autointerp_spend")
        self.sections.append(sec)

    # ---- index ---------------------------------------------------------------------

    def index(self) -> None:
        inp = self.inputs
        rows = stage_rows(inp)
        trs = []
        for r in rows:
            fin = _dt.datetime.fromtimestamp(r["finished_at"]).strftime("%Y-%m-%d %H:%M") if r["finished_at"] else ""
            secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
            items = list(r["rows"].items())
            counts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in items[:4])
            counts += f", … ({len(items) - 4} more)" if len(items) > 4 else ""
            trs.append(f'<tr><td>{dash.esc(r["stage"])}</td><td class="status-{r["state"]}">{dash.esc(r["state"])}'
                       f'</td><td>{dash.esc(r["config_hash"])}</td><td>{dash.esc(fin)}</td>'
                       f'<td class="num">{dash.esc(secs)}</td><td>{dash.esc(counts)}</td></tr>')
        st = "".join(trs)
        status = ('<table class="data"><thead><tr><th>stage</th><th>state</th><th>config</th><th>finished</th>'
                  f'<th class="num">seconds</th><th>rows</th></tr></thead><tbody>{st}</tbody></table>')
        missing = self.inputs.missing
        miss_html = ('<ul class="missing">' + "".join(
            f"<li><b>{dash.esc(m.what)}</b>: {dash.esc(m.why)}</li>" for m in missing) + "</ul>") if missing else \
            "<p>Nothing: every part of the report was rendered.</p>"
        pages = self.result.pages
        feat = ""
        if pages:
            feat = ("<p><a href=\"features.html\"><b>Browse every feature</b></a> (searchable and filterable): "
                    + ", ".join(f"{n:,} {dash.SOURCE_LABELS.get(s, s)}{'s' if n != 1 else ''}" for s, n in pages.items())
                    + ".</p>")
        toc = " · ".join(f'<a href="#{s.anchor}">{dash.esc(s.title.split(":")[0])}</a>' for s in self.sections if s.parts)
        body = (f'<h1>rank1 report <small>{dash.esc(self.run.uri)}</small></h1>'
                f'<p class="muted">generated {dash.esc(_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))} by rank1 '
                f'{dash.esc(code_version())}</p>{feat}<nav class="toc">{toc}</nav>'
                f'<section id="status"><h2>Stages</h2>{status}</section>'
                f'<section id="missing"><h2>Not rendered</h2>{miss_html}</section>'
                + "".join(s.html() for s in self.sections if s.parts))
        write_text_atomic(self.out / "index.html", dash.page("rank1 report", body, "", (), "report"))

    # ---- all ------------------------------------------------------------------------

    def build(self) -> ReportResult:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        dash.copy_assets(self.out)
        self.tables()
        self.figure1()
        self.steering()
        self.features()
        self._write_traces()
        self.transcoder()
        self.ground_truth()
        self.curves()
        order = {"table1": 0, "table2": 1, "figure1": 2, "figure2": 3, "groundtruth": 3.5, "figure3": 4, "sae": 5,
                 "autointerp": 6, "transcoder": 7, "steering": 8, "training": 9}
        self.sections.sort(key=lambda s: order.get(s.anchor, 99))
        self.result.missing = list(self.inputs.missing)
        self.index()
        files = [p for p in self.out.rglob("*") if p.is_file()]
        self.result.files = len(files) + 1
        self.result.bytes = sum(p.stat().st_size for p in files)
        self.result.seconds = time.perf_counter() - t0
        write_text_atomic(self.out / "report.json", json.dumps(self.result.to_dict(), indent=2) + "\n")
        return self.result


def build_report(run: RunDir | str, cfg: ReportConfig, out: Path, log: Callable[[str], None] = print,
                 on_page: Optional[Callable[[int], None]] = None) -> ReportResult:
    """Render every part of the report that the run's finished stages allow into `out`."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    return ReportBuilder(run, cfg, Path(out), log, on_page).build()


def count_features(run: RunDir | str, cfg: ReportConfig) -> int:
    """Pages the report will write (for a progress bar)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    cat = build_catalogue(RunInputs(run), cfg.sources)
    if cfg.max_features:
        return int(sum(min(cfg.max_features, n) for n in cat.groupby("source").size()))
    return len(cat)
