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


def upstream(cfg: Config) -> tuple[str, ...]:
    sc = cfg.steer
    ups = ["prepare", "train", "topk"]
    if sc.sae_features or sc.auto_sae_features:
        ups.append("sae")
    return tuple(ups)


# --------------------------------------------------------------------------- plan


class Plan:
    """Everything decided before the work starts: targets, conditions, prompts."""

    def __init__(self):
        self.targets: list = []
        self.conditions: list = []
        self.items: list[dict] = []
        self.components: list[str] = []
        self.model_dir = ""
        self.adapter_uri = ""


def _read_parquet(stage, rel: str, what: str, columns=None):
    import pyarrow.parquet as pq

    from rank1_core.steering import SteerError

    if not stage.exists(rel):
        raise SteerError(f"{stage.uri_of(rel)} does not exist ({what}); rerun the {stage.name} stage")
    return pq.read_table(stage.path(rel), columns=columns, filesystem=stage.fs).to_pandas()


def load_prompts(cfg: Config) -> list[dict]:
    """One item per benchmark problem: tokenized generation prompt and the reference answer."""
    from rank1_core.data.format import prompt_text
    from rank1_core.grading import read_benchmark
    from rank1_core.models import load_tokenizer, resolve_model_dir
    from rank1_core.rundir import RunDir
    from rank1_core.steering import SteerError

    prep = RunDir(cfg.run.dir).stage("prepare")
    prepared = [b.name for b in cfg.data.benchmarks]
    names = cfg.steer.benchmarks or prepared
    tok = load_tokenizer(resolve_model_dir(cfg.model))
    items = []
    for n in names:
        if not prep.exists("benchmarks", f"{n}.parquet"):
            raise SteerError(f"steer.benchmarks names {n!r} but {prep.uri_of('benchmarks', n + '.parquet')} "
                                 f"does not exist (prepared: {', '.join(prepared) or 'none'})")
        df = read_benchmark(prep.path("benchmarks", f"{n}.parquet"), prep.fs, cfg.steer.limit)
        for r in df.itertuples(index=False):
            ids = tok(prompt_text(tok, r.question, cfg.model), add_special_tokens=False)["input_ids"]
            items.append({"benchmark": n, "problem_id": str(r.problem_id), "prompt_ids": list(ids),
                          "answer": str(r.answer).strip(), "kind": r.kind, "n_choices": int(r.n_choices)})
    if not items:
        raise SteerError("steer: no benchmark prompts (data.benchmarks is empty)")
    return items


