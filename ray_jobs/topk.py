"""topk: top-k activating contexts and per-feature statistics with DuckDB over the run's Parquet.

    python -m ray_jobs.topk --config configs/demo.yaml

Runs the SQL of `queries/` (doc_summary, topk_hits, topk_contexts, feature_stats) for every
source: adapter components (`extract/activations`), baseline neurons (`extract/neurons`) and,
once the sae stage is done, SAE features (`sae/features`). DuckDB works under
`topk.memory_limit` in an on-disk database in a local temp dir (spilling there), reading one
column of a wide table per pass at scale. Writes `topk/contexts.parquet` and `topk/stats.parquet`.
This is a single process (the driver); DuckDB parallelises it over `topk.threads`.
"""

from __future__ import annotations

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli

STAGE = "topk"


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.rundir import RunDir
    from rank1_core.topk import run_topk

    run_dir = RunDir(cfg.run.dir)
    sources = cfg.topk.sources
    # SAE features are a source when asked for (then the sae stage must be done), or by
    # default when the sae stage has finished; its hash then enters this stage's hash.
    use_sae = ("sae" in sources) if sources is not None else run_dir.stage("sae").is_done()
    # transcoder adapter features likewise, once transcoder_extract is done (its features and
    # extract's tokens must cover the same splits: transcoder.extract.splits = extract.splits).
    use_tc = ("transcoder" in sources) if sources is not None else run_dir.stage("transcoder_extract").is_done()
    upstream = ("extract",) + (("sae",) if use_sae else ()) + (("transcoder_extract",) if use_tc else ())

    def body(sr):
        res = run_topk(run_dir, sr.stage, cfg.topk, sae_done=use_sae, transcoder_done=use_tc,
                       log=lambda m: print(m, flush=True))
        sr.rows.update(res.rows)
        sr.timings.update(res.timings)
        sr.extra["sources"] = res.sources

    return execute(cfg, STAGE, body, upstream=upstream, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
