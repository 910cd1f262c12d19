"""Extraction without Ray: the stored scalars against peft itself, names, catalogues, batch files,
exactly-once bookkeeping, and bad input (no trained adapter, wrong rank, empty trace table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rank1_core import activations as A
from rank1_core.rundir import RunDir, StageNotDone, run_stage

ALL = list(A.MODULES)


# --------------------------------------------------------------------------- helpers (used by test_extract_ray)


def make_adapter(model_dir, dest, modules=ALL, layers=None, seed=0, r=1, scale=0.5):
    """A real peft LoRA on the tiny model with random A and B (peft starts B at zero), saved."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    extra = {"layers_to_transform": list(layers), "layers_pattern": "layers"} if layers is not None else {}
    cfg = LoraConfig(r=r, lora_alpha=16, use_rslora=True, target_modules=list(modules), lora_dropout=0.0, **extra)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    Path(dest).mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(dest))
    return Path(dest)


def fake_train_stage(run_dir, model_dir, **kw) -> Path:
    """A finished `train` stage folder holding a real peft adapter (test setup, not a mock)."""
    st = RunDir(str(run_dir)).stage("train")
    run_stage(st, "test-adapter", "# adapter built by the test\n",
              lambda sr: make_adapter(model_dir, st.local_path("adapter"), **kw), log=lambda m: None)
    return st.local_path("adapter")


def docs(seed=0, lengths=(7, 3, 12, 5)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 5000, n).astype(np.int32) for n in lengths]


def reference_lora_a(model_dir, adapter_dir, ids):
    """Per component: peft's own lora_A applied to the module's input, one document alone.
    Also checks that lora_B(that scalar) * scaling is exactly what the adapter adds."""
    from rank1_core.models import load_model
    from peft.tuners.lora import LoraLayer

    model = load_model(model_dir, adapter=adapter_dir)
    out, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            layer, module = A.parse_module(name)

            def hook(m, args, _l=layer, _m=module):
                x = args[0]
                a = m.lora_A["default"](x)
                out[(_l, _m)] = (x.detach().clone(), a[..., 0].detach().clone())
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None])
    for h in handles:
        h.remove()
    # the scalar is the adapter's bottleneck: base(x) + B * scalar * scaling == peft's output
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer):
                x, a = out[A.parse_module(name)]
                added = mod(x) - mod.base_layer(x)
                expect = a[..., None] * mod.lora_B["default"].weight[:, 0] * mod.scaling["default"]
                assert torch.allclose(added, expect, atol=1e-5), name
    return {k: v[1][0].numpy() for k, v in out.items()}


def reference_neurons(model_dir, ids, n):
    from rank1_core.models import load_model

    model = load_model(model_dir)  # the unadapted base model, no peft at all
    out, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, _i=i: out.__setitem__(_i, args[0][0, :, :n].detach().clone())))
    with torch.no_grad():
        model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None])
    for h in handles:
        h.remove()
    return {i: v.numpy() for i, v in out.items()}


# --------------------------------------------------------------------------- names


def test_column_names_and_ids():
    assert A.component_column(3, "q_proj", 30) == "L03_q_proj"
    assert A.component_column(3, "q_proj", 100) == "L003_q_proj"
    assert A.neuron_column(7, 12, 64) == "N07_0012"
    assert A.neuron_column(7, 12, 128) == "N007_0012"
    assert A.component_id(0, "q_proj") == 0 and A.component_id(2, "down_proj") == 20
    assert A.parse_module("base_model.model.model.layers.11.mlp.up_proj.lora_A.weight") == (11, "up_proj")
    assert A.parse_module("base_model.model.model.layers.2.self_attn.o_proj") == (2, "o_proj")
    assert A.parse_module("base_model.model.lm_head") is None


def test_plan_forward_batches():
    groups = A.plan_forward_batches([5, 1, 9, 3, 20], batch_tokens=10)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    for g in groups:  # within budget unless a single document is longer than it
        assert len(g) == 1 or len(g) * max([5, 1, 9, 3, 20][i] for i in g) <= 10
    assert [4] in groups


def test_batch_name_deterministic():
    assert A.batch_name([5, 3, 9]) == A.batch_name([9, 5, 3])
    assert A.batch_name([5, 3, 9]).startswith("part-0000000003-")
    assert A.batch_name([5, 3]) != A.batch_name([5, 3, 9])


# --------------------------------------------------------------------------- identity with peft