def choose_targets(cfg: Config, adapter_components: list[str]):
    """(targets, component stats, SAE directions) from the config and the upstream stages."""
    from rank1_core.rundir import RunDir
    from rank1_core.steering import (ComponentStats, SteerError, Target, canonical, check_components,
                                     check_sae_features, hesitation_contexts, sae_direction)

    sc = cfg.steer
    run = RunDir(cfg.run.dir)
    topk = run.stage("topk")
    stats_df = _read_parquet(topk, "stats.parquet", "per-feature statistics")
    stats = {}
    for r in stats_df[stats_df["source"] == "adapter"].itertuples(index=False):
        try:
            stats[canonical(r.feature)] = ComponentStats(float(r.mean), float(r.std))
        except ValueError:
            continue
    missing = [c for c in adapter_components if c not in stats]
    if missing:
        raise SteerError(f"{topk.uri_of('stats.parquet')} has no statistics for component {missing[0]} "
                         f"({len(missing)} of {len(adapter_components)} missing): rerun extract and topk "
                         "on this adapter")
    need_ctx = sc.auto_components or sc.auto_sae_features
    contexts = _read_parquet(topk, "contexts.parquet", "top-k contexts",
                             ["source", "feature", "sign", "value", "context_tokens", "hit_index"]) if need_ctx else None
    words, offsets = sc.hesitation_tokens, sc.auto_offsets

    def scores(source):
        """({feature: (n_contexts, n_hesitation)}, ranking DataFrame), or ({}, None) without contexts."""
        if contexts is None:
            return {}, None
        h = hesitation_contexts(contexts, source, words, offsets)
        return {r.feature: (int(r.n_contexts), int(r.n_hesitation)) for r in h.itertuples(index=False)}, h

    targets = []
    comps = check_components(sc.components, adapter_components)
    comp_scores, comp_rank = scores("adapter")
    comp_scores = {canonical(k): v for k, v in comp_scores.items()}
    for c in comps:
        n_ctx, n_h = comp_scores.get(c, (0, 0))
        targets.append(Target(c, "component", "config", stats[c].rms, n_ctx, n_h))
    if sc.auto_components:
        have = set(comps)
        auto = [canonical(f) for f, n in zip(comp_rank["feature"], comp_rank["n_hesitation"]) if n > 0]
        auto = [c for c in auto if c not in have and c in stats][:sc.auto_components]
        if not auto and not comps:
            raise SteerError(
                f"steer.auto_components: no component has a top positive context (topk/contexts.parquet) with "
                f"{' / '.join(words)} at offsets {offsets} from the hit: name components in steer.components, "
                "or widen steer.hesitation_tokens / steer.auto_offsets")
        for c in auto:
            n_ctx, n_h = comp_scores[c]
            targets.append(Target(c, "component", "auto", stats[c].rms, n_ctx, n_h))

    directions = {}
    if sc.sae_features or sc.auto_sae_features:
        from rank1_core.sae import BatchTopKSAE

        sae_st = run.stage("sae")
        latents = _read_parquet(sae_st, "latents.parquet", "SAE latents")
        try:
            sae = BatchTopKSAE.load(sae_st.path(), sae_st.fs)
        except (OSError, ValueError) as e:
            raise SteerError(f"cannot load the SAE from {sae_st.uri()}: {e}") from None
        bad = [c for c in sae.columns if canonical(c) not in set(adapter_components)]
        if bad:
            raise SteerError(f"the SAE's input column {bad[0]!r} is not a component of the trained adapter: "
                             "the sae stage ran on another adapter")
        feats = check_sae_features(sc.sae_features, latents)
        mean_act = {int(r.feature): float(r.mean_act) for r in latents.itertuples(index=False)}
        sae_scores, sae_rank = scores("sae")
        chosen = [(f, n, "config") for f, n in zip(feats, sc.sae_features)]
        if sc.auto_sae_features:
            live = set(latents.loc[latents["live"], "name"])
            if sae_rank is None or not (sae_rank["feature"].isin(live) & (sae_rank["n_hesitation"] > 0)).any():
                if not chosen and not targets:
                    raise SteerError("steer.auto_sae_features: no live SAE feature has a top positive context with "
                                     f"{' / '.join(words)} (was topk run after sae?)")
            else:
                names = [f for f, n in zip(sae_rank["feature"], sae_rank["n_hesitation"])
                         if n > 0 and f in live and f not in sc.sae_features][:sc.auto_sae_features]
                for n in names:
                    chosen.append((check_sae_features([n], latents)[0], n, "auto"))
        for f, n, how in chosen:
            directions[n] = sae_direction(sae, f)
            n_ctx, n_h = sae_scores.get(n, (0, 0))
            targets.append(Target(n, "sae", how, mean_act[f], n_ctx, n_h))
    if not targets:
        raise SteerError("steer: no target was chosen (see steer.components, steer.sae_features, "
                         "steer.auto_components, steer.auto_sae_features)")
    return targets, stats, directions


def build_conditions(cfg: Config, targets, stats, directions, components: list[str]):
    """The unsteered condition, every target condition and its random controls."""
    from rank1_core.steering import (component_condition, component_magnitude, random_condition,
                                     random_direction, sae_condition, state_norm, unsteered)

    sc = cfg.steer
    weights = {c: stats[c].rms for c in components} if sc.random_space == "normalized" else None
    rand = [random_direction(components, s, cfg.run.seed, weights) for s in range(sc.random_seeds)]
    conds = [unsteered(sc.after)]
    for t in targets:
        for mode in (sc.modes if t.kind == "component" else ["add"]):
            for a in sc.alphas:
                if t.kind == "component":
                    c = component_condition(t.name, mode, a, stats[t.name], sc.after)
                    m = component_magnitude(mode, a, stats[t.name])
                else:
                    c = sae_condition(t.name, directions[t.name], a, t.typical, sc.after)
                    m = a * t.typical * math.sqrt(sum(v * v for v in directions[t.name].values()))
                conds.append(c)
                for s, u in enumerate(rand):
                    r = random_condition(u, s, m, c)
                    assert abs(state_norm(r) - abs(m)) <= 1e-9 * max(1.0, abs(m))
                    conds.append(r)
    ids = [c.id for c in conds]
    assert len(set(ids)) == len(ids), "steering condition ids collide"
    return conds


def plan_steering(cfg: Config) -> Plan:
    """Check every input and target, and lay out the work, before anything runs."""
    from rank1_core.lora import saved_components
    from rank1_core.models import resolve_model_dir
    from rank1_core.rundir import RunDir
    from rank1_core.steering import canonical

    run = RunDir(cfg.run.dir)
    for u in upstream(cfg):
        run.stage(u).require_done()
    plan = Plan()
    train = run.stage("train")
    with train.local_copy("adapter") as adapter:
        plan.components = [canonical(c) for c in saved_components(adapter)]
    plan.targets, stats, directions = choose_targets(cfg, plan.components)
    plan.conditions = build_conditions(cfg, plan.targets, stats, directions, plan.components)
    plan.items = load_prompts(cfg)
    plan.model_dir = str(resolve_model_dir(cfg.model))
    plan.adapter_uri = train.uri_of("adapter")
    return plan


