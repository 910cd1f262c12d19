"""The "bring your own" inputs of configs/byo.yaml, made offline on the tiny model:

1. chat-format data (`data.path`, JSONL of `messages` rows) converted from the synthetic
   traces, two problems per conversation;
2. a rank-4 LoRA (`train.adapter_path`) trained by rank1 on that data (prepare + train in a
   run of its own, `<adapter_path>.run`), then copied out, to be analysed by
   `rank1 run --config configs/byo.yaml` as if it came from elsewhere.

    python scripts/byo_assets.py --config configs/byo.yaml [key=value ...]

Overrides apply to both the config read here and the training run (e.g. run.dir is not used:
the training run lives beside the adapter). Skips what already exists (--force redoes it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_TRACES = 96
"""Synthetic traces converted to chat (48 two-turn conversations)."""
RANK = 4


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.common import add_config_args, config_from_args, guarded

    p = argparse.ArgumentParser(prog="python scripts/byo_assets.py", description=__doc__.splitlines()[0])
    add_config_args(p)
    args = p.parse_args(argv)

    def go() -> int:
        from rank1_core.config import ConfigError
        from rank1_core.data.sources import synthetic_chat_rows
        from rank1_core.lora import ADAPTER_CONFIG
        from ray_jobs import prepare, train

        cfg = config_from_args(args)
        if cfg.data.source != "chat" or not cfg.train.adapter_path:
            raise ConfigError(f"{args.config}: expected data.source chat and train.adapter_path set")
        data = Path(cfg.data.path)
        if args.force or not data.exists():
            data.parent.mkdir(parents=True, exist_ok=True)
            rows = synthetic_chat_rows(cfg.data, cfg.model, cfg.run.seed + 1, TRAIN_TRACES)
            tmp = data.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(data)
            print(f"wrote {len(rows)} chat rows to {data}", flush=True)
        adapter = Path(cfg.train.adapter_path)
        if args.force or not (adapter / ADAPTER_CONFIG).exists():
            run_dir = adapter.with_name(adapter.name + ".run")
            tcfg = config_from_args(argparse.Namespace(
                config=args.config, run=None,
                overrides=[*args.overrides, f"run.dir={run_dir}", "train.adapter_path=null", f"train.lora.r={RANK}"]))
            prepare.run(tcfg, args.force)
            train.run(tcfg, args.force)
            if adapter.exists():
                shutil.rmtree(adapter)
            shutil.copytree(run_dir / "train" / "adapter", adapter)
            print(f"rank-{RANK} adapter trained by rank1 copied to {adapter}", flush=True)
        return 0

    return guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
