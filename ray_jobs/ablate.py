"""ablate: KL of every adapter component and layer ablated (Figure 1), group ablations (Table 2).

    python -m ray_jobs.ablate --config configs/demo.yaml

1. KL(ablated || full adapter), teacher-forced on the held-out traces of `prepare/tokens`
   and averaged over their assistant tokens, for every component, every whole layer and
   every configured group. Traces are sharded across `ablate.actors` Ray Data actors
   (`rank1_core.ablation.KLWorker`); each pass of an actor stacks up to
   `ablate.ablations_per_pass` ablations of `ablate.batch_docs` traces and restarts at the
   first ablated layer from the reference pass (see rank1_core/ablation.py).
2. Each group (default: all attention adapters, all MLP adapters) is written as an ordinary
   peft adapter with its lora_A zeroed (`adapters/<group>/`) and benchmarked through the
   evaluate stage's machinery (same backend, sampling and budget) as variant
   `<group>_ablated`; Table 2 relates each score x to the evaluate stage's base b and LoRA l:
   (x - b) / (l - b).

Leaves in `ablate/`:
- `kl_components.parquet`: column (`L{layer:02d}_{module}`, rank r: one row per direction
  `L{layer:02d}_{module}_r{i}`), layer, module, kind (mlp | attn), kl_mean, kl_sem, kl_max,
  n_tokens, n_docs.
- `kl_modules.parquet` (rank r > 1 only): the same columns, all r directions of each module
  ablated together (column `L{layer:02d}_{module}`).
- `kl_layers.parquet`: layer, kl_mean, kl_sem, kl_max, n_tokens, n_docs.
- `kl_rows.parquet`: the per-(ablation, trace) sums the means come from.
- `groups.parquet`: group, benchmark, n_components, kl_mean, kl_sem, n_problems, n_samples,
  pass1, stderr, base, lora, relative (NaN when undefined).
- `table2.md`, `table2.csv`; `samples.parquet` (the groups' graded samples, evaluate's schema);
  `adapters/<group>/` (peft adapters).
"""

from __future__ import annotations

from rank1_core.config import Config
from ray_jobs.common import ensure_ray, execute, generate_and_grade, stage_cli
from ray_jobs.progress import Progress

STAGE = "ablate"


def compute_kl(cfg: Config, model_dir: str, adapter_uri: str, ablations, docs: list[dict]):
    """Per-(ablation, trace) KL rows from Ray Data actors."""
    from rank1_core.ablation import KLWorker

    ac = cfg.ablate
    ray = ensure_ray(cfg)
    blocks = max(1, min(len(docs), -(-len(docs) // ac.batch_docs)))
    ds = ray.data.from_items(docs, override_num_blocks=blocks)
    ds = ds.map_batches(
        KLWorker,
        fn_constructor_kwargs=dict(model_dir=model_dir, adapter_dir=adapter_uri,
                                   ablations=[a.to_dict() for a in ablations], dtype=ac.dtype or cfg.model.dtype,
                                   batch_docs=ac.batch_docs, ablations_per_pass=ac.ablations_per_pass,
                                   threads=ac.threads),
        batch_size=ac.batch_docs, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=ac.actors),
        num_cpus=ac.actor_cpus, num_gpus=ac.actor_gpus or None)
    rows = []
    with Progress(STAGE, total=len(docs) * len(ablations), main="ablations", unit="abl") as p:
        for r in ds.iter_rows():
            rows.append(r)
            p.update(1)
    return rows


def run(cfg: Config, force: bool = False) -> dict:
    import tempfile

    import pandas as pd

    from rank1_core.ablation import (aggregate, group_table, heldout_docs, kl_summary, kl_tables, plan_ablations,
                                     write_ablated_adapter)
    from rank1_core.benchmarks import Variant, load_benchmarks, summarize
    from rank1_core.grading import table2, table2_markdown
    from rank1_core.lora import saved_components
    from rank1_core.models import resolve_model_dir
    from rank1_core.rundir import RunDir

    ac = cfg.ablate
    bench_groups = ac.benchmark_groups and bool(ac.groups)
    if bench_groups and not {"base", "lora"} <= set(cfg.evaluate.variants):
        from rank1_core.config import ConfigError

        raise ConfigError("ablate.benchmark_groups needs evaluate.variants to include base and lora "
                          f"(Table 2 relates each group to both); got {cfg.evaluate.variants}")

    def body(sr):
        run = RunDir(cfg.run.dir)
        st, train = sr.stage, run.stage("train")
        model_dir = str(resolve_model_dir(cfg.model))
        with sr.timed("plan"), train.local_copy("adapter") as adapter, tempfile.TemporaryDirectory() as tmp:
            comps = saved_components(adapter)
            groups = [(g.name, g.modules, g.layers) for g in ac.groups]
            ablations = plan_ablations(comps, per_component=ac.components, per_layer=ac.layers, groups=groups)
            for g in ac.groups:
                # An ordinary peft adapter with the group's lora_A zeroed: any LoRA server runs it.
                members = next(a.components for a in ablations if a.name == g.name)
                write_ablated_adapter(adapter, members, f"{tmp}/{g.name}")
                st.upload_dir(f"{tmp}/{g.name}", f"adapters/{g.name}")
            docs = heldout_docs(cfg)
        with sr.timed("kl"):
            rows = compute_kl(cfg, model_dir, train.uri_of("adapter"), ablations, docs)
        kl_rows = pd.DataFrame(rows)
        agg = aggregate(rows, ablations)
        comps_t, layers_t, groups_kl = kl_tables(agg)
        st.write_dataframe("kl_rows.parquet", kl_rows)
        st.write_dataframe("kl_components.parquet", comps_t)
        st.write_dataframe("kl_layers.parquet", layers_t)
        if (agg["kind"] == "module").any():  # rank r > 1: each module's r directions ablated together
            modules_t = kl_tables(agg, "module")[0]
            st.write_dataframe("kl_modules.parquet", modules_t)
            sr.rows["kl_modules"] = len(modules_t)
        text = kl_summary(comps_t, layers_t, ac.top)
        print(text, flush=True)
        sr.rows.update({"kl_components": len(comps_t), "kl_layers": len(layers_t), "kl_rows": len(kl_rows)})
        sr.extra.update({"heldout_docs": len(docs), "scored_tokens": int(agg["n_tokens"].max()),
                         "ablations": len(ablations)})

        groups_out = groups_kl.copy()
        if bench_groups:
            benches = load_benchmarks(cfg)
            variants = [Variant(f"{g.name}_ablated", model_dir, st.uri_of("adapters", g.name)) for g in ac.groups]
            samples = generate_and_grade(cfg, variants, benches, sr, tag="benchmark")
            st.write_dataframe("samples.parquet", samples)
            base_lora = pd.read_parquet(run.stage("evaluate").path("summary.parquet"), filesystem=run.fs)
            base_lora = base_lora[base_lora["variant"].isin(["base", "lora"])]
            summary = pd.concat([base_lora, summarize(samples)], ignore_index=True)
            names = [g.name for g in ac.groups]
            t2 = table2(summary, names, list(benches))
            st.write_text("table2.csv", t2.to_csv(index=False))
            md = table2_markdown(t2, names)
            st.write_text("table2.md", md)
            print(md, flush=True)
            groups_out = group_table(groups_kl, t2, summary, names)
            sr.rows["samples"] = len(samples)
        st.write_dataframe("groups.parquet", groups_out)
        sr.rows["groups"] = len(groups_out)

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