# --------------------------------------------------------------------------- work


def units(conditions, items: list[dict], batch_size: int, baseline: dict | None = None) -> list[dict]:
    """(condition x batch of prompts) work units; `baseline` (problem key -> unsteered token ids)
    is attached to each item for the teacher-forced KL."""
    out = []
    for c in conditions:
        for i in range(0, len(items), batch_size):
            part = []
            for it in items[i:i + batch_size]:
                it = dict(it)
                it["baseline_ids"] = None if baseline is None else baseline[(it["benchmark"], it["problem_id"])]
                part.append(it)
            out.append({"condition": c.to_dict(), "items": part})
    return out


def run_units(ray, actors: list, work: list[dict], progress=None) -> list[dict]:
    from ray.util import ActorPool

    pool = ActorPool(actors)
    rows: list[dict] = []
    for res in pool.map_unordered(lambda a, u: a.run.remote(u), work):
        rows.extend(res)
        if progress is not None:
            progress.update(len(res), tokens=sum(r["n_tokens"] for r in res))
    return rows


def summary_markdown(results, targets) -> str:
    """Per target: each alpha's hesitation rate / accuracy / KL beside the random band."""
    from rank1_core.report.tables import md_escape

    base = results[results["target_kind"] == "none"].iloc[0]
    lines = [f"Unsteered: hesitation {base.hesitation_rate:.2f}/100 tokens, length {base.mean_length:.1f}, "
             f"accuracy {base.accuracy:.3f} (n = {int(base.n)})", ""]
    for t in targets:
        own = results[(results["target"] == t.name) & (results["target_kind"] != "random")]
        rnd = results[(results["target"] == t.name) & (results["target_kind"] == "random")]
        lines.append(f"### {md_escape(t.name)} ({md_escape(t.kind)}, chosen by {md_escape(t.chosen_by)}; "
                     f"typical {t.typical:.3g}; "
                     f"{t.n_hesitation}/{t.n_contexts} top contexts hit a hesitation word)")
        lines.append("")
        lines.append("| mode | alpha | hesitation /100 tok | random band | length | accuracy | random band | KL | random band |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in own.sort_values(["mode", "alpha"]).itertuples():
            b = rnd[(rnd["mode"] == r.mode) & (rnd["alpha"] == r.alpha)]

            def band(col, fmt):
                return f"{fmt.format(b[col].min())}–{fmt.format(b[col].max())}" if len(b) else "n/a"

            lines.append(f"| {r.mode} | {r.alpha:g} | {r.hesitation_rate:.2f} | {band('hesitation_rate', '{:.2f}')} | "
                         f"{r.mean_length:.1f} | {r.accuracy:.3f} | {band('accuracy', '{:.3f}')} | "
                         f"{r.kl_mean:.3g} | {band('kl_mean', '{:.3g}')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run(cfg: Config, force: bool = False) -> dict:
    import tempfile
    from pathlib import Path

    import pandas as pd

    from rank1_core.steering import SAMPLE_COLUMNS, SteerWorker, WorkerSpec, aggregate, figure_name, plot_target
    from ray_jobs.evaluate import write_parquet
    from ray_jobs.progress import Progress

    sc = cfg.steer
    plan = plan_steering(cfg)  # bad targets fail here, before the stage folder or Ray is touched
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
        samples = pd.DataFrame(base_rows + rows, columns=SAMPLE_COLUMNS)
        order = {(it["benchmark"], it["problem_id"]): i for i, it in enumerate(plan.items)}
        cidx = {c.id: i for i, c in enumerate(plan.conditions)}
        samples["_c"] = samples["condition"].map(cidx)
        samples["_p"] = [order[(b, p)] for b, p in zip(samples["benchmark"], samples["problem_id"])]
        samples = samples.sort_values(["_c", "_p"]).drop(columns=["_c", "_p"]).reset_index(drop=True)
        expected = len(plan.items) * len(plan.conditions)
        if len(samples) != expected:
            raise RuntimeError(f"steering returned {len(samples)} samples, expected {expected}")
        results = aggregate(samples, plan.conditions)
        write_parquet(st, "samples.parquet", samples)
        write_parquet(st, "results.parquet", results)
        tdf = pd.DataFrame([{"target": t.name, "kind": t.kind, "source": "adapter" if t.kind == "component" else "sae",
                             "chosen_by": t.chosen_by, "typical": t.typical, "n_contexts": t.n_contexts,
                             "n_hesitation": t.n_hesitation,
                             "figure": "figures/" + figure_name("adapter" if t.kind == "component" else "sae", t.name)}
                            for t in plan.targets])
        write_parquet(st, "targets.parquet", tdf)
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

    return execute(cfg, STAGE, body, upstream=upstream(cfg), force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
