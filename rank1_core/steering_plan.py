"""The steer stage's decisions, made before any work runs, and its tables, made after:
targets (by name, and the components / SAE features whose top contexts hit a hesitation word),
conditions (`rank1_core.steering`'s unsteered, target and random-control conditions), the
benchmark prompts (`rank1_core.benchmarks`), the work units the actors run, the samples'
order, the targets table and the summary markdown. No `ray` here: `ray_jobs/steer.py` runs
the units on `SteerWorker` actors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rank1_core.steering import (ComponentStats, SteerError, Target, canonical, check_components,
                                 check_sae_features, component_condition, component_magnitude, figure_name,
                                 hesitation_contexts, random_condition, random_direction, sae_condition,
                                 sae_direction, state_norm, unsteered)

if TYPE_CHECKING:
    from rank1_core.config import Config

TARGET_COLUMNS = ["target", "kind", "source", "chosen_by", "typical", "n_contexts", "n_hesitation", "figure"]


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

    if not stage.exists(rel):
        raise SteerError(f"{stage.uri_of(rel)} does not exist ({what}); rerun the {stage.name} stage")
    return pq.read_table(stage.path(rel), columns=columns, filesystem=stage.fs).to_pandas()


def load_prompts(cfg: Config) -> list[dict]:
    """One item per problem of `steer.benchmarks` (first `steer.limit`): the tokenized
    generation prompt and the reference answer (`rank1_core.benchmarks.problem_items`)."""
    from rank1_core.benchmarks import load_benchmarks, problem_items

    benches = load_benchmarks(cfg, "steer", SteerError, "steer: no benchmark prompts (data.benchmarks is empty)")
    return problem_items(cfg, benches)["think"]


def choose_targets(cfg: Config, adapter_components: list[str]):
    """(targets, component stats, SAE directions) from the config and the upstream stages."""
    from rank1_core.rundir import RunDir

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


def plan_steering(cfg: Config, inputs: tuple[str, ...]) -> Plan:
    """Check every input (the stages `inputs` must be done) and target, and lay out the work,
    before anything runs."""
    from rank1_core.lora import saved_components
    from rank1_core.models import resolve_model_dir
    from rank1_core.rundir import RunDir

    run = RunDir(cfg.run.dir)
    for u in inputs:
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


def target_source(t: Target) -> str:
    return "adapter" if t.kind == "component" else "sae"


def targets_table(targets):
    """targets.parquet: one row per target (TARGET_COLUMNS)."""
    import pandas as pd

    return pd.DataFrame([{"target": t.name, "kind": t.kind, "source": target_source(t), "chosen_by": t.chosen_by,
                          "typical": t.typical, "n_contexts": t.n_contexts, "n_hesitation": t.n_hesitation,
                          "figure": "figures/" + figure_name(target_source(t), t.name)} for t in targets],
                        columns=TARGET_COLUMNS)


def order_samples(samples, plan: Plan):
    """Sample rows in the order of the plan's conditions and prompts; a missing or extra row is an error."""
    order = {(it["benchmark"], it["problem_id"]): i for i, it in enumerate(plan.items)}
    cidx = {c.id: i for i, c in enumerate(plan.conditions)}
    samples["_c"] = samples["condition"].map(cidx)
    samples["_p"] = [order[(b, p)] for b, p in zip(samples["benchmark"], samples["problem_id"])]
    samples = samples.sort_values(["_c", "_p"]).drop(columns=["_c", "_p"]).reset_index(drop=True)
    expected = len(plan.items) * len(plan.conditions)
    if len(samples) != expected:
        raise RuntimeError(f"steering returned {len(samples)} samples, expected {expected}")
    return samples


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
