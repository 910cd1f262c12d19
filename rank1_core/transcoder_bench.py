"""The transcoder adapters on the benchmarks (the transcoder_eval stage), Ray-free: which
variants to generate (the adapters as trained, with the hesitation features ablated, with as
many random live features ablated), the reference scores taken from the evaluate stage, and
the tables: the per-(variant, benchmark) summary with hesitation counts, the benchmark gain
the adapters recover, the change each ablation makes, and the faithfulness report in
Markdown. `ray_jobs/transcoder_eval.py` generates the samples and writes these.
"""

from __future__ import annotations

import math

import pandas as pd


def ablation_variants(hes_tab: pd.DataFrame, latents, reference: str, random_control: bool,
                      seed: int) -> tuple[dict[str, list[int] | None], list[int], list[int]]:
    """(variants: name -> ablated features, None for the adapters off; the hesitation features;
    the random control's) from transcoder_extract's hesitation_features (its `selected`
    rows) and latents tables. With `reference` 'generate' the base is a variant too."""
    from rank1_core.transcoder import random_control as random_features

    hes = sorted(int(f) for f in hes_tab.loc[hes_tab["selected"], "feature"])
    variants: dict[str, list[int] | None] = {}
    if reference == "generate":
        variants["base"] = None
    variants["transcoder"] = []
    rand: list[int] = []
    if hes:
        variants["transcoder_no_hesitation"] = hes
        if random_control:
            rand = random_features(latents, hes_tab["feature"], len(hes), seed)
            variants["transcoder_random_ablated"] = rand
    return variants, hes, rand


def reference_samples(samples: pd.DataFrame, items: list[dict], benchmarks) -> pd.DataFrame:
    """The evaluate stage's samples (variants base and full) of exactly this stage's problems
    (`items` of variant transcoder); a problem they lack is a ConfigError, raised before
    anything is generated."""
    from rank1_core.config import ConfigError

    es = samples[samples["variant"].isin(["base", "full"])]
    mine = pd.DataFrame([(it["benchmark"], it["problem_id"]) for it in items if it["variant"] == "transcoder"],
                        columns=["benchmark", "problem_id"])
    es = es.merge(mine, on=["benchmark", "problem_id"], how="inner")
    for b in benchmarks:
        want = set(mine[mine["benchmark"] == b]["problem_id"])
        for v in ("base", "full"):
            have = set(es[(es["variant"] == v) & (es["benchmark"] == b)]["problem_id"])
            if have != want:
                raise ConfigError(f"transcoder_eval.reference is 'evaluate' but evaluate/samples.parquet lacks "
                                  f"{len(want - have)} of this stage's {len(want)} problems of {b!r} for variant "
                                  f"{v!r}: run evaluate with variants base and full on at least these problems "
                                  "(evaluate.limit >= transcoder_eval.limit), or set "
                                  "transcoder_eval.reference: generate")
    return es


