"""Bring your own: chat-format data and an existing LoRA adapter of any rank (issue 21).

Fast tier: a rank-2 peft adapter with known weights (no training) read, extracted, ablated and
steered per direction; chat rows tokenized with exactly the assistant turns in the loss mask;
bad chat rows and mismatched adapters named. Slow tier: configs/byo.yaml end to end.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1_core import activations as A
from rank1_core.config import ConfigError, DataConfig, ModelConfig
from rank1_core.data.io import DataError, Skipped
from tests.conftest import REPO

TINY = dict(name="tiny-qwen2", tiny=dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                         num_kv_heads=2))


def tiny_model_cfg() -> ModelConfig:
    from rank1_core.config import TinyModelConfig

    return ModelConfig(name="tiny-qwen2", tiny=TinyModelConfig(**TINY["tiny"]))


def known_rank2_adapter(model_dir, dest, modules=("q_proj", "gate_proj", "down_proj")) -> Path:
    """A rank-2 peft adapter whose lora_A rows are fixed, distinct patterns (row d of module m in
    layer l: cos((d + 1) * j / 7 + l + m)), B random (peft starts it at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=list(modules),
                                          lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                layer, module = A.parse_module(name)
                j = torch.arange(p.shape[1], dtype=torch.float32)
                for d in range(2):
                    p[d] = torch.cos((d + 1) * j / 7 + layer + A.MODULES.index(module))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(dest))
    return Path(dest)


@pytest.fixture(scope="module")
def rank2(tiny_model_dir, tmp_path_factory):
    return known_rank2_adapter(tiny_model_dir, tmp_path_factory.mktemp("byo") / "r2")


# --------------------------------------------------------------------------- names


def test_rank_r_names_keep_rank1_names():
    from rank1_core.lora import component_id, component_name, direction_names, module_of, parse_direction

    assert direction_names(5, "q_proj", 1) == ["L05_q_proj"]
    assert direction_names(5, "q_proj", 3) == ["L05_q_proj_r0", "L05_q_proj_r1", "L05_q_proj_r2"]
    assert parse_direction("L05_q_proj_r2") == (5, "q_proj", 2) and parse_direction("L05_q_proj") == (5, "q_proj", None)
    assert module_of("L05_q_proj_r2") == "L05_q_proj" and component_name(5, "q_proj", 2, 100) == "L005_q_proj_r2"
    assert component_id(2, "down_proj") == 20 and component_id(2, "down_proj", 1, 2) == 41
    with pytest.raises(ValueError, match="not a component name"):
        parse_direction("L05_q_proj_x2")


# --------------------------------------------------------------------------- extraction


def test_rank2_scalars_equal_x_at_A_for_every_direction(tiny_model_dir, rank2):
    """The extracted column of direction d is x @ A[d] with x the module's input, for every
    direction of every adapted module (A: the adapter's known lora_A)."""
    from safetensors.torch import load_file

    from rank1_core.lora import lora_key
    from rank1_core.models import decoder_layers, load_model

    info = A.read_adapter(rank2, 2)
    cols = [c.column for c in info.components]
    assert len(cols) == 2 * 3 * 2 and cols[:2] == ["L00_q_proj_r0", "L00_q_proj_r1"]
    assert [c.component_id for c in info.components] == sorted(c.component_id for c in info.components)
    weights = {lora_key(k)[:2]: w for k, w in load_file(str(rank2 / "adapter_model.safetensors")).items()
               if lora_key(k)[2] == "A"}
    for c in info.components:  # per-direction norms: row d of A
        assert info.a_norm[c.column] == pytest.approx(float(weights[(c.layer, c.module)][c.direction].norm()))
    ex = A.Extractor(tiny_model_dir, str(rank2), mlp_neurons=0)
    assert ex.columns == cols
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 5000, n) for n in (9, 4)]
    out = ex.compute([0, 1], docs)
    # x: each adapted module's input, from the unadapted base model (the adapter of earlier
    # layers changes later inputs, so take them from the adapted model's own forward)
    model = load_model(tiny_model_dir, adapter=rank2)
    for di, ids in enumerate(docs):
        xs, handles = {}, []
        for i, layer in enumerate(decoder_layers(model)):
            for mname in ("q_proj", "gate_proj", "down_proj"):
                mod = getattr(layer.self_attn if mname == "q_proj" else layer.mlp, mname)
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, k=(i, mname): xs.__setitem__(k, args[0][0].detach().clone())))
        with torch.no_grad():
            model(input_ids=torch.as_tensor(ids)[None])
        for h in handles:
            h.remove()
        mask = np.asarray(out.activations.column("doc_id")) == di
        for c in info.components:
            want = (xs[(c.layer, c.module)] @ weights[(c.layer, c.module)].T)[:, c.direction].numpy()
            got = np.asarray(out.activations.column(c.column))[mask]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=c.column)


