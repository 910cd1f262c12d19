"""prepare: traces and benchmarks -> tokenized Parquet (runs in the driver; no Ray needed).

    python -m ray_jobs.prepare --config configs/demo.yaml
"""

from __future__ import annotations

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli

STAGE = "prepare"


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.data.prepare import prepare
    from rank1_core.models import load_tokenizer, resolve_model_dir

    def body(sr):
        with sr.timed("model"):
            tok = load_tokenizer(resolve_model_dir(cfg.model))
        with sr.timed("prepare"):
            res = prepare(cfg, sr.stage, tok)
        sr.rows.update(res.rows)
        sr.extra.update(res.extra)

    return execute(cfg, STAGE, body, force=force)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
