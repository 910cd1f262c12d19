"""evaluate: benchmarks through vLLM (or transformers) on Ray Data actors; pass@1; Table 1.

    python -m ray_jobs.evaluate --config configs/demo.yaml
    python -m ray_jobs.evaluate --config configs/tiny.yaml evaluate.backend=transformers

Every (variant, problem) becomes a row of a Ray Data dataset; rows are sharded across
`evaluate.actors` actors (`rank1_core.generation.GenerationWorker`), each holding one engine,
which generate `evaluate.samples` responses per problem; the driver grades them (math-verify
needs the main thread for its timeouts; grading costs milliseconds). Variants that share
base weights share an engine: with lora_mode lora_request (vLLM) or peft (transformers) one
engine serves base and lora; merged builds one engine per adapter. Leaves in `evaluate/`:

- `samples.parquet`: variant, benchmark, problem_id, sample, response, extracted, correct,
  marker_found, n_tokens, finished, backend, lora_mode ('merged' | 'lora_request' | 'peft' |
  null for a variant without adapter), answer (the reference), prompt ('think' | 'plain':
  whether the prompt ended with model.think_marker; evaluate.base_prompt sets the base's).
- `summary.parquet`: variant, benchmark, n_problems, n_samples, pass1, stderr, mean_tokens,
  finished_rate, marker_rate, prompt.
- `table1.md`, `table1.csv`: base, LoRA, full and % recovery per benchmark, and the share of
  each think-prompted variant's responses that reached the answer marker (a think response
  without it is graded wrong unless evaluate.missing_marker is grade_tail).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from rank1_core.config import Config
from ray_jobs.common import ensure_ray, execute, stage_cli
from ray_jobs.progress import Progress

STAGE = "evaluate"


@dataclass
class Variant:
    """A model to benchmark: base weights (path or URI) and an optional adapter on top."""

    name: str
    model_dir: str
    adapter_dir: str | None = None
    prompt: str = "think"
    """'think': the prompt ends with model.think_marker (s1 format); 'plain': chat format only."""


def upstream(variants: list[str]) -> tuple[str, ...]:
    ups = ["prepare"]
    if "lora" in variants:
        ups.append("train")
    if "full" in variants:
        ups.append("train_full")
    return tuple(ups)


def variant_specs(cfg: Config, names: list[str]) -> list[Variant]:
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


def load_benchmarks(cfg: Config) -> dict:
    """name -> checked benchmark DataFrame, for evaluate.benchmarks (empty: all prepared)."""
    from rank1_core.grading import BenchmarkError, read_benchmark
    from rank1_core.rundir import RunDir

    prep = RunDir(cfg.run.dir).stage("prepare")
    prepared = [b.name for b in cfg.data.benchmarks]
    names = cfg.evaluate.benchmarks or prepared
    out = {}
    for n in names:
        if not prep.exists("benchmarks", f"{n}.parquet"):
            raise BenchmarkError(f"evaluate.benchmarks names {n!r} but {prep.uri_of('benchmarks', n + '.parquet')} "
                                 f"does not exist (prepared: {', '.join(prepared) or 'none'})")
        out[n] = read_benchmark(prep.path("benchmarks", f"{n}.parquet"), prep.fs, cfg.evaluate.limit)
    if not out:
        raise BenchmarkError("no benchmark to evaluate: data.benchmarks is empty")
    return out


def build_items(cfg: Config, benchmarks: dict, variants: list[Variant]) -> list[dict]:
    """One row per (variant, problem): the tokenized generation prompt and the reference."""
    from rank1_core.data.format import prompt_text
    from rank1_core.models import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(cfg.model))
    prompts = {}
    for style in sorted({v.prompt for v in variants}):
        for b, df in benchmarks.items():
            for r in df.itertuples(index=False):
                text = prompt_text(tok, r.question, cfg.model, think=style == "think")
                prompts[(style, b, r.problem_id)] = tok(text, add_special_tokens=False)["input_ids"]
    items = []
    for v in variants:
        for b, df in benchmarks.items():
            for i, r in enumerate(df.itertuples(index=False)):
                items.append({"variant": v.name, "benchmark": b, "problem_id": str(r.problem_id),
                              "problem_index": i, "prompt_ids": prompts[(v.prompt, b, r.problem_id)],
                              "answer": str(r.answer).strip(), "kind": r.kind, "n_choices": int(r.n_choices)})
    return items


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


def generate_and_grade(cfg: Config, variants: list[Variant], benchmarks: dict, sr=None, tag: str = "generate"):
    """Samples DataFrame (rank1_core.grading.SAMPLE_COLUMNS) of every variant on every
    benchmark, generated on Ray Data actors and graded here. The ablate stage reuses this."""
    import pandas as pd

    from rank1_core.generation import (GENERATED_COLUMNS, EngineSpec, GenerationWorker, resolve_backend,
                                       resolve_lora_mode)
    from rank1_core.grading import grade_samples

    ec = cfg.evaluate
    backend = resolve_backend(ec.backend)
    mode = resolve_lora_mode(backend, ec.lora_mode)
    items = build_items(cfg, benchmarks, variants)
    ray = ensure_ray(cfg)
    order = {v.name: i for i, v in enumerate(variants)}
    rows = []
    for model_dir, adapters in engine_groups(variants, mode):
        part = [it for it in items if it["variant"] in adapters]
        spec = EngineSpec(
            model_dir=model_dir, adapters=adapters, backend=backend, lora_mode=mode,
            settings=dict(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                          n=ec.samples, seed=cfg.run.seed),
            dtype=ec.dtype or cfg.model.dtype, vllm=vars(ec.vllm).copy(), batch_size=ec.batch_size,
            threads=ec.threads,
        )
        blocks = max(1, min(len(part), max(ec.actors * 2, math.ceil(len(part) / ec.batch_size))))
        ds = ray.data.from_items(part, override_num_blocks=blocks)
        ds = ds.map_batches(GenerationWorker, fn_constructor_kwargs={"spec": spec.to_dict()},
                            batch_size=ec.batch_size, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=ec.actors),
                            num_cpus=ec.actor_cpus, num_gpus=ec.actor_gpus or None)
        label = f"{tag}:{'+'.join(adapters)}"
        with sr.timed(label) if sr is not None else contextlib.nullcontext():
            with Progress(STAGE, total=len(part) * ec.samples, main="samples", unit="sample",
                          desc=f"[{STAGE}] {label}") as p:
                for r in ds.iter_rows():
                    rows.append(r)
                    p.update(1, tokens=int(r["n_tokens"]))
    generated = pd.DataFrame(rows, columns=GENERATED_COLUMNS)
    prompts = {v.name: v.prompt for v in variants}
    # a think-format response without the answer marker is graded per missing_marker; a
    # plain-prompted one on its whole response
    generated["prompt"] = generated["variant"].map(prompts)
    with sr.timed(f"grade:{tag}") if sr is not None else contextlib.nullcontext():
        samples = grade_samples(generated, cfg.model.answer_marker, ec.tail_chars, ec.missing_marker)
    index = {(it["benchmark"], it["problem_id"]): it["problem_index"] for it in items}
    samples["prompt"] = samples["variant"].map(prompts)
    samples["_v"] = samples["variant"].map(order)
    samples["_p"] = [index[(b, p)] for b, p in zip(samples["benchmark"], samples["problem_id"])]
    samples = samples.sort_values(["_v", "benchmark", "_p", "sample"]).drop(columns=["_v", "_p"])
    samples["correct"] = samples["correct"].astype(bool)
    samples["finished"] = samples["finished"].astype(bool)
    samples["marker_found"] = samples["marker_found"].astype(bool)
    samples["n_tokens"] = samples["n_tokens"].astype("int32")
    samples["sample"] = samples["sample"].astype("int32")
    samples["lora_mode"] = samples["lora_mode"].astype(object).where(samples["lora_mode"].notna(), None)
    expected = len(items) * ec.samples
    if len(samples) != expected:
        raise RuntimeError(f"generation returned {len(samples)} samples, expected {expected}")
    return samples.reset_index(drop=True)


def summarize(samples):
    """grading.summarize plus mean response length, finished and marker rates (and the
    variant's prompt, 'think' | 'plain', when the samples have it)."""
    from rank1_core.grading import summarize as pass1_summary

    s = pass1_summary(samples)
    aggs = dict(mean_tokens=("n_tokens", "mean"), finished_rate=("finished", "mean"),
                marker_rate=("marker_found", "mean"))
    if "prompt" in samples.columns:
        aggs["prompt"] = ("prompt", "first")
    extra = samples.groupby(["variant", "benchmark"]).agg(**aggs).reset_index()
    return s.merge(extra, on=["variant", "benchmark"], how="left")


def write_parquet(stage, rel: str, df) -> None:
    import pyarrow as pa

    stage.write_parquet(rel, pa.Table.from_pandas(df, preserve_index=False), compression="zstd")  # atomic


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.grading import table1, table1_markdown

    ec = cfg.evaluate

    def body(sr):
        variants = variant_specs(cfg, ec.variants)
        with sr.timed("benchmarks"):
            benches = load_benchmarks(cfg)
        samples = generate_and_grade(cfg, variants, benches, sr)
        summary = summarize(samples)
        t1 = table1(summary, list(benches))
        write_parquet(sr.stage, "samples.parquet", samples)
        write_parquet(sr.stage, "summary.parquet", summary)
        sr.stage.write_text("table1.csv", t1.to_csv(index=False))
        md = table1_markdown(t1)
        sr.stage.write_text("table1.md", md)
        print(md, flush=True)
        sr.rows.update({"samples": len(samples), "summary": len(summary)})
        modes = samples.groupby("variant")["lora_mode"].first()
        sr.extra.update({
            "backend": str(samples["backend"].iloc[0]),
            "lora_mode": {v: (None if m is None or m != m else str(m)) for v, m in modes.items()},
            "prompt": {v.name: v.prompt for v in variants},
            "generated_tokens": int(samples["n_tokens"].sum()),
            "pass1": {f"{r.variant}/{r.benchmark}": round(float(r.pass1), 4) for r in summary.itertuples()},
        })
        secs = sum(v for k, v in sr.timings.items() if k.startswith("generate"))
        if secs:
            sr.extra["generated_tokens_per_s"] = round(int(samples["n_tokens"].sum()) / secs, 1)

    return execute(cfg, STAGE, body, upstream=upstream(ec.variants), force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
