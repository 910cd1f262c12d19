"""concepts: ground-truth concept labels on every token, and every feature scored against them.

    python -m ray_jobs.concepts --config configs/demo.yaml
    rank1 concepts --config configs/demo.yaml

Labels come from prepare's spans (the synthetic generator's planted concepts and the
think/answer sections), `concepts.lexical` (words / regexes over the decoded text) and
`concepts.sql` (queries returning doc_id, pos); every feature of every source (adapter
components, baseline neurons, SAE and transcoder features once their stages are done) gets
an AUROC and a top-k precision per concept, beside random directions and shuffled labels
(`rank1_core.concepts`). Writes `concepts/{labels,catalogue,scores,features,summary,best}
.parquet` (and `explanations.parquet` when autointerp ran) and prints the table.

Runs in the driver, without Ray: one process streams the activation columns with NumPy
(no shuffle, nothing to distribute at this size; see benchmarks/bench_concepts.py). The
labels are built and checked before the stage folder is cleared, so a bad concept (a query
that fails, positions outside the documents) leaves an earlier concepts output in place.
"""

from __future__ import annotations

from rank1_core.config import Config, section_hash
from ray_jobs.common import execute, stage_cli

STAGE = "concepts"


def run(cfg: Config, force: bool = False) -> dict:
    import pyarrow.parquet as pq

    from rank1_core import concepts as K
    from rank1_core.rundir import RunDir, chained_hash
    from rank1_core.stages import upstream as stage_inputs

    cc = cfg.concepts
    run_dir = RunDir(cfg.run.dir)
    upstream = stage_inputs(cfg, STAGE, run_dir)
    log = lambda m: print(m, flush=True)  # noqa: E731
    ups = [run_dir.stage(u) for u in upstream]
    labels = None
    if force or not run_dir.stage(STAGE).is_done(chained_hash(section_hash(cfg, STAGE), ups)):
        for u in ups:
            u.require_done()
        labels = K.build_labels(run_dir, cc, log)  # before the folder is cleared

    def body(sr):
        st = sr.stage
        lab = labels if labels is not None else K.build_labels(run_dir, cc, log)
        with sr.timed("labels"):
            st.write_parquet("catalogue.parquet", K.catalogue_table(lab))
            sr.rows["labels"] = K.write_labels(st, lab)
        with sr.timed("score"):
            res = K.score_run(run_dir, lab, cc, sae_done="sae" in upstream,
                              transcoder_done="transcoder_extract" in upstream, log=log)
        names = [c.name for c in lab.scored]
        with sr.timed("write"):
            features = K.features_table(res.scores, names, cc)
            summary = K.summary_table(res.scores, features, res.sources, cc)
            best = K.best_table(res.scores, names, res.sources)
            for rel, table in (("scores.parquet", K.scores_table(res.scores, names)), ("features.parquet", features),
                               ("summary.parquet", summary), ("best.parquet", best)):
                st.write_parquet(rel, table, compression="zstd")
        ai = run_dir.stage("autointerp")
        if "autointerp" in upstream and ai.exists("explanations.parquet"):
            expl = pq.read_table(ai.path("explanations.parquet"), filesystem=ai.fs).to_pandas()
            check = K.explanation_check(expl, features, cc)
            st.write_parquet("explanations.parquet", check)
            acc = K.explanation_accuracy(check)
            sr.extra["explanation_accuracy"] = acc
            sr.rows["explanations_checked"] = check.num_rows
            for a in acc:
                log(f"[concepts] explanations by {a['model']}: {a['names_concept']}/{a['clean_explained']} clean "
                    f"features' explanations name their concept ({a['copied']} copied the prompt)")
        log(K.format_summary(summary, best, cc))
        sr.rows.update({"tokens": lab.index.n, "docs": len(lab.index.doc_ids), "concepts": len(lab.concepts),
                        "concepts_scored": len(names), **res.rows})
        sr.timings.update({f"score_{k}": v for k, v in res.timings.items()})
        sr.extra.update({
            "sources": res.sources,
            "concepts": {c.name: {"kind": c.kind, "tokens": int(len(c.tokens))} for c in lab.concepts},
            "empty_concepts": [c.name for c in lab.concepts if len(c.tokens) == 0],
            "warnings": lab.messages,
            "thresholds": {"clean_auroc": cc.clean_auroc, "clean_precision": cc.clean_precision,
                           "broad_auroc": cc.broad_auroc, "k": cc.k},
            "summary": summary.to_pylist(),
        })

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