@pytest.fixture(scope="module")
def adapter_all(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", seed=1)


def test_activation_identity_with_peft(tiny_model_dir, adapter_all):
    """Stored value == peft's lora_A(x) per component and token (B non-zero), batched and padded."""
    ex = A.Extractor(tiny_model_dir, str(adapter_all), mlp_neurons=16, batch_tokens=24)
    ds = docs()
    out = ex.compute([10, 11, 12, 13], ds, ["train"] * 4)
    act = out.activations
    assert act.column_names[:3] == ["doc_id", "pos", "token_id"]
    assert act.column_names[3:] == [A.component_column(l, m, 2) for l in range(2) for m in A.MODULES]
    assert act.schema.field("L00_q_proj").type == pa.float32()
    assert act.num_rows == sum(len(d) for d in ds)
    assert act.column("doc_id").to_pylist() == sorted(act.column("doc_id").to_pylist())
    for j, d in enumerate(ds):
        ref = reference_lora_a(tiny_model_dir, adapter_all, d)
        mask = np.asarray(act.column("doc_id")) == 10 + j
        assert np.asarray(act.column("pos"))[mask].tolist() == list(range(len(d)))
        assert np.asarray(act.column("token_id"))[mask].tolist() == d.tolist()
        for (layer, module), vals in ref.items():
            got = np.asarray(act.column(A.component_column(layer, module, 2)))[mask]
            np.testing.assert_allclose(got, vals, rtol=1e-4, atol=1e-5, err_msg=f"doc {j} L{layer} {module}")
            assert np.abs(vals).max() > 1e-3  # a real signal, not zeros


def test_bf16_extraction_stores_float32_close_to_fp32(tiny_model_dir, adapter_all):
    """demo.yaml extracts in bf16 (extract.dtype): the stored columns stay float32 and follow
    the fp32 values to bf16 precision."""
    ds = docs()
    ref = A.Extractor(tiny_model_dir, str(adapter_all), mlp_neurons=4, batch_tokens=24).compute([0, 1, 2, 3], ds,
                                                                                                 ["train"] * 4)
    ex = A.Extractor(tiny_model_dir, str(adapter_all), mlp_neurons=4, batch_tokens=24, dtype="bfloat16")
    out = ex.compute([0, 1, 2, 3], ds, ["train"] * 4)
    for got, want in ((out.activations, ref.activations), (out.neurons, ref.neurons)):
        assert got.column_names == want.column_names and got.num_rows == want.num_rows
        for name in got.column_names[2:]:
            if name == "token_id":
                continue
            assert got.schema.field(name).type == pa.float32(), name
            g, w = np.asarray(got.column(name)), np.asarray(want.column(name))
            scale = np.abs(w).max()
            assert scale > 0 and np.abs(g - w).max() <= 0.05 * scale, name
            assert not np.array_equal(g, w), name  # really computed in bf16


def test_neurons_are_the_unadapted_model(tiny_model_dir, adapter_all):
    ex = A.Extractor(tiny_model_dir, str(adapter_all), mlp_neurons=16, batch_tokens=24)
    ds = docs(seed=3, lengths=(6, 9))
    out = ex.compute([0, 1], ds, ["train", "heldout"])
    nr = out.neurons
    assert nr.column_names == ["doc_id", "pos"] + [A.neuron_column(l, i, 2) for l in range(2) for i in range(16)]
    for j, d in enumerate(ds):
        ref = reference_neurons(tiny_model_dir, d, 16)
        mask = np.asarray(nr.column("doc_id")) == j
        for layer, vals in ref.items():
            got = np.stack([np.asarray(nr.column(A.neuron_column(layer, i, 2)))[mask] for i in range(16)], -1)
            np.testing.assert_allclose(got, vals, rtol=1e-4, atol=1e-5)
    # ...and differ from the adapted model's (the adapter really was off)
    tok = out.tokens
    assert tok.column_names == ["doc_id", "pos", "token_id", "token", "split"]
    assert set(tok.column("split").to_pylist()) == {"train", "heldout"}
    assert tok.column("token").to_pylist()[0] == ex.tokenizer.decode([int(ds[0][0])])


def test_adapter_on_a_subset(tiny_model_dir, tmp_path):
    ad = make_adapter(tiny_model_dir, tmp_path / "ad", modules=["q_proj", "down_proj"], layers=[1], seed=2)
    info = A.read_adapter(ad, num_layers=2)
    assert [c.column for c in info.components] == ["L01_q_proj", "L01_down_proj"]
    ex = A.Extractor(tiny_model_dir, str(ad), mlp_neurons=0)
    out = ex.compute([0], docs(lengths=(5,)))
    assert out.neurons is None
    assert out.activations.column_names == ["doc_id", "pos", "token_id", "L01_q_proj", "L01_down_proj"]
    ref = reference_lora_a(tiny_model_dir, ad, docs(lengths=(5,))[0])
    np.testing.assert_allclose(np.asarray(out.activations.column("L01_down_proj")), ref[(1, "down_proj")],
                               rtol=1e-4, atol=1e-5)


def test_components_catalogue(tiny_model_dir, adapter_all):
    from safetensors.torch import load_file

    info = A.read_adapter(adapter_all, num_layers=2)
    t = A.components_table(info)
    assert t.column_names == ["component_id", "column", "layer", "module", "kind", "a_norm", "b_norm", "scaling"]
    rows = t.to_pylist()
    assert [r["component_id"] for r in rows] == list(range(14))
    assert {r["module"]: r["kind"] for r in rows} == {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn",
                                                       "o_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp",
                                                       "down_proj": "mlp"}
    w = load_file(str(adapter_all / A.ADAPTER_WEIGHTS))
    key_b = next(k for k in w if "layers.1." in k and "gate_proj.lora_B" in k)
    r = next(r for r in rows if r["column"] == "L01_gate_proj")
    assert r["b_norm"] == pytest.approx(float(w[key_b].norm()), rel=1e-6)
    assert r["scaling"] == 16.0
    nc = A.neuron_catalogue_table(2, 3).to_pylist()
    assert nc[4] == {"column": "N01_0001", "layer": 1, "neuron": 1}


# --------------------------------------------------------------------------- bad input


def test_no_adapter_is_a_clear_error(tmp_path, tiny_model_dir):
    with pytest.raises(A.ExtractError, match=r"no trained adapter at .*adapter_config.json.*run the train stage"):
        A.read_adapter(tmp_path / "nothing", 2)
    with pytest.raises(A.ExtractError, match="no trained adapter"):
        A.Extractor(tiny_model_dir, str(tmp_path / "nothing"))


def test_adapter_whose_rank_disagrees_with_its_weights_is_rejected(tiny_model_dir, tmp_path):
    """Any rank is read (tests/test_byo.py); a config whose r is not its tensors' rank is not."""
    import json

    ad = make_adapter(tiny_model_dir, tmp_path / "r2", modules=["q_proj"], r=2)
    conf = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**conf, "r": 3}))
    with pytest.raises(A.ExtractError, match=r"r = 3 but tensor .*q_proj.lora_A.* has rank 2"):
        A.read_adapter(ad, 2)


