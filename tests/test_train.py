"""The training library without Ray: batching, loss, schedule, config checks, adapter checks,
and (slow) short runs of the loop itself: determinism, held-out loss, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rank1_core.config import LORA_MODULES, ConfigError, TrainConfig
from rank1_core.train import (Doc, TrainError, collate, deepspeed_config, lr_lambda, plan_microbatches,
                              plan_steps)


def docs_of(lengths, prompt=3):
    out = []
    for i, n in enumerate(lengths):
        mask = np.zeros(n, dtype=np.int8)
        mask[prompt:] = 1
        out.append(Doc(i, np.arange(10, 10 + n, dtype=np.int64), mask))
    return out


# --------------------------------------------------------------------------- batching


def test_microbatches_respect_the_token_budget_and_cover_every_trace_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=200).tolist()
    mbs = plan_microbatches(lengths, 256, seed=1, epoch=0)
    flat = sorted(i for mb in mbs for i in mb)
    assert flat == list(range(200))
    for mb in mbs:
        assert len(mb) * max(lengths[i] for i in mb) <= 256


def test_a_trace_longer_than_the_budget_goes_alone():
    mbs = plan_microbatches([10, 500, 10, 10], 64, seed=0, epoch=0)
    assert [1] in mbs
    assert sorted(i for mb in mbs for i in mb) == [0, 1, 2, 3]


def test_batch_order_depends_on_seed_and_epoch_only():
    lengths = list(range(10, 110))
    a = plan_microbatches(lengths, 300, seed=3, epoch=0)
    assert a == plan_microbatches(lengths, 300, seed=3, epoch=0)
    assert a != plan_microbatches(lengths, 300, seed=3, epoch=1)
    assert a != plan_microbatches(lengths, 300, seed=4, epoch=0)


def test_steps_deal_microbatches_to_workers_and_drop_a_partial_last_step():
    mbs = [[i] for i in range(11)]
    steps = plan_steps(mbs, world_size=2, grad_accum=2)
    assert len(steps) == 2
    assert steps[1] == [[4], [5], [6], [7]]
    assert steps[1][1::2] == [[5], [7]]  # worker 1's accumulation slots
    with pytest.raises(TrainError, match="too few for 4 worker"):
        plan_steps(mbs[:3], world_size=4, grad_accum=1)


def test_collate_labels_the_next_token_of_the_assistant_part_only():
    d = Doc(0, np.array([5, 6, 7, 8, 9]), np.array([0, 0, 1, 1, 1], dtype=np.int8))
    e = Doc(1, np.array([1, 2, 3]), np.array([0, 1, 1], dtype=np.int8))
    ids, att, labels = collate([d, e], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert att.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # logits at t predict token t+1; only tokens with loss_mask 1 are targets.
    assert labels.tolist() == [[-100, 7, 8, 9, -100], [2, 3, -100, -100, -100]]
    assert d.loss_tokens == 3 and e.loss_tokens == 2


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(total_steps=10, warmup_ratio=0.2, schedule="cosine")
    assert f(0) == pytest.approx(1 / 3) and f(1) == pytest.approx(2 / 3)
    assert f(2) == pytest.approx(1.0)
    assert f(9) < 0.05 and all(f(s) >= f(s + 1) for s in range(2, 9))
    assert lr_lambda(10, 0.0, "constant")(9) == 1.0
    assert lr_lambda(10, 0.0, "linear")(5) == pytest.approx(0.5)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("override, match", [
    ("train.lora.r=0", "train.lora.r must be >= 1, got 0"),
    ("train.lora.target_modules=[q_proj,qkv_proj]", "unknown module 'qkv_proj'"),
    ("train.lora.layers=[-1]", "layer index -1 is negative"),
    ("train.batch_tokens=0", "train.batch_tokens must be >= 8"),
    ("train.strategy=fsdp", "'train.strategy' must be one of"),
])
def test_bad_train_configs_fail_on_load(tiny_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(override)


def test_layer_out_of_range_is_checked_against_the_model(tiny_cfg):
    from rank1_core.lora import validate_for_model

    cfg = tiny_cfg("train.lora.layers=[0,2]")
    with pytest.raises(ConfigError, match=r"layer index 2 is out of range: model 'tiny-qwen2' has 2 layers"):
        validate_for_model(cfg.train, cfg.model)
    assert validate_for_model(tiny_cfg().train, cfg.model) == 2


def test_full_precision_overrides_train_precision_for_the_full_fine_tune_only(tiny_cfg, tiny_model_dir):
    """demo.yaml trains the adapter on a bf16 base and the full fine-tune with fp32 weights."""
    import torch

    from rank1_core.train import build_model, for_mode

    cfg = tiny_cfg("train.precision=bf16", "train.full.precision=bf16_autocast")
    assert for_mode(cfg.train, "lora").precision == "bf16"
    assert for_mode(cfg.train, "full").precision == "bf16_autocast"
    assert for_mode(cfg.train, "full").full == cfg.train.full and for_mode(cfg.train, "full").lr == cfg.train.lr
    assert for_mode(tiny_cfg("train.precision=bf16").train, "full").precision == "bf16"  # unset: inherited
    lora = build_model(tiny_model_dir, for_mode(cfg.train, "lora"), "lora", 2, 0)
    dtypes = {n: p.dtype for n, p in lora.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    full = build_model(tiny_model_dir, for_mode(cfg.train, "full"), "full", 2, 0)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    with pytest.raises(ConfigError, match="train.full.precision"):
        tiny_cfg("train.full.precision=fp8")


def test_deepspeed_json_autos_are_filled_from_the_train_section():
    cfg = TrainConfig(grad_accum=3, max_grad_norm=0.5, precision="bf16")
    ds = deepspeed_config(cfg, "deepspeed_zero3", world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == 6
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert "auto" not in json.dumps(ds)
    with pytest.raises(TrainError, match="stage is 2 but train strategy is deepspeed_zero3"):
        deepspeed_config(TrainConfig(deepspeed_config=str(Path(__file__).parents[1] / "configs/deepspeed_zero2.json")),
                         "deepspeed_zero3", 1)


# --------------------------------------------------------------------------- model pieces


def test_lora_config_targets_every_module_of_the_chosen_layers(tiny_model_dir):
    from rank1_core.config import LoraSection
    from rank1_core.lora import expected_components, peft_lora_config

    lc = peft_lora_config(LoraSection(), num_layers=2)
    assert lc.r == 1 and lc.lora_alpha == 16 and lc.use_rslora
    assert sorted(lc.target_modules) == sorted(LORA_MODULES)
    sub = LoraSection(layers=[1], target_modules=["down_proj", "q_proj"])
    assert peft_lora_config(sub, 2).layers_to_transform == [1]
    assert expected_components(sub, 2) == [(1, "q_proj"), (1, "down_proj")]


def test_loss_model_equals_cross_entropy_over_full_logits(tiny_model_dir):
    import torch

    from rank1_core.train import loss_model, masked_ce_sum
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    docs = docs_of([12, 7, 9])
    ids, att, labels = collate(docs, pad_id=0)
    with torch.no_grad():
        ref, n_ref = masked_ce_sum(model(input_ids=ids, attention_mask=att).logits, labels)
        got, n = loss_model(model)(ids, att, labels)
    assert int(n) == n_ref == sum(d.loss_tokens for d in docs)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


def _random_adapter(model_dir, tmp_path, lora=None):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rank1_core.config import LoraSection
    from rank1_core.lora import peft_lora_config

    lora = lora or LoraSection()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), peft_lora_config(lora, 2))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    return out, lora


def test_check_adapter_accepts_a_full_adapter_and_names_components(tiny_model_dir, tmp_path):
    from rank1_core.lora import check_adapter

    out, lora = _random_adapter(tiny_model_dir, tmp_path)
    chk = check_adapter(out, lora, num_layers=2)
    assert len(chk.components) == 2 * 7
    assert chk.components[:8] == ["L00_q_proj", "L00_k_proj", "L00_v_proj", "L00_o_proj", "L00_gate_proj",
                                  "L00_up_proj", "L00_down_proj", "L01_q_proj"]


def test_check_adapter_fails_loudly_on_a_zero_or_missing_lora_b(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from rank1_core.lora import AdapterError, check_adapter

    out, lora = _random_adapter(tiny_model_dir, tmp_path)
    f = out / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if ".layers.1." in k and "gate_proj.lora_B" in k)
    zeroed = dict(tensors)
    zeroed[key] = zeroed[key] * 0
    save_file(zeroed, str(f))
    with pytest.raises(AdapterError, match="lora_B of component L01_gate_proj is all zeros"):
        check_adapter(out, lora, 2)
    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, str(f))
    with pytest.raises(AdapterError, match="component L01_gate_proj is missing lora_B"):
        check_adapter(out, lora, 2)


# --------------------------------------------------------------------------- the loop (slow)


def _setup(cfg, prepared_run, mode="lora"):
    import torch

    from rank1_core.models import load_tokenizer, resolve_model_dir
    from rank1_core.rundir import resolve_filesystem
    from rank1_core.train import load_docs, settings

    torch.set_num_threads(2)
    fs, path = resolve_filesystem(str(prepared_run / "prepare" / "tokens"))
    md = resolve_model_dir(cfg.model)
    return (md, load_tokenizer(md).pad_token_id, load_docs(fs, path, "train"), load_docs(fs, path, "heldout"),
            settings(cfg.train, mode))


def _run(cfg, prepared_run, state=None, report=None, mode="lora"):
    from rank1_core.train import build_model, make_engine, total_steps, train_loop

    md, pad, tr, he, st = _setup(cfg, prepared_run, mode)
    engine = make_engine(build_model(md, cfg.train, mode, 2, cfg.run.seed), cfg.train, st,
                         total_steps(tr, cfg.train, st, cfg.run.seed, 1))
    return engine, train_loop(engine, tr, he, cfg.train, st, cfg.run.seed, pad, state,
                              report=report or (lambda m, s, c: None))


def _lora_weights(engine):
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if "lora_" in n}


@pytest.mark.slow
def test_fixed_seed_gives_the_same_adapter_and_training_lowers_heldout_loss(tiny_cfg, prepared_run):
    import torch

    cfg = tiny_cfg("train.max_steps=4")
    e1, s1 = _run(cfg, prepared_run)
    e2, s2 = _run(cfg, prepared_run)
    w1, w2 = _lora_weights(e1), _lora_weights(e2)
    assert len(w1) == 2 * 7 * 2  # A and B of 14 components
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    held = [r["heldout_loss"] for r in s1.history if r["heldout_loss"] == r["heldout_loss"]]
    assert held[-1] < held[0] - 0.05
    assert s1.step == 4 and s1.finished


@pytest.mark.slow
def test_a_run_resumed_from_a_checkpoint_ends_with_the_same_weights(tiny_cfg, prepared_run, tmp_path):
    import torch

    from rank1_core.train import TrainState, load_checkpoint, save_checkpoint

    cfg = tiny_cfg("train.max_steps=4", "train.checkpoint_every=2")
    saved = {}

    def report(metrics, state, ckpt):
        if ckpt:
            d = tmp_path / f"ck{state.step}"
            save_checkpoint(engine_ref[0], state, d)
            saved[state.step] = d

    from rank1_core.train import build_model, make_engine, total_steps, train_loop

    md, pad, tr, he, st = _setup(cfg, prepared_run)
    engine_ref = [make_engine(build_model(md, cfg.train, "lora", 2, 0), cfg.train, st,
                              total_steps(tr, cfg.train, st, 0, 1))]
    full = train_loop(engine_ref[0], tr, he, cfg.train, st, 0, pad, report=report)
    assert sorted(saved) == [2, 4]
    # A fresh engine (different init seed, so nothing is shared by accident) resumes at step 2.
    fresh = make_engine(build_model(md, cfg.train, "lora", 2, 123), cfg.train, st, total_steps(tr, cfg.train, st, 0, 1))
    state = load_checkpoint(fresh, saved[2])
    assert isinstance(state, TrainState) and state.step == 2
    resumed = train_loop(fresh, tr, he, cfg.train, st, 0, pad, state)
    assert [r["step"] for r in resumed.history] == [0, 1, 2, 3, 4]
    a, b = _lora_weights(engine_ref[0]), _lora_weights(fresh)
    assert all(torch.allclose(a[k], b[k], atol=0, rtol=0) for k in a)
    assert resumed.history[-1]["loss"] == full.history[-1]["loss"]