def md_table(df: pd.DataFrame, floats: int = 4) -> str:
    """A Markdown table: floats to `floats` decimals (NaN as n/a), every cell `md_escape`d."""
    from rank1_core.report.tables import md_escape

    cols = [md_escape(c) for c in df.columns]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.itertuples(index=False):
        cells = []
        for v in r:
            if isinstance(v, float):
                cells.append("n/a" if math.isnan(v) else f"{v:.{floats}f}")
            else:
                cells.append(md_escape(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def eval_summary(samples: pd.DataFrame, ablated: dict[str, int], names: list[str]) -> pd.DataFrame:
    """`rank1_core.benchmarks.summarize` plus mean_hesitations, hesitation_rate (share of
    responses with one) and features_ablated (`ablated`: variant -> count), in the order of
    `names` (the variants) and benchmark."""
    from rank1_core.benchmarks import summarize

    summary = summarize(samples)
    extra = samples.groupby(["variant", "benchmark"]).agg(
        mean_hesitations=("hesitations", "mean"),
        hesitation_rate=("hesitations", lambda h: float((h > 0).mean()))).reset_index()
    summary = summary.merge(extra, on=["variant", "benchmark"], how="left")
    summary["features_ablated"] = summary["variant"].map(ablated).astype("int64")
    order = {n: i for i, n in enumerate(names)}
    summary["_v"] = summary["variant"].map(order)
    return summary.sort_values(["_v", "benchmark"]).drop(columns=["_v"]).reset_index(drop=True)


def recovery_table(ref: pd.DataFrame, summary: pd.DataFrame, benchmarks, target_name: str,
                   reference: str) -> pd.DataFrame:
    """Per benchmark: base and target pass@1 (from `ref`, variants base and full), the
    transcoder's (from `summary`) and the share of the gain it recovers, in percent."""
    from rank1_core.grading import recovery

    score = lambda df, v, b: float(df[(df["variant"] == v) & (df["benchmark"] == b)]["pass1"].iloc[0])  # noqa: E731
    rows = []
    for b in benchmarks:
        pb, pf, pt = score(ref, "base", b), score(ref, "full", b), score(summary, "transcoder", b)
        r = recovery(pb, pt, pf)
        rows.append({"benchmark": b, "base": pb, target_name: pf, "transcoder": pt,
                     "recovered_pct": float("nan") if r is None else 100.0 * r, "reference": reference})
    return pd.DataFrame(rows)


def hesitation_changes(summary: pd.DataFrame, benchmarks) -> pd.DataFrame:
    """Per benchmark and variant: length, hesitations, accuracy and their change (d_*) from
    the unablated adapters (variant transcoder)."""
    rows = []
    for b in benchmarks:
        t = summary[(summary["variant"] == "transcoder") & (summary["benchmark"] == b)].iloc[0]
        for r in summary[summary["benchmark"] == b].itertuples(index=False):
            rows.append({"benchmark": b, "variant": r.variant, "features_ablated": int(r.features_ablated),
                         "pass1": float(r.pass1), "stderr": float(r.stderr), "mean_tokens": float(r.mean_tokens),
                         "mean_hesitations": float(r.mean_hesitations),
                         "hesitation_rate": float(r.hesitation_rate), "finished_rate": float(r.finished_rate),
                         "d_tokens": float(r.mean_tokens - t.mean_tokens),
                         "d_hesitations": float(r.mean_hesitations - t.mean_hesitations),
                         "d_pass1": float(r.pass1 - t.pass1)})
    return pd.DataFrame(rows)


def faithfulness_markdown(target: str, faith: dict, layers: pd.DataFrame, rec: pd.DataFrame,
                          hesitation: pd.DataFrame, n_hesitation: int, n_random: int) -> str:
    """faithfulness.md: KL and cross-entropy to the target (`faith`: the transcoder stage's
    faithfulness.json), explained variance per layer, the recovered gain, the ablations."""
    md = [f"# Transcoder adapters: faithfulness to the target ({target})\n",
          f"Held-out traces, {faith['tokens']} next-token positions ({faith['positions']} tokens).\n",
          "| measure | base | base + adapters | target |", "|---|---|---|---|",
          f"| KL(target ‖ model), nats/token | {faith['kl_base']:.4f} | {faith['kl_adapted']:.4f} | 0 |",
          f"| cross-entropy on the assistant turn | {faith['ce_base']:.4f} | {faith['ce_adapted']:.4f} | "
          f"{faith['ce_target']:.4f} |",
          f"| top-1 agreement with the target | {faith['top1_agree_base']:.4f} | "
          f"{faith['top1_agree_adapted']:.4f} | 1 |",
          "", f"Share of the KL gap closed: {100 * faith['kl_closed']:.1f}%. Mean explained variance of the MLP "
          f"difference: {faith['fve_difference_mean']:.4f}. L0: {faith['l0_per_layer']:.2f} latents per layer "
          f"and token; {faith['live_latents']} of {faith['latents']} latents fired on the held-out traces.\n",
          "## Explained variance of the MLP difference per layer\n",
          md_table(layers[["layer", "fve_difference", "diff_norm", "adapter_norm", "l0", "live_latents"]]),
          "## Benchmark gain recovered\n", md_table(rec),
          "## Hesitation features ablated\n",
          f"{n_hesitation} hesitation features (transcoder_extract/hesitation_features.parquet); control: "
          f"{n_random} random live features.\n", md_table(hesitation, 3)]
    return "\n".join(md)