def test_stage_without_trained_adapter(tiny_cfg, prepared_run, copy_run, tiny_model_dir):
    """Fails before Ray starts: no train stage, then a train stage without an adapter."""
    from ray_jobs import extract

    run = copy_run(prepared_run)
    cfg = tiny_cfg(run_dir=run)
    with pytest.raises(StageNotDone, match="stage 'train' has not finished"):
        extract.run(cfg)
    st = RunDir(str(run)).stage("train")
    run_stage(st, "empty", "", lambda sr: None, log=lambda m: None)  # "done", but no adapter inside
    with pytest.raises(A.ExtractError, match=r"no trained adapter at .*train/adapter"):
        extract.run(cfg)
    assert not RunDir(str(run)).stage("extract").is_done()


def test_empty_trace_table(tiny_cfg, prepared_run, copy_run, tiny_model_dir):
    from rank1_core.data.prepare import TOKENS_SCHEMA
    from ray_jobs import extract

    run = copy_run(prepared_run)
    fake_train_stage(run, tiny_model_dir)
    tokens = run / "prepare" / "tokens"
    for f in tokens.glob("*.parquet"):
        f.unlink()
    pq.write_table(TOKENS_SCHEMA.empty_table(), tokens / "part-00000.parquet")
    with pytest.raises(A.ExtractError, match=r"trace table .*prepare/tokens has no tokens.*nothing to extract"):
        extract.run(tiny_cfg(run_dir=run))


# --------------------------------------------------------------------------- batch files


def _batch(ids, ds, split="train"):
    return {"doc_id": np.asarray(ids, np.int64), "split": np.asarray([split] * len(ids), object),
            "input_ids": np.asarray(ds + [None], object)[:-1]}


