"""The prepared benchmarks as work for the stages that generate on them (evaluate, ablate,
steer, transcoder_eval): which benchmarks a stage reads, the tokenized prompt of every
problem, the variants and the engines that serve them, the graded samples' order and types,
and the per-(variant, benchmark) summary behind Table 1. No `ray` here: the actor pools that
generate are in `ray_jobs` (`ray_jobs.common.generate_and_grade`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from rank1_core.grading import BenchmarkError


@dataclass
class Variant:
    """A model to benchmark: base weights (path or URI) and an optional adapter on top."""

    name: str
    model_dir: str
    adapter_dir: str | None = None
    prompt: str = "think"
    """'think': the prompt ends with model.think_marker (s1 format); 'plain': chat format only."""


def variant_specs(cfg, names: list[str]) -> list[Variant]:
    """base -> the base model; lora -> train/adapter on it; full -> train_full/model."""
    from rank1_core.models import resolve_model_dir
    from rank1_core.rundir import RunDir

    run = RunDir(cfg.run.dir)
    base = str(resolve_model_dir(cfg.model))
    out = []
    for n in names:
        if n == "base":
            out.append(Variant("base", base, prompt=cfg.evaluate.base_prompt))
        elif n == "lora":
            out.append(Variant("lora", base, run.stage("train").uri_of("adapter")))
        elif n == "full":
            out.append(Variant("full", run.stage("train_full").uri_of("model")))
        else:
            raise ValueError(f"unknown variant {n!r}")
    return out


def load_benchmarks(cfg, section: str = "evaluate", error: type[Exception] = BenchmarkError,
                    empty: str = "no benchmark to evaluate: data.benchmarks is empty") -> dict[str, pd.DataFrame]:
    """name -> checked benchmark DataFrame (first `<section>.limit` problems) for
    `<section>.benchmarks` (empty: every prepared benchmark). A name that was not prepared, or
    no benchmark at all, raises `error` (with the message `empty`)."""
    from rank1_core.grading import read_benchmark
    from rank1_core.rundir import RunDir

    sec = getattr(cfg, section)
    prep = RunDir(cfg.run.dir).stage("prepare")
    prepared = [b.name for b in cfg.data.benchmarks]
    out = {}
    for n in sec.benchmarks or prepared:
        if not prep.exists("benchmarks", f"{n}.parquet"):
            raise error(f"{section}.benchmarks names {n!r} but {prep.uri_of('benchmarks', n + '.parquet')} "
                        f"does not exist (prepared: {', '.join(prepared) or 'none'})")
        out[n] = read_benchmark(prep.path("benchmarks", f"{n}.parquet"), prep.fs, sec.limit)
    if not out:
        raise error(empty)
    return out


def problem_items(cfg, benchmarks: dict, styles=("think",)) -> dict[str, list[dict]]:
    """style ('think' | 'plain') -> one item per problem: benchmark, problem_id, problem_index,
    prompt_ids (the tokenized generation prompt), answer (the reference), kind, n_choices."""
    from rank1_core.data.format import prompt_text
    from rank1_core.models import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(cfg.model))
    out = {}
    for style in sorted(set(styles)):
        out[style] = [{"benchmark": b, "problem_id": str(r.problem_id), "problem_index": i,
                       "prompt_ids": tok(prompt_text(tok, r.question, cfg.model, think=style == "think"),
                                         add_special_tokens=False)["input_ids"],
                       "answer": str(r.answer).strip(), "kind": r.kind, "n_choices": int(r.n_choices)}
                      for b, df in benchmarks.items() for i, r in enumerate(df.itertuples(index=False))]
    return out


def build_items(cfg, benchmarks: dict, variants: list[Variant]) -> list[dict]:
    """One row per (variant, problem): the variant's name and its `problem_items` row."""
    per_style = problem_items(cfg, benchmarks, [v.prompt for v in variants])
    return [{"variant": v.name, **it} for v in variants for it in per_style[v.prompt]]


def engine_groups(variants: list[Variant], lora_mode: str) -> list[tuple[str, dict[str, str | None]]]:
    """(base weights, {variant: adapter}) served by one engine each."""
    groups: dict[str, dict[str, str | None]] = {}
    out = []
    for v in variants:
        if v.adapter_dir is not None and lora_mode == "merged":
            out.append((v.model_dir, {v.name: v.adapter_dir}))
        else:
            groups.setdefault(v.model_dir, {})[v.name] = v.adapter_dir
    return list(groups.items()) + out


def order_samples(samples: pd.DataFrame, items: list[dict], names: list[str], per_problem: int) -> pd.DataFrame:
    """Graded samples (`rank1_core.grading.grade_samples`) of `items`, `per_problem` each, in
    the order of `names` (the variants), benchmark, problem and sample, with their column
    types; a missing or extra sample is an error."""
    expected = len(items) * per_problem
    if len(samples) != expected:
        raise RuntimeError(f"generation returned {len(samples)} samples, expected {expected}")
    order = {n: i for i, n in enumerate(names)}
    index = {(it["benchmark"], it["problem_id"]): it["problem_index"] for it in items}
    samples["_v"] = samples["variant"].map(order)
    samples["_p"] = [index[(b, p)] for b, p in zip(samples["benchmark"], samples["problem_id"])]
    samples = samples.sort_values(["_v", "benchmark", "_p", "sample"]).drop(columns=["_v", "_p"])
    for c in ("correct", "finished", "marker_found"):
        samples[c] = samples[c].astype(bool)
    samples["n_tokens"] = samples["n_tokens"].astype("int32")
    samples["sample"] = samples["sample"].astype("int32")
    return samples.reset_index(drop=True)


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """`grading.summarize` plus mean response length, finished and marker rates (and the
    variant's prompt, 'think' | 'plain', when the samples have it)."""
    from rank1_core.grading import summarize as pass1_summary

    s = pass1_summary(samples)
    aggs = dict(mean_tokens=("n_tokens", "mean"), finished_rate=("finished", "mean"),
                marker_rate=("marker_found", "mean"))
    if "prompt" in samples.columns:
        aggs["prompt"] = ("prompt", "first")
    extra = samples.groupby(["variant", "benchmark"]).agg(**aggs).reset_index()
    return s.merge(extra, on=["variant", "benchmark"], how="left")
