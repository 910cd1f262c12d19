"""transcoder_eval: the transcoder adapters on the benchmarks (faithfulness report, hesitation ablation).

    python -m ray_jobs.transcoder_eval --config configs/demo.yaml

Generates the prepared benchmarks with the settings of `evaluate` (problems, samples,
temperature, token budget; the first `transcoder_eval.limit` problems, or evaluate.limit) on
Ray Data actors (`rank1_core.transcoder.TranscoderGenerationWorker`:
transformers generation on the base model with the adapters installed), for the variants

- `transcoder`: base + adapters as trained;
- `transcoder_no_hesitation`: the hesitation features of transcoder_extract ablated (zeroed);
- `transcoder_random_ablated`: as many random live features ablated (the control);
- with `transcoder_eval.reference: generate`, also `base` (adapters off, same engine) and the
  target (`full` when it is train_full's model, else `target`).

With `reference: evaluate` the base and target scores of the recovered gain are recomputed
from the evaluate stage's samples (variants base and full) of exactly the same problems.
Grades them like evaluate, counts hesitation words per response, and writes:

- `samples.parquet`: evaluate's per-sample columns plus `hesitations`.
- `summary.parquet`: evaluate's summary columns (variant, benchmark, n_problems, n_samples,
  pass1, stderr, mean_tokens, finished_rate, marker_rate) plus mean_hesitations,
  hesitation_rate and features_ablated: Table 1's schema, one more variant.
- `recovery.{csv,md}`: per benchmark base, target, transcoder pass@1 and the share of the
  fine-tune's gain the adapters recover, (transcoder - base) / (target - base).
- `hesitation.{csv,md}`: per variant response length, hesitations, accuracy, and their change
  from the unablated adapters.
- `faithfulness.md`: the whole faithfulness report: KL to the target, per-layer explained
  variance of the MLP difference (from the transcoder stage) and the recovered gain.
"""

from __future__ import annotations

import dataclasses
import math

from rank1_core.config import Config, ConfigError
from ray_jobs.common import ensure_ray, execute, stage_cli

STAGE = "transcoder_eval"