def test_batch_files_are_idempotent(tiny_model_dir, adapter_all, tmp_path):
    run = RunDir(str(tmp_path / "run"))
    st = run.stage("extract")
    ex = A.Extractor(tiny_model_dir, str(adapter_all), str(tmp_path / "run"), mlp_neurons=4, batch_tokens=64)
    ds = docs()
    s1 = ex(_batch([3, 1], ds[:2]))
    name = str(s1["file"][0])
    assert name == A.batch_name([1, 3]) and int(s1["tokens"][0]) == 10 and not s1["skipped"][0]
    before = pq.read_table(st.local_path("activations", name))
    s2 = ex(_batch([3, 1], ds[:2]))  # the same batch again (a retry or a resumed run)
    assert s2["skipped"][0] and int(s2["tokens"][0]) == 10
    assert pq.read_table(st.local_path("activations", name)).equals(before)
    # a batch of the other split is filtered out by the actor
    s3 = ex(_batch([7], ds[2:3], split="heldout"))
    ex.splits = {"train"}
    s4 = ex(_batch([8], ds[3:4], split="heldout"))
    assert str(s4["file"][0]) == "" and int(s4["docs"][0]) == 0
    files = sorted(p.name for p in st.local_path("tokens").iterdir())
    assert files == sorted([name, str(s3["file"][0])])

    # leftovers: a killed writer's temporary file and a batch cut differently on a retry
    (st.local_path("activations") / ".tmp-dead-part-x.parquet").write_bytes(b"partial")
    ex.splits = {"train", "heldout"}
    orphan = ex(_batch([1], ds[:1]))["file"][0]
    reported = [{"file": name}, {"file": ""}, {"file": str(s3["file"][0])}]  # "" = a filtered batch
    with pytest.raises(A.ExtractError, match=r"batches reported twice: \['" + name):
        A.finalize_batches(st, reported + [{"file": name}], A.TABLES)
    files, deleted = A.finalize_batches(st, reported, A.TABLES)
    assert files == [name, str(s3["file"][0])]
    assert deleted == 1 + 3  # the temp file, and the orphan in each of the three tables
    assert not st.exists("tokens", str(orphan))
    info = A.read_adapter(adapter_all, 2)
    A.check_columns(st, name, info, 2, 4)
    info.components = info.components[1:]  # as if the actors had loaded another adapter
    with pytest.raises(A.ExtractError, match=r"columns differ from the catalogue \(extra \['L00_q_proj'\]"):
        A.check_columns(st, name, info, 2, 4)
    counts = A.verify_exactly_once(st, 10 + 12, A.TABLES)
    assert counts == {"activations": 22, "neurons": 22, "tokens": 22}
    # a duplicate row is caught
    pq.write_table(pq.read_table(st.local_path("tokens", name)).slice(0, 1), st.local_path("tokens", "part-dup.parquet"))
    with pytest.raises(A.ExtractError, match=r"23 rows, 22 distinct"):
        A.verify_exactly_once(st, 22, ["tokens"])


def _crash_child(model_dir, adapter_dir, run_dir, marker):
    ex = A.Extractor(model_dir, adapter_dir, run_dir, mlp_neurons=0, crash={"marker": marker, "when": "after_write"})
    ex(_batch([0], docs()[:1]))


def test_crash_hook_kills_only_once(tiny_model_dir, adapter_all, tmp_path):
    """The hook really ends the process (checked in a child) and only for the first caller."""
    import multiprocessing as mp

    marker = tmp_path / "crashed"
    ctx = mp.get_context("spawn")
    args = (str(tiny_model_dir), str(adapter_all), str(tmp_path / "run"), str(marker))
    p = ctx.Process(target=_crash_child, args=args)
    p.start()
    p.join(180)
    assert p.exitcode == 17 and marker.read_text() == str(p.pid)
    assert RunDir(str(tmp_path / "run")).stage("extract").exists("tokens", A.batch_name([0]))
    p = ctx.Process(target=_crash_child, args=args)
    p.start()
    p.join(180)
    assert p.exitcode == 0


def test_identity_on_llama_architecture(tmp_path):
    """SmolLM2 (the demo model) is a Llama: the same identity on a tiny Llama."""
    from rank1_core.config import ModelConfig, TinyModelConfig
    from rank1_core.models import resolve_model_dir

    model_dir = resolve_model_dir(ModelConfig(name="tiny-llama", tiny=TinyModelConfig(
        num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2)))
    ad = make_adapter(model_dir, tmp_path / "ad", seed=9)
    ex = A.Extractor(model_dir, str(ad), mlp_neurons=8, batch_tokens=32)
    ds = docs(seed=5, lengths=(9, 4))
    out = ex.compute([0, 1], ds)
    for j, d in enumerate(ds):
        ref = reference_lora_a(model_dir, ad, d)
        mask = np.asarray(out.activations.column("doc_id")) == j
        for (layer, module), vals in ref.items():
            got = np.asarray(out.activations.column(A.component_column(layer, module, 2)))[mask]
            np.testing.assert_allclose(got, vals, rtol=1e-4, atol=1e-5)
        nref = reference_neurons(model_dir, d, 8)
        got = np.asarray(out.neurons.column("N01_0007"))[np.asarray(out.neurons.column("doc_id")) == j]
        np.testing.assert_allclose(got, nref[1][:, 7], rtol=1e-4, atol=1e-5)
