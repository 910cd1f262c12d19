"""train_full: the full-parameter fine-tune baseline (same data, loss and loop as `train`).

    python -m ray_jobs.train_full --config configs/demo.yaml

Uses `train.full.lr`, `train.full.epochs` and `train.full.strategy`; everything else comes
from `train`. Leaves `model/` (a Hugging Face model directory with the tokenizer, loadable by
transformers, `rank1_core.models.load_model` and vLLM), `metrics.parquet` and
`checkpoints/`, like `ray_jobs.train`.
"""

from __future__ import annotations

from rank1_core.config import Config
from ray_jobs.common import execute, stage_cli
from ray_jobs.harness import training_body

STAGE = "train_full"


def run(cfg: Config, force: bool = False) -> dict:
    return execute(cfg, STAGE, training_body(cfg, "full"), force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