def run(cfg: Config, force: bool = False) -> dict:
    tc = cfg.transcoder
    ev = cfg.transcoder_eval
    target_name = "full" if tc.target == "train_full" else "target"
    if ev.reference == "evaluate" and tc.target != "train_full":
        raise ConfigError("transcoder_eval.reference 'evaluate' takes the target's scores from the evaluate stage's "
                          f"'full' variant, but transcoder.target is {tc.target!r}: set transcoder_eval.reference: "
                          "generate")

    def body(sr):
        import pandas as pd
        import pyarrow.parquet as pq

        from rank1_core.benchmarks import Variant, build_items, load_benchmarks, order_samples, summarize
        from rank1_core.generation import GENERATED_COLUMNS
        from rank1_core.grading import grade_samples
        from rank1_core.models import resolve_model_dir
        from rank1_core.rundir import RunDir
        from rank1_core.transcoder import TranscoderEngineSpec, TranscoderGenerationWorker, count_words, target_model
        from rank1_core.transcoder_bench import (ablation_variants, eval_summary, faithfulness_markdown,
                                                 hesitation_changes, md_table, recovery_table, reference_samples)

        run = RunDir(cfg.run.dir)
        st, tcs, tex = sr.stage, run.stage("transcoder"), run.stage("transcoder_extract")
        ecfg = cfg
        if ev.limit:
            ecfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, limit=ev.limit))
        with sr.timed("benchmarks"):
            benches = load_benchmarks(ecfg)
        hes_tab = pq.read_table(tex.path("hesitation_features.parquet"), filesystem=tex.fs).to_pandas()
        latents = pq.read_table(tex.path("latents.parquet"), filesystem=tex.fs)
        variants, hes, rand = ablation_variants(hes_tab, latents, ev.reference, ev.random_control, cfg.run.seed)
        if not hes:
            print(f"[{STAGE}] no hesitation feature found (transcoder_extract/hesitation_features.parquet): "
                  "only the adapters as trained are benchmarked", flush=True)
        ec = cfg.evaluate
        settings = dict(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                        n=ec.samples, seed=cfg.run.seed)
        base_dir = str(resolve_model_dir(cfg.model))
        engines = [TranscoderEngineSpec(base_dir, tcs.uri_of("adapter"), variants, settings,
                                        ec.dtype or cfg.model.dtype, ev.batch_size, ev.threads)]
        if ev.reference == "generate":
            tdir = target_model(cfg)
            engines.append(TranscoderEngineSpec(tdir, None, {target_name: None}, settings,
                                                ec.dtype or cfg.model.dtype, ev.batch_size, ev.threads))
        names = [n for e in engines for n in e.variants]
        items = build_items(ecfg, benches, [Variant(n, "") for n in names])
        # base and target scores: from the evaluate stage's samples of the same problems (checked
        # before generating anything), or generated here
        ref_samples = None
        if ev.reference == "evaluate":
            evs = run.stage("evaluate")
            es = pq.read_table(evs.path("samples.parquet"), filesystem=evs.fs).to_pandas()
            ref_samples = reference_samples(es, items, benches)
        ray = ensure_ray(cfg)
        rows = []
        for spec in engines:
            part = [it for it in items if it["variant"] in spec.variants]
            blocks = max(1, min(len(part), max(ev.actors * 2, math.ceil(len(part) / ev.batch_size))))
            ds = ray.data.from_items(part, override_num_blocks=blocks)
            ds = ds.map_batches(TranscoderGenerationWorker, fn_constructor_kwargs={"spec": spec.to_dict()},
                                batch_size=ev.batch_size, batch_format="pandas",
                                compute=ray.data.ActorPoolStrategy(size=ev.actors),
                                num_cpus=ev.actor_cpus)
            with sr.timed(f"generate:{'+'.join(spec.variants)}"):
                rows.extend(ds.take_all())
        generated = pd.DataFrame(rows, columns=GENERATED_COLUMNS)
        with sr.timed("grade"):
            samples = grade_samples(generated, cfg.model.answer_marker, ec.tail_chars, ec.missing_marker)
        samples = order_samples(samples, items, names, ec.samples)
        samples["lora_mode"] = None
        words = cfg.transcoder_extract.hesitation.words  # the words its features were chosen by
        samples["hesitations"] = [count_words(r, words) for r in samples["response"]]

        n_abl = {n: (len(v) if v is not None else 0) for e in engines for n, v in e.variants.items()}
        summary = eval_summary(samples, n_abl, names)

        if ev.reference == "evaluate":
            ref = summarize(ref_samples)
        else:
            ref = summary[summary["variant"].isin(["base", target_name])].replace({"variant": {target_name: "full"}})
        rec = recovery_table(ref, summary, benches, target_name, ev.reference)
        hesitation = hesitation_changes(summary, benches)

        st.write_dataframe("samples.parquet", samples)
        st.write_dataframe("summary.parquet", summary)
        st.write_text("recovery.csv", rec.to_csv(index=False))
        st.write_text("recovery.md", md_table(rec, 4))
        st.write_text("hesitation.csv", hesitation.to_csv(index=False))
        st.write_text("hesitation.md", md_table(hesitation, 3))
        faith = tcs.read_json("faithfulness.json")
        layers = pq.read_table(tcs.path("faithfulness_layers.parquet"), filesystem=tcs.fs).to_pandas()
        md = faithfulness_markdown(tc.target, faith, layers, rec, hesitation, len(hes), len(rand))
        st.write_text("faithfulness.md", md)
        print(md, flush=True)
        sr.rows.update({"samples": len(samples), "summary": len(summary), "hesitation_features": len(hes)})
        sr.extra.update({
            "variants": names, "reference": ev.reference,
            "pass1": {f"{r.variant}/{r.benchmark}": round(float(r.pass1), 4) for r in summary.itertuples()},
            "recovered_pct": {r.benchmark: (None if r.recovered_pct != r.recovered_pct else round(r.recovered_pct, 2))
                              for r in rec.itertuples()},
            "mean_tokens": {f"{r.variant}/{r.benchmark}": round(float(r.mean_tokens), 2) for r in summary.itertuples()},
            "mean_hesitations": {f"{r.variant}/{r.benchmark}": round(float(r.mean_hesitations), 3)
                                 for r in summary.itertuples()},
            "generated_tokens": int(samples["n_tokens"].sum()),
        })

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
