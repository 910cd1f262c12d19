"""steer: do single adapter directions cause what they fire on? A sweep over steering strengths.

    python -m ray_jobs.steer --config configs/demo.yaml
    rank1 steer --config configs/tiny.yaml steer.components=[L00_gate_proj] steer.alphas=[0,1,100]

1. Targets (checked before any work starts): `steer.components` and `steer.sae_features` by
   name, plus the `steer.auto_components` (and `auto_sae_features`) whose top positive
   contexts (topk/contexts.parquet) most often hit a hesitation word ("Wait", "Hmm") at the
   hit token or the next one. An unknown component, a feature that is not live, or an
   automatic choice that finds nothing fails with an error naming what exists.
2. Conditions: the unsteered model; every target x mode x alpha (`rank1_core.steering`); and
   per seed a random direction of the adapter state pushed exactly as far as each target
   condition (the control). A random control of norm 0 (scale alpha 1, add alpha 0) is the
   unsteered model by construction and reuses its samples.
3. Work units (one condition on one batch of `steer.batch_size` benchmark prompts) run on
   `steer.actors` Ray actors, each holding base model + adapter (transformers + peft, greedy,
   hooks on lora_A): first the unsteered model, whose responses the KL is teacher-forced on,
   then every steered condition.

Leaves in `steer/`:
- `results.parquet`: one row per condition (`rank1_core.steering.RESULT_COLUMNS`): condition,
  target, target_kind (component | sae | random | none), source (adapter | sae), mode, alpha,
  seed (random controls), after, typical, perturbation_rms, n, n_tokens, hesitation_count,
  hesitation_rate (per 100 generated tokens), mean_length, accuracy, accuracy_stderr, kl_mean,
  kl_max, kl_tokens, finished_rate, marker_rate, identical_rate (share of responses equal to
  the unsteered ones token for token).
- `samples.parquet`: one row per (condition, prompt): response, token_ids, n_tokens,
  correct, hesitations, kl_sum / kl_max / kl_tokens, identical, ...
- `targets.parquet`: target, kind, source, chosen_by (config | auto), typical, n_contexts,
  n_hesitation (its top positive contexts, and how many hit a hesitation word), figure.
- `figures/<source>_<target>.png`: the measures vs alpha per steered feature, with the
  random-direction band; `summary.md`: the same numbers as a table.
"""

from __future__ import annotations

import math

from rank1_core.config import Config
from ray_jobs.common import ensure_ray, execute, stage_cli

STAGE = "steer"


def run_units(ray, actors: list, work: list[dict], progress=None) -> list[dict]:
    from ray.util import ActorPool

    pool = ActorPool(actors)
    rows: list[dict] = []
    for res in pool.map_unordered(lambda a, u: a.run.remote(u), work):
        rows.extend(res)
        if progress is not None:
            progress.update(len(res), tokens=sum(r["n_tokens"] for r in res))
    return rows


def run(cfg: Config, force: bool = False) -> dict:
    import tempfile
    from pathlib import Path

    import pandas as pd

    from rank1_core.steering import SAMPLE_COLUMNS, SteerWorker, WorkerSpec, aggregate, plot_target
    from rank1_core.stages import upstream
    from rank1_core.steering_plan import order_samples, plan_steering, summary_markdown, targets_table, units
    from ray_jobs.progress import Progress

    sc = cfg.steer
    plan = plan_steering(cfg, upstream(cfg, STAGE))  # bad targets fail here, before the stage folder or Ray is touched
    print("[steer] targets: " + ", ".join(f"{t.name} ({t.kind}, {t.chosen_by}, {t.n_hesitation}/{t.n_contexts} "
                                           f"hesitation contexts)" for t in plan.targets), flush=True)

    def body(sr):
        st = sr.stage
        base_cond, *rest = plan.conditions
        reuse = [c for c in rest if c.target_kind == "random" and c.identity]
        todo = [c for c in rest if not (c.target_kind == "random" and c.identity)]
        spec = WorkerSpec(model_dir=plan.model_dir, adapter_dir=plan.adapter_uri, dtype=sc.dtype or cfg.model.dtype,
                          max_new_tokens=sc.max_new_tokens, batch_size=sc.batch_size, threads=sc.threads,
                          answer_marker=cfg.model.answer_marker, tail_chars=sc.tail_chars,
                          missing_marker=sc.missing_marker,
                          hesitation_tokens=list(sc.hesitation_tokens))
        ray = ensure_ray(cfg)
        Actor = ray.remote(num_cpus=sc.actor_cpus, max_restarts=1, max_task_retries=1)(SteerWorker)
        n_units = math.ceil(len(plan.items) / sc.batch_size)
        actors = [Actor.remote(spec.to_dict()) for _ in range(min(sc.actors, n_units * max(1, len(todo))))]
        try:
            total = len(plan.items) * (1 + len(todo))
            with Progress(STAGE, total=total, main="samples", unit="sample") as p:
                with sr.timed("unsteered"):
                    base_rows = run_units(ray, actors, units([base_cond], plan.items, sc.batch_size), p)
                baseline = {(r["benchmark"], r["problem_id"]): r["token_ids"] for r in base_rows}
                with sr.timed("steered"):
                    rows = run_units(ray, actors, units(todo, plan.items, sc.batch_size, baseline), p)
        finally:
            try:  # let each actor free its model and temp files before it goes
                ray.get([a.close.remote() for a in actors], timeout=60)
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to close
                pass
            for a in actors:
                ray.kill(a)
        for c in reuse:  # adding 0 x a random direction is the unsteered model, exactly
            rows.extend({**r, "condition": c.id} for r in base_rows)
        samples = order_samples(pd.DataFrame(base_rows + rows, columns=SAMPLE_COLUMNS), plan)
        results = aggregate(samples, plan.conditions)
        st.write_dataframe("samples.parquet", samples)
        st.write_dataframe("results.parquet", results)
        tdf = targets_table(plan.targets)
        st.write_dataframe("targets.parquet", tdf)
        with sr.timed("figures"), tempfile.TemporaryDirectory() as tmp:
            for t in tdf.itertuples():
                plot_target(results, t.target, Path(tmp) / Path(t.figure).name, dpi=sc.figure_dpi)
            st.upload_dir(tmp, "figures")
        md = summary_markdown(results, plan.targets)
        st.write_text("summary.md", md)
        print(md, flush=True)
        gen_tokens = int(samples["n_tokens"].sum())
        secs = sum(v for k, v in sr.timings.items() if k in ("unsteered", "steered"))
        sr.rows.update({"results": len(results), "samples": len(samples), "targets": len(tdf),
                        "figures": len(tdf)})
        sr.extra.update({
            "targets": tdf.drop(columns=["figure"]).to_dict("records"),
            "conditions": len(plan.conditions), "generated_conditions": 1 + len(todo),
            "reused_conditions": len(reuse), "prompts": len(plan.items),
            "work_units": n_units * (1 + len(todo)), "actors": len(actors),
            "generated_tokens": gen_tokens - len(reuse) * int(pd.Series([r["n_tokens"] for r in base_rows]).sum()),
        })
        if secs:
            sr.extra["generated_tokens_per_s"] = round(sr.extra["generated_tokens"] / secs, 1)

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
