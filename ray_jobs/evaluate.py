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

from rank1_core.config import Config
from ray_jobs.common import execute, generate_and_grade, stage_cli

STAGE = "evaluate"


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.benchmarks import load_benchmarks, summarize, variant_specs
    from rank1_core.grading import table1, table1_markdown

    ec = cfg.evaluate

    def body(sr):
        variants = variant_specs(cfg, ec.variants)
        with sr.timed("benchmarks"):
            benches = load_benchmarks(cfg)
        samples = generate_and_grade(cfg, variants, benches, sr)
        summary = summarize(samples)
        t1 = table1(summary, list(benches))
        sr.stage.write_dataframe("samples.parquet", samples)
        sr.stage.write_dataframe("summary.parquet", summary)
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

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
