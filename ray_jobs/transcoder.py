"""transcoder: transcoder adapters on Ray Train (a second lens on what fine-tuning changed).

    python -m ray_jobs.transcoder --config configs/demo.yaml
    python -m ray_jobs.transcoder --config configs/tiny.yaml transcoder.num_workers=2 transcoder.cpus_per_worker=1

`ray_jobs.harness.fit` trains `rank1_core.transcoder.job` on `transcoder.num_workers` Ray Train
workers (DDP over gloo on CPU / nccl on GPU): the frozen base model (model.name) with a sparse branch
per MLP layer, trained on the training traces of `prepare/tokens` so that it matches the
frozen target (`transcoder.target`: the train_full stage's model, or any model directory of
the same architecture). At the end rank 0 measures faithfulness on the held-out traces.
Leaves in the stage folder:

- `adapter/`: `cfg.json` + `transcoder.safetensors` (`TranscoderAdapter.load(dir)`;
  `.install(model)` puts it on a base model).
- `metrics.parquet`: step, epoch, loss, kl, recon (mean per-layer FVU), sparsity, l0, fve,
  lr, grad_norm, tokens, tokens_per_s, wall; `train_state.json`: where training ended.
- `faithfulness.json` (also the manifest's `extra.faithfulness`): kl_adapted = KL(target ||
  base + adapters), kl_base = KL(target || base), kl_closed, cross-entropies, top-1
  agreement, mean explained variance of the MLP difference, L0, live latents.
- `faithfulness_layers.parquet`: per layer: fve_difference, fvu_difference, diff_norm,
  adapter_norm, l0, live_latents.
- `checkpoints/ray_train/`: Ray Train checkpoints; a crashed stage rerun with the same config
  resumes from the last one.

The stage hash covers `model` and `transcoder` (transcoder_extract and transcoder_eval have
sections of their own, so tuning those never retrains), chained with prepare's (and
train_full's when it is the target): `rank1_core.stages`.
"""

from __future__ import annotations

import json
from pathlib import Path

from rank1_core.config import Config, ConfigError
from ray_jobs.common import execute, stage_cli

STAGE = "transcoder"


def validate(cfg: Config) -> int:
    """Check transcoder.layers and k against the base model's shape (no weights); returns the
    layer count."""
    from rank1_core.models import meta_model

    hf = meta_model(cfg.model).config
    n, d = int(hf.num_hidden_layers), int(hf.hidden_size)
    tc = cfg.transcoder
    bad = [i for i in (tc.layers or []) if i >= n]
    if bad:
        raise ConfigError(f"transcoder.layers: layer {bad[0]} is out of range: model {cfg.model.name!r} has {n} "
                          f"layers (valid: 0..{n - 1})")
    if tc.k > tc.expansion * d:
        raise ConfigError(f"transcoder.k ({tc.k}) exceeds the latents per layer (expansion {tc.expansion} x hidden "
                          f"{d} = {tc.expansion * d})")
    return n


def check_target_shape(base_dir: str, target_dir: str) -> None:
    """Base and target must share layers, hidden size and vocabulary (config.json only)."""
    def shape(p: str) -> tuple:
        c = json.loads((Path(p) / "config.json").read_text())
        c = c.get("text_config", c)
        return c.get("num_hidden_layers"), c.get("hidden_size"), c.get("intermediate_size"), c.get("vocab_size")

    if "://" in target_dir or not (Path(target_dir) / "config.json").exists():
        return  # checked again by the workers once loaded
    b, t = shape(base_dir), shape(target_dir)
    if b != t:
        raise ConfigError(f"transcoder.target {target_dir} does not match the base model {base_dir}: (layers, hidden, "
                          f"intermediate, vocab) = {t} vs {b}")


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.models import resolve_model_dir
    from rank1_core.transcoder import target_model

    tc = cfg.transcoder
    validate(cfg)
    base_dir = str(resolve_model_dir(cfg.model))
    target_dir = target_model(cfg)
    check_target_shape(base_dir, target_dir)

    def body(sr):
        import pyarrow.parquet as pq

        from rank1_core.rundir import RunDir
        from ray_jobs.harness import fit

        stage = sr.stage
        tokens = RunDir(cfg.run.dir).stage("prepare").uri_of("tokens")
        args = {"config": cfg.to_dict(), "base_dir": base_dir, "target_dir": target_dir, "tokens": tokens}
        state = fit(sr, cfg, tc, "rank1_core.transcoder:job", args)
        faith = stage.read_json("faithfulness.json")
        with stage.fs.open_input_file(stage.path("faithfulness_layers.parquet")) as f:
            layers = pq.read_table(f)
        steps = state.history
        sr.rows.update({"steps": state.step, "tokens": state.tokens, "layers": layers.num_rows,
                        "latents": int(faith["latents"])})
        sr.extra.update({"faithfulness": faith, "workers": tc.num_workers, "resumed_from": state.resumed_from,
                         "target_dir": target_dir,
                         "mean_tokens_per_s": (sum(r["tokens"] for r in steps) /
                                               sum(r["tokens"] / r["tokens_per_s"] for r in steps)) if steps else None})
        print(f"[{STAGE}] {state.step} steps, {state.tokens} tokens; held-out KL to the target "
              f"{faith['kl_base']:.4f} (base) -> {faith['kl_adapted']:.4f} (adapters; {100 * faith['kl_closed']:.1f}% "
              f"closed); MLP difference explained {faith['fve_difference_mean']:.3f}; L0 {faith['l0_per_layer']:.1f} "
              f"per layer", flush=True)

    return execute(cfg, STAGE, body, force=force, resumable=True)


if __name__ == "__main__":
    raise SystemExit(stage_cli(STAGE, run))
