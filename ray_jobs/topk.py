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
    from rank1_core.stages import upstream
    from rank1_core.topk import run_topk

    run_dir = RunDir(cfg.run.dir)
    # SAE and transcoder features are a source when asked for (then their stage must be done),
    # or by default when their stage has finished (rank1_core.stages; their hashes then enter
    # this stage's). transcoder_extract.splits must equal extract.splits (topk reads extract's
    # tokens).
    ups = upstream(cfg, STAGE, run_dir)
    use_sae, use_tc = "sae" in ups, "transcoder_extract" in ups

    def body(sr):
        res = run_topk(run_dir, sr.stage, cfg.topk, sae_done=use_sae, transcoder_done=use_tc,
                       log=lambda m: print(m, flush=True))
        sr.rows.update(res.rows)
        sr.timings.update(res.timings)
        sr.extra["sources"] = res.sources

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