# --------------------------------------------------------------------------- ablation and steering


def _zero_rows(model, zero: dict[str, list[int]]):
    from rank1_core.ablation import lora_components, module_of

    m = copy.deepcopy(model)
    comps = {module_of(n): mod for n, mod in lora_components(m).items()}
    with torch.no_grad():
        for name, rows in zero.items():
            comps[name].weight[rows] = 0
    return m


def test_rank2_direction_and_module_ablations_match_zeroed_rows(tiny_model_dir, rank2, tmp_path):
    from rank1_core.ablation import KLAblator, lora_components, plan_ablations, write_ablated_adapter
    from rank1_core.lora import saved_components
    from rank1_core.models import load_model

    model = load_model(tiny_model_dir, adapter=rank2)
    comps = list(lora_components(model))
    assert comps == saved_components(rank2)
    plan = plan_ablations(comps, per_layer=False)
    kinds = {a.name: a.kind for a in plan}
    assert kinds["L01_gate_proj_r1"] == "component" and kinds["L01_gate_proj"] == "module"
    pick = [a for a in plan if a.name in ("L00_q_proj_r1", "L01_gate_proj")]
    ids = [torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 9)]
    mask = [[0] * 3 + [1] * (len(x) - 3) for x in ids]
    res = KLAblator(model, pick, ablations_per_pass=2)([0, 1], ids, mask)
    got = {}
    for r in res.rows:
        s, n = got.get(r["ablation"], (0.0, 0))
        got[r["ablation"]] = (s + r["kl_sum"], n + r["n_tokens"])
    for name, zero in (("L00_q_proj_r1", {"L00_q_proj": [1]}), ("L01_gate_proj", {"L01_gate_proj": [0, 1]})):
        ablated = _zero_rows(model, zero)
        total, count = 0.0, 0
        with torch.no_grad():
            for x, m in zip(ids, mask):
                la = torch.log_softmax(ablated(torch.tensor([x])).logits[0], -1)
                lr = torch.log_softmax(model(torch.tensor([x])).logits[0], -1)
                for t in range(len(x) - 1):
                    if m[t + 1]:
                        total += float((la[t].exp() * (la[t] - lr[t])).sum())
                        count += 1
        assert got[name][1] == count and got[name][0] / count == pytest.approx(total / count, rel=1e-3, abs=1e-7)
    # the ablated adapter on disk zeroes exactly that row
    from safetensors.torch import load_file

    done = write_ablated_adapter(rank2, ["L00_q_proj_r1"], tmp_path / "abl")
    assert done == ["L00_q_proj_r1"]
    t = load_file(str(tmp_path / "abl" / "adapter_model.safetensors"))
    a = next(v for k, v in t.items() if "layers.0." in k and "q_proj.lora_A" in k)
    assert float(a[1].abs().sum()) == 0 and float(a[0].abs().sum()) > 0


