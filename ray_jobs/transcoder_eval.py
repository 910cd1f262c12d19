"""transcoder_eval: the transcoder adapters on the benchmarks (faithfulness report, hesitation ablation).

    python -m ray_jobs.transcoder_eval --config configs/demo.yaml

Generates the prepared benchmarks with the settings of `evaluate` (problems, samples,
temperature, token budget; the first `transcoder.eval.limit` problems, or evaluate.limit) on
Ray Data actors (`rank1_core.transcoder.TranscoderGenerationWorker`:
transformers generation on the base model with the adapters installed), for the variants

- `transcoder`: base + adapters as trained;
- `transcoder_no_hesitation`: the hesitation features of transcoder_extract ablated (zeroed);
- `transcoder_random_ablated`: as many random live features ablated (the control);
- with `transcoder.eval.reference: generate`, also `base` (adapters off, same engine) and the
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
from ray_jobs.transcoder import hash_view, target_spec

STAGE = "transcoder_eval"


def _upstream(cfg: Config) -> tuple[str, ...]:
    ups = ["prepare", "transcoder", "transcoder_extract"]
    ev = cfg.transcoder.eval
    if ev.reference == "evaluate":
        ups.append("evaluate")
    elif cfg.transcoder.target == "train_full":
        ups.append("train_full")
    return tuple(ups)


def _md_table(df, floats: int = 4) -> str:
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


def run(cfg: Config, force: bool = False) -> dict:
    tc = cfg.transcoder
    ev = tc.eval
    target_name = "full" if tc.target == "train_full" else "target"
    if ev.reference == "evaluate" and tc.target != "train_full":
        raise ConfigError("transcoder.eval.reference 'evaluate' takes the target's scores from the evaluate stage's "
                          f"'full' variant, but transcoder.target is {tc.target!r}: set transcoder.eval.reference: "
                          "generate")

    def body(sr):
        import pandas as pd
        import pyarrow.parquet as pq

        from rank1_core.generation import GENERATED_COLUMNS
        from rank1_core.grading import grade_samples, recovery
        from rank1_core.models import resolve_model_dir
        from rank1_core.rundir import RunDir
        from rank1_core.transcoder import TranscoderEngineSpec, TranscoderGenerationWorker, count_words, random_control
        from ray_jobs.evaluate import Variant, build_items, load_benchmarks, summarize, write_parquet

        run = RunDir(cfg.run.dir)
        st, tcs, tex = sr.stage, run.stage("transcoder"), run.stage("transcoder_extract")
        ecfg = cfg
        if ev.limit:
            ecfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, limit=ev.limit))
        with sr.timed("benchmarks"):
            benches = load_benchmarks(ecfg)
        hes_tab = pq.read_table(tex.path("hesitation_features.parquet"), filesystem=tex.fs).to_pandas()
        hes = sorted(int(f) for f in hes_tab.loc[hes_tab["selected"], "feature"])
        latents = pq.read_table(tex.path("latents.parquet"), filesystem=tex.fs)
        variants: dict[str, list[int] | None] = {}
        if ev.reference == "generate":
            variants["base"] = None
        variants["transcoder"] = []
        rand: list[int] = []
        if hes:
            variants["transcoder_no_hesitation"] = hes
            if tc.hesitation.random_control:
                rand = random_control(latents, hes_tab["feature"], len(hes), cfg.run.seed)
                variants["transcoder_random_ablated"] = rand
        else:
            print(f"[{STAGE}] no hesitation feature found (transcoder_extract/hesitation_features.parquet): "
                  "only the adapters as trained are benchmarked", flush=True)
        ec = cfg.evaluate
        settings = dict(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, top_p=ec.top_p,
                        n=ec.samples, seed=cfg.run.seed)
        base_dir = str(resolve_model_dir(cfg.model))
        engines = [TranscoderEngineSpec(base_dir, tcs.uri_of("adapter"), variants, settings,
                                        ec.dtype or cfg.model.dtype, ev.batch_size, ev.threads)]
        if ev.reference == "generate":
            tdir, _ = target_spec(cfg)
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
            es = es[es["variant"].isin(["base", "full"])]
            mine = pd.DataFrame([(it["benchmark"], it["problem_id"]) for it in items if it["variant"] == "transcoder"],
                                columns=["benchmark", "problem_id"])
            es = es.merge(mine, on=["benchmark", "problem_id"], how="inner")
            for b in benches:
                want = set(mine[mine["benchmark"] == b]["problem_id"])
                for v in ("base", "full"):
                    have = set(es[(es["variant"] == v) & (es["benchmark"] == b)]["problem_id"])
                    if have != want:
                        raise ConfigError(f"transcoder.eval.reference is 'evaluate' but evaluate/samples.parquet lacks "
                                          f"{len(want - have)} of this stage's {len(want)} problems of {b!r} for variant "
                                          f"{v!r}: run evaluate with variants base and full on at least these problems "
                                          "(evaluate.limit >= transcoder.eval.limit), or set "
                                          "transcoder.eval.reference: generate")
            ref_samples = es
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
        expected = len(items) * ec.samples
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
        samples["lora_mode"] = None
        words = tc.hesitation.words
        samples["hesitations"] = [count_words(r, words) for r in samples["response"]]
        samples = samples.reset_index(drop=True)

        summary = summarize(samples)
        extra = samples.groupby(["variant", "benchmark"]).agg(
            mean_hesitations=("hesitations", "mean"),
            hesitation_rate=("hesitations", lambda h: float((h > 0).mean()))).reset_index()
        summary = summary.merge(extra, on=["variant", "benchmark"], how="left")
        n_abl = {n: (len(v) if v is not None else 0) for e in engines for n, v in e.variants.items()}
        summary["features_ablated"] = summary["variant"].map(n_abl).astype("int64")
        summary["_v"] = summary["variant"].map(order)
        summary = summary.sort_values(["_v", "benchmark"]).drop(columns=["_v"]).reset_index(drop=True)

        if ev.reference == "evaluate":
            ref = summarize(ref_samples)
        else:
            ref = summary[summary["variant"].isin(["base", target_name])].replace({"variant": {target_name: "full"}})
        score = lambda df, v, b: float(df[(df["variant"] == v) & (df["benchmark"] == b)]["pass1"].iloc[0])  # noqa: E731
        rec_rows = []
        for b in benches:
            pb, pf, pt = score(ref, "base", b), score(ref, "full", b), score(summary, "transcoder", b)
            r = recovery(pb, pt, pf)
            rec_rows.append({"benchmark": b, "base": pb, target_name: pf, "transcoder": pt,
                             "recovered_pct": float("nan") if r is None else 100.0 * r,
                             "reference": ev.reference})
        rec = pd.DataFrame(rec_rows)

        hrows = []
        for b in benches:
            t = summary[(summary["variant"] == "transcoder") & (summary["benchmark"] == b)].iloc[0]
            for r in summary[summary["benchmark"] == b].itertuples(index=False):
                hrows.append({"benchmark": b, "variant": r.variant, "features_ablated": int(r.features_ablated),
                              "pass1": float(r.pass1), "stderr": float(r.stderr), "mean_tokens": float(r.mean_tokens),
                              "mean_hesitations": float(r.mean_hesitations),
                              "hesitation_rate": float(r.hesitation_rate), "finished_rate": float(r.finished_rate),
                              "d_tokens": float(r.mean_tokens - t.mean_tokens),
                              "d_hesitations": float(r.mean_hesitations - t.mean_hesitations),
                              "d_pass1": float(r.pass1 - t.pass1)})
        hesitation = pd.DataFrame(hrows)

        write_parquet(st, "samples.parquet", samples)
        write_parquet(st, "summary.parquet", summary)
        st.write_text("recovery.csv", rec.to_csv(index=False))
        st.write_text("recovery.md", _md_table(rec, 4))
        st.write_text("hesitation.csv", hesitation.to_csv(index=False))
        st.write_text("hesitation.md", _md_table(hesitation, 3))
        faith = tcs.read_json("faithfulness.json")
        layers = pq.read_table(tcs.path("faithfulness_layers.parquet"), filesystem=tcs.fs).to_pandas()
        md = [f"# Transcoder adapters: faithfulness to the target ({tc.target})\n",
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
              _md_table(layers[["layer", "fve_difference", "diff_norm", "adapter_norm", "l0", "live_latents"]]),
              "## Benchmark gain recovered\n", _md_table(rec),
              "## Hesitation features ablated\n",
              f"{len(hes)} hesitation features (transcoder_extract/hesitation_features.parquet); control: "
              f"{len(rand)} random live features.\n", _md_table(hesitation, 3)]
        st.write_text("faithfulness.md", "\n".join(md))
        print("\n".join(md), flush=True)
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

    return execute(hash_view(cfg, ("hesitation", "eval")), STAGE, body, upstream=_upstream(cfg), force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