def test_rank2_steering_scales_one_direction(tiny_model_dir, rank2):
    from rank1_core.models import load_model
    from rank1_core.steering import Condition, SteeringHooks

    model = load_model(tiny_model_dir, adapter=rank2)
    cond = Condition(id="x", target="L01_gate_proj_r0", target_kind="component", source="adapter", mode="scale",
                     alpha=0.0, scale={"L01_gate_proj_r0": 0.0})
    ids = torch.randint(0, 5000, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), SteeringHooks(model, cond, prompt_width=0):
        steered = model(input_ids=ids).logits
    with torch.no_grad():
        want = _zero_rows(model, {"L01_gate_proj": [0]})(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    assert torch.allclose(steered, want, atol=1e-5) and not torch.allclose(steered, plain, atol=1e-4)


# --------------------------------------------------------------------------- the adapter from elsewhere


def test_external_adapter_is_checked_against_the_model(tiny_model_dir, rank2, tmp_path, tiny_cfg):
    import shutil

    from rank1_core.lora import read_external_adapter
    from rank1_core.plan import make_plan

    model = tiny_model_cfg()
    spec = read_external_adapter(rank2, model)
    assert (spec.rank, spec.modules, spec.layers) == (2, ["q_proj", "gate_proj", "down_proj"], [0, 1])
    assert len(spec.components) == 12 and len(spec.sha256) == 64
    p = make_plan(tiny_cfg(f"train.adapter_path={rank2}"))
    assert (p.components, p.mlp_components, p.rank) == (12, 8, 2)
    assert "12 = 8 MLP + 4 attention (2 directions per module)" in p.render()

    def broken(**change) -> Path:
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(rank2, d)
        conf = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**conf, **change}))
        return d

    cases = [
        (broken(base_model_name_or_path="Qwen/Qwen2.5-7B-Instruct"), r"base_model_name_or_path 'Qwen/Qwen2.5-7B"),
        (broken(r=4), r"adapter_config.json: r = 4 but tensor .*lora_A.* has rank 2"),
        (broken(target_modules=["q_proj", "lm_head"]), r"target_modules names 'lm_head'"),
        (broken(target_modules=["q_proj"]), r"target_modules \['q_proj'\] does not list 'down_proj'"),
        (broken(layers_to_transform=[0]), r"layers_to_transform \[0\] differs from the layers in the weights \[0, 1\]"),
        (broken(use_dora=True), r"use_dora = True is not supported"),
        (tmp_path / "nothing", r"train.adapter_path: .*nothing' is not a peft adapter directory"),
    ]
    for path, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            read_external_adapter(path, model)


def test_external_adapter_on_a_smaller_model_names_the_layer(rank2):
    from rank1_core.config import TinyModelConfig
    from rank1_core.lora import read_external_adapter

    one = ModelConfig(name="tiny-qwen2", tiny=TinyModelConfig(**dict(TINY["tiny"], num_layers=1)))
    with pytest.raises(ConfigError, match=r"(is on layer 1; model 'tiny-qwen2' has 1 layers|base_model_name_or_path)"):
        read_external_adapter(rank2, one)


# --------------------------------------------------------------------------- chat data


def chat_row(*turns, system=None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"messages": msgs}


def write_jsonl(path: Path, rows) -> str:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows))
    return str(path)


def test_chat_loss_mask_is_exactly_the_assistant_turns(tmp_path):
    from rank1_core.data.format import tokenize_chat
    from rank1_core.data.sources import load_chat
    from rank1_core.models import qwen_tokenizer

    tok = qwen_tokenizer()
    answers = ["It is 5.", "8, I think.\nWait: 4 + 4 = 8, yes.", "Done!"]
    row = chat_row("What is 2+3?", answers[0], "And 4+4?", answers[1], "Thanks", answers[2], "bye",
                   system="Be brief.")
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    (t,) = load_chat(DataConfig(source="chat", path=path), Skipped())
    got = tokenize_chat(tok, t["messages"], ModelConfig(name="tiny-qwen2"), 4096)
    # the whole sequence is the template's rendering, token for token of its pieces
    assert tok.decode(got.input_ids) == tok.apply_chat_template(row["messages"], tokenize=False)
    runs, cur = [], []
    for i, m in zip(got.input_ids, got.loss_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert not cur  # the conversation ends with a user turn: unmasked
    # exactly the three assistant contents, each with its closing <|im_end|>, and nothing else
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    assert [r for r in runs] == [tok(a + "<|im_end|>", add_special_tokens=False)["input_ids"] for a in answers]
    assert got.prompt_len == got.loss_mask.index(1)
    assert tok.decode(got.input_ids[:got.prompt_len]).endswith("<|im_start|>assistant\n")


def test_bad_chat_rows_are_named_or_skipped(tmp_path):
    from rank1_core.data.sources import load_chat

    good = chat_row("q", "a")
    rows = [good,
            {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
            chat_row("q", "   "),
            {"messages": [{"role": "user", "content": "only a question"}]},
            b'{"messages": [{"role": "user", "content": "\xff"}, {"role": "assistant", "content": "a"}]}\n',
            {"text": "no messages"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    skipped = Skipped()
    out = load_chat(DataConfig(source="chat", path=path, bad_rows="skip"), skipped)
    assert len(out) == 1 and skipped.total == 5
    for msg in (r"bad\.jsonl: row 2: messages\[1\]: unknown role 'robot'",):
        with pytest.raises(DataError, match=msg):
            load_chat(DataConfig(source="chat", path=path), Skipped())
    expect = {3: r"row 3: messages\[1\] \(assistant\): empty content", 4: r"row 4: no assistant turn",
              5: r"row 5: not valid UTF-8", 6: r"row 6: missing field 'messages'"}
    for n, msg in expect.items():
        only = write_jsonl(tmp_path / f"r{n}.jsonl", [good] * (n - 1) + [rows[n - 1]])
        with pytest.raises(DataError, match=msg):
            load_chat(DataConfig(source="chat", path=only), Skipped())


def test_prepare_on_chat_rows(tmp_path, tiny_cfg):
    """prepare's token table from chat rows: every document's mask covers its assistant turns."""
    import pyarrow.parquet as pq

    from rank1_core.config import load_config
    from rank1_core.data.sources import synthetic_chat_rows
    from ray_jobs import prepare

    cfg0 = load_config(REPO / "configs" / "byo.yaml")
    rows = synthetic_chat_rows(cfg0.data, cfg0.model, 1, 24)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = load_config(REPO / "configs" / "byo.yaml", [f"run.dir={tmp_path / 'run'}", f"data.path={path}",
                                                      "data.heldout_traces=2"])
    prepare.run(cfg)
    t = pq.read_table(tmp_path / "run" / "prepare" / "tokens").to_pylist()
    # rows whose question is a benchmark problem are left out, as for every source
    assert 6 <= len(t) <= 12 and sum(r["split"] == "heldout" for r in t) == 2
    for r in t:
        flips = sum(1 for a, b in zip(r["loss_mask"], r["loss_mask"][1:]) if a != b)
        assert flips == 4  # two assistant turns: 0..0 1..1 0..0 1..1 0 (the template's last newline)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_byo_config_end_to_end(tmp_path, monkeypatch):
    """configs/byo.yaml: the assets made by scripts/byo_assets.py (chat data, a rank-4 adapter
    trained by rank1), then every stage on them; the report shows rank-r components."""
    import pyarrow.parquet as pq

    from rank1_core.config import load_config
    from ray_jobs import pipeline
    from tests.llm_server import FakeLLMServer
    from tests.test_autointerp_stage import ANTHROPIC_KEY, OPENAI_KEY, models_override

    monkeypatch.setenv("RANK1_FAKE_OPENAI_KEY", OPENAI_KEY)
    monkeypatch.setenv("RANK1_FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)
    assets = [f"data.path={tmp_path / 'assets' / 'chat.jsonl'}", f"train.adapter_path={tmp_path / 'assets' / 'adapter'}"]
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["byo_assets.py", "--config", str(REPO / "configs" / "byo.yaml"), *assets])
    with pytest.raises(SystemExit) as ex:
        runpy.run_path(str(REPO / "scripts" / "byo_assets.py"), run_name="__main__")
    assert ex.value.code == 0
    with FakeLLMServer() as srv:
        cfg = load_config(REPO / "configs" / "byo.yaml",
                          [f"run.dir={tmp_path / 'run'}", *assets, models_override(srv),
                           f"autointerp.cache_dir={tmp_path / 'llm-cache'}"])
        pipeline.run(cfg)
    run = tmp_path / "run"
    man = json.loads((run / "train" / "manifest.json").read_text())
    assert json.dumps(man).count("adapter_sha256") >= 1
    comps = pq.read_table(run / "extract" / "components.parquet").to_pylist()
    assert len(comps) == 56 and comps[0]["column"] == "L00_q_proj_r0" and comps[3]["column"] == "L00_q_proj_r3"
    assert len(pq.read_table(run / "ablate" / "kl_modules.parquet")) == 14
    html = "".join(p.read_text(errors="replace") for p in (run / "report").rglob("*.html"))
    assert "L01_gate_proj_r0" in html
