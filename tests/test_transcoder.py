"""Transcoder adapters, fast tier (no Ray): the sparse branch against hand-worked values, the
zero-initialised decoder, save/load, ablation, the loss terms against a direct computation,
training towards a target, the feature layout through topk's SQL, and bad configs."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from rank1_core.config import (ConfigError, TranscoderConfig, TranscoderHesitationSection, config_from_dict)
from rank1_core.transcoder import (
    FEATURE_SCHEMA,
    LayerAdapter,
    TranscoderAdapter,
    TranscoderError,
    TranscoderObjective,
    TranscoderTrainer,
    count_words,
    decoder_layers,
    faithfulness,
    feature_name,
    fit_layer_stats,
    is_transcoder_dir,
    normalize_word,
    position_masks,
    random_control,
    select_hesitation,
    train_loop,
)
from rank1_core.train import Doc, collate


def build_cfg(**overrides) -> TranscoderConfig:
    base = dict(expansion=2, k=3, lr=3e-2, batch_tokens=64, epochs=1, warmup_ratio=0.0, lr_schedule="constant",
                init_tokens=256)
    base.update(overrides)
    return TranscoderConfig(**base)


def micro_model(seed: int = 0):
    """A 2-layer Qwen2 with a 64-token vocabulary: the loss terms in milliseconds."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    c = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)
    m = AutoModelForCausalLM.from_config(c, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so the MLPs matter
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
    return m.eval()


def perturbed(model, scale: float = 0.5, seed: int = 1):
    t = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder_layers(t):
            w = layer.mlp.down_proj.weight
            w.add_(torch.randn(w.shape, generator=g) * scale * w.std())
    return t


def docs(n: int = 24, length: int = 12, seed: int = 0) -> list[Doc]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = int(rng.integers(length // 2, length + 1))
        mask = np.zeros(L, np.int8)
        mask[L // 3:] = 1
        out.append(Doc(i, rng.integers(0, 64, L).astype(np.int64), mask))
    return out


def set_layer(mod: LayerAdapter, **tensors) -> None:
    with torch.no_grad():
        for k, v in tensors.items():
            getattr(mod, k).copy_(torch.as_tensor(v, dtype=torch.float32))


# --------------------------------------------------------------------------- the branch


def test_topk_branch_matches_hand_worked_values():
    m = LayerAdapter(d_model=2, d_latent=3, k=2)
    set_layer(m, W_enc=[[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]], b_enc=[0.0, 0.5, 0.0],
              W_dec=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], b_dec=[0.1, -0.1], x_mean=[1.0, 0.0])
    m.x_scale.fill_(2.0)
    m.out_scale.fill_(3.0)
    # x = [3, 2]: (x - mean) / scale = [1, 1]; pre = [1, 1.5, 1]; relu keeps all; top-2 = latents 1 (1.5) and
    # one of the tied latents 0/2 (1.0). x = [1, -2]: x_n = [0, -1]; pre = [0, -0.5, -2] -> relu [0, 0, 0].
    x = torch.tensor([[3.0, 2.0], [1.0, -2.0]])
    z = m.dense(x)
    assert z[0, 1] == 1.5 and sorted(z[0].tolist()) == [0.0, 1.0, 1.5]
    assert z[1].tolist() == [0.0, 0.0, 0.0]
    out = m(x)
    # row 0: 1.5 * [0, 1] + 1.0 * (either [1, 0] or [1, 1]) + b_dec, times 3
    expect_a = (torch.tensor([0.0, 1.5]) + torch.tensor([1.0, 0.0]) + torch.tensor([0.1, -0.1])) * 3
    expect_b = (torch.tensor([0.0, 1.5]) + torch.tensor([1.0, 1.0]) + torch.tensor([0.1, -0.1])) * 3
    assert torch.allclose(out[0], expect_a) or torch.allclose(out[0], expect_b)
    assert torch.allclose(out[1], torch.tensor([0.1, -0.1]) * 3)  # nothing active: the bias alone
    # the sparse decode equals the dense one
    dense = (z @ m.W_dec + m.b_dec) * m.out_scale
    assert torch.allclose(out, dense)


def test_ablating_a_latent_zeroes_it_without_promoting_another():
    m = LayerAdapter(d_model=2, d_latent=3, k=1)
    set_layer(m, W_enc=[[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    x = torch.tensor([[1.0, 0.5]])  # pre = [1, 2, 0.5]: top-1 is latent 1
    assert m.dense(x).tolist() == [[0.0, 2.0, 0.0]]
    m.set_keep([1])
    assert m.dense(x).tolist() == [[0.0, 0.0, 0.0]]  # latent 0 does not take the slot
    m.set_keep([])
    assert m.dense(x).tolist() == [[0.0, 2.0, 0.0]]


def test_zero_initialised_decoder_gives_exactly_the_base_model():
    base = micro_model()
    ids = torch.randint(0, 64, (3, 10))
    ref = base(ids).logits
    adapter = TranscoderAdapter.for_model(base, build_cfg())
    with torch.no_grad():  # a trained encoder changes nothing while the decoder is zero
        for l in adapter.layers:
            adapter.layer(l).W_enc.normal_()
    inst = adapter.install(base)
    assert torch.equal(base(ids).logits, ref)
    inst.remove()
    assert torch.equal(base(ids).logits, ref)


def test_adapter_shapes_feature_ids_and_layer_subset():
    base = micro_model()
    a = TranscoderAdapter.for_model(base, build_cfg(layers=[1], expansion=3, k=5))
    assert a.layers == [1] and a.d_latent == 48 and a.k == 5 and a.n_features == 96
    assert a.feature(1, 7) == 55 and a.split_feature(55) == (1, 7) and feature_name(55) == "F00055"
    x = torch.randn(4, 6, 16)
    vals, idx = a.layer(1).encode(x)
    assert vals.shape == idx.shape == (24, 5) and bool((vals >= 0).all()) and int(idx.max()) < 48
    with pytest.raises(TranscoderError, match="layer 0, which has no adapter"):
        a.set_ablation([3])
    with pytest.raises(TranscoderError, match="out of range"):
        TranscoderAdapter(16, 32, 4, [2], num_layers=2)
    with pytest.raises(TranscoderError, match="between 1 and"):
        LayerAdapter(16, 8, 9)


def test_save_load_round_trip_and_install_checks(tmp_path):
    base = micro_model()
    a = TranscoderAdapter.for_model(base, build_cfg(), seed=3, meta={"target": "x"})
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
        a.layer(0).x_scale.fill_(2.5)
    a.save(str(tmp_path / "tc"), extra={"step": 7})
    assert is_transcoder_dir(tmp_path / "tc") and not is_transcoder_dir(tmp_path)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder_adapter" and cfg["step"] == 7 and cfg["target"] == "x"
    b = TranscoderAdapter.load(str(tmp_path / "tc"))
    for (k1, v1), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(5, 16)
    assert torch.equal(a.layer(1)(x), b.layer(1)(x))
    # the hooks refuse a model of another shape
    from transformers import AutoModelForCausalLM, Qwen2Config

    other = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=8, intermediate_size=16,
                                                         num_hidden_layers=2, num_attention_heads=2,
                                                         num_key_value_heads=1))
    with pytest.raises(TranscoderError, match="hidden size 16"):
        b.install(other)
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(TranscoderError, match="format_version"):
        TranscoderAdapter.load(str(tmp_path / "tc"))
    with pytest.raises(TranscoderError, match="missing cfg.json"):
        TranscoderAdapter.load(str(tmp_path))


def test_ablating_no_feature_is_the_identity_and_ablating_all_is_the_base():
    base = micro_model()
    a = TranscoderAdapter.for_model(base, build_cfg())
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(std=0.5)
    inst = a.install(base)
    ids = torch.randint(0, 64, (2, 9))
    on = base(ids).logits
    inst.ablate([])
    assert torch.equal(base(ids).logits, on)
    with inst.disabled():
        off = base(ids).logits
    assert not torch.allclose(on, off)
    with torch.no_grad():
        for l in a.layers:
            a.layer(l).b_dec.zero_()
    inst.ablate(range(a.n_features))  # every latent zeroed and no bias: the base model exactly
    assert torch.equal(base(ids).logits, off)


# --------------------------------------------------------------------------- the loss


def test_loss_terms_equal_a_direct_computation():
    base, target = micro_model(), perturbed(micro_model(), 0.8)
    cfg = build_cfg(sparsity_coef=0.1, recon_coef=0.5, kl_coef=2.0)
    a = TranscoderAdapter.for_model(base, cfg)
    with torch.no_grad():
        for l in a.layers:
            a.layer(l).W_dec.normal_(std=0.3)
    obj = TranscoderObjective(base, target, a, cfg)
    ds = docs(4)
    ids, att, labels = collate(ds, pad_id=0)
    loss, stats = obj(ids, att, labels)
    # direct: KL over real positions that have a next token, FVU per layer of the branch output
    real = att.bool()
    kmask = real.clone()
    kmask[:, :-1] &= real[:, 1:]
    kmask[:, -1] = False
    with torch.no_grad():
        lt = F.log_softmax(target(ids, attention_mask=att).logits[kmask], -1)
    cap = {}
    hooks = [decoder_layers(base)[l].mlp.register_forward_hook(
        lambda m, args, out, l=l: cap.__setitem__(l, (args[0].detach(), out.detach()))) for l in a.layers]
    la = F.log_softmax(base(ids, attention_mask=att).logits[kmask], -1)
    for h in hooks:
        h.remove()
    kl = float((lt.exp() * (lt - la)).sum().detach() / kmask.sum())
    fvus, sp = [], 0.0
    with torch.no_grad():
        for l in a.layers:
            x, out_with = cap[l]
            x = x[real]
            branch = a.layer(l)(x)
            base_out = out_with[real] - branch
            d = decoder_layers(target)[l].mlp(x) - base_out
            fvus.append(float((branch - d).pow(2).sum() / (d - d.mean(0)).pow(2).sum()))
            vals, idx = a.layer(l).encode(x)
            sp += float((vals * a.layer(l).W_dec.norm(dim=1)[idx]).sum() / real.sum())
    recon = float(np.mean(fvus))
    assert stats[1].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert stats[2].item() == pytest.approx(recon, rel=1e-4)
    assert stats[3].item() == pytest.approx(sp, rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * recon + 2.0 * kl + 0.1 * sp, rel=1e-4)
    assert 0 < stats[4].item() <= cfg.k
    loss.backward()
    assert all(p.grad is not None for p in a.parameters())
    assert all(p.grad is None for p in base.parameters()) and all(p.grad is None for p in target.parameters())


def test_loss_is_zero_against_an_identical_target_and_assistant_masks():
    base = micro_model()
    cfg = build_cfg(positions="assistant")
    obj = TranscoderObjective(base, copy.deepcopy(base), TranscoderAdapter.for_model(base, cfg), cfg)
    ids, att, labels = collate(docs(3), pad_id=0)
    loss, stats = obj(ids, att, labels)
    assert loss.item() == 0.0 and stats[1].item() == 0.0
    rm, km = position_masks(att, labels, "assistant")
    assert torch.equal(rm, labels != -100) and torch.equal(km, rm)
    rm, km = position_masks(att, labels, "all")
    assert torch.equal(rm, att.bool()) and int(km.sum()) == int(att.sum()) - att.shape[0]


def test_base_and_target_must_share_their_shape():
    from transformers import AutoModelForCausalLM, Qwen2Config

    base = micro_model()
    other = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=3, num_attention_heads=2,
                                                         num_key_value_heads=1))
    with pytest.raises(TranscoderError, match="differ in shape"):
        TranscoderObjective(base, other, TranscoderAdapter.for_model(base, build_cfg()), build_cfg())


@pytest.mark.parametrize("recon", ["difference", "output"])
def test_training_lowers_the_loss_and_the_kl_to_the_target(recon):
    torch.manual_seed(0)
    base, target = micro_model(), perturbed(micro_model(), 0.8)
    cfg = build_cfg(recon=recon, epochs=12, k=4, expansion=4)
    tr, held = docs(32, seed=0), docs(8, seed=1)
    a = TranscoderAdapter.for_model(base, cfg)
    obj = TranscoderObjective(base, target, a, cfg)
    stats = fit_layer_stats(base, obj.inst, tr, 0, cfg.init_tokens, cfg.batch_tokens, target=target)
    assert all(s.x_scale > 0 and s.out_scale > 0 for s in stats.values())
    a.set_layer_stats(stats)
    before, _ = faithfulness(base, target, obj.inst, held, 0, cfg.batch_tokens)
    assert before["kl_adapted"] == pytest.approx(before["kl_base"]) and before["kl_base"] > 1e-3
    trainer = TranscoderTrainer(obj, cfg, total=10_000)
    rows = []
    state = train_loop(trainer, tr, cfg, 0, 0, report=lambda m, s, c: rows.append(m))
    assert state.finished and state.step == len(rows) > 20
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.6 * first
    after, layers = faithfulness(base, target, obj.inst, held, 0, cfg.batch_tokens)
    assert after["kl_adapted"] < 0.6 * after["kl_base"]  # held-out: the adapters move towards the target
    assert after["fve_difference_mean"] > 0.3 and after["top1_agree_adapted"] > after["top1_agree_base"]
    assert layers.column_names[:3] == ["layer", "tokens", "fve_difference"] and layers.num_rows == 2
    assert all(0 < l0 <= cfg.k for l0 in layers.column("l0").to_pylist())


def test_checkpoint_round_trip_continues_identically(tmp_path):
    from rank1_core.harness import load_checkpoint, save_checkpoint

    base, target = micro_model(), perturbed(micro_model())
    cfg = build_cfg(epochs=2)
    tr = docs(16)

    def fresh():
        a = TranscoderAdapter.for_model(copy.deepcopy(base), cfg)
        obj = TranscoderObjective(copy.deepcopy(base), target, a, cfg)
        return a, TranscoderTrainer(obj, cfg, total=100)

    a1, t1 = fresh()
    saved = {}

    def report(m, s, ckpt):
        if s.step == 3:
            save_checkpoint(t1, s, tmp_path / "ck")
            saved["ok"] = True

    train_loop(t1, tr, cfg, 0, 0, report=report)
    a2, t2 = fresh()
    state = load_checkpoint(t2, tmp_path / "ck")
    assert state.step == 3 and saved["ok"]
    train_loop(t2, tr, cfg, 0, 0, state)
    for (k, v1), v2 in zip(a1.state_dict().items(), a2.state_dict().values()):
        assert torch.allclose(v1, v2, atol=1e-6), k
    assert (tmp_path / "ck" / "adapter" / "cfg.json").exists()


# --------------------------------------------------------------------------- features and hesitation


def test_feature_rows_in_the_sae_layout_are_ranked_by_topk_sql(tmp_path):
    """Features written in the sparse layout go through topk's own SQL (rank_source on a
    sparse source) and come back as the largest values per feature, named F%05d."""
    from rank1_core import sql as S
    from rank1_core.config import TopkConfig
    from rank1_core.topk import Source, rank_source

    base = micro_model()
    a = TranscoderAdapter.for_model(base, build_cfg(k=2))
    inst = a.install(base)
    rows = []
    for d in docs(6):
        with inst.record() as rec:
            base(torch.as_tensor(d.input_ids)[None])
        for l in a.layers:
            v, i = rec[l].vals, rec[l].idx
            for pos in range(d.n):
                for j in range(a.k):
                    if v[pos, j] > 0:
                        rows.append((d.doc_id, pos, a.feature(l, int(i[pos, j])), float(v[pos, j])))
    t = pa.table({"doc_id": pa.array([r[0] for r in rows], pa.int64()), "pos": pa.array([r[1] for r in rows], pa.int32()),
                  "feature": pa.array([r[2] for r in rows], pa.int32()),
                  "value": pa.array([r[3] for r in rows], pa.float32())}, schema=FEATURE_SCHEMA)
    pq.write_table(t, tmp_path / "part-0.parquet")
    con = S.connect(None)
    con.execute(f"CREATE VIEW tc_features AS SELECT * FROM read_parquet('{tmp_path}/part-0.parquet')")
    con.execute("CREATE TABLE acc_summary (feature VARCHAR, doc_id BIGINT, n BIGINT, sum DOUBLE, sumsq DOUBLE, "
                "hi FLOAT, lo FLOAT, n_active BIGINT)")
    con.execute("CREATE TABLE acc_hits (feature VARCHAR, sign VARCHAR, rank INTEGER, doc_id BIGINT, pos INTEGER, "
                "value FLOAT, window_pos INTEGER[], window_values FLOAT[])")
    rank_source(con, Source("transcoder", "tc_features", "sparse"), TopkConfig(k=3, max_per_doc=1, window_before=1,
                                                                                 window_after=1), log=lambda m: None)
    hits = con.execute("SELECT feature, rank, doc_id, pos, value FROM acc_hits WHERE sign = 'pos' "
                       "ORDER BY feature, rank").fetchall()
    df = t.to_pandas()
    assert {h[0] for h in hits} == {feature_name(int(f)) for f in df["feature"].unique()}
    for f, g in df.groupby("feature"):
        best = g.sort_values("value", ascending=False).drop_duplicates("doc_id").head(3)["value"].tolist()
        got = [h[4] for h in hits if h[0] == feature_name(int(f))]
        assert got == pytest.approx(best)


def test_hesitation_words_and_selection():
    import pandas as pd

    assert normalize_word(" Wait,") == "wait" and normalize_word("Hmm...") == "hmm"
    assert count_words("Wait, 3+4=7. Hmm, wait. Waiting is not. HMM", ["Wait", "Hmm"]) == 4
    assert count_words("", ["Wait"]) == 0
    h = TranscoderHesitationSection(min_share=0.5, min_contexts=2, contexts=4, max_features=2)
    cands = pd.DataFrame({"feature": [1, 2, 3, 4, 5], "contexts": [4, 4, 1, 4, 4], "matches": [4, 2, 1, 1, 3],
                          "share": [1.0, 0.5, 1.0, 0.25, 0.75]})
    assert select_hesitation(cands, h) == [1, 5]  # 3 has too few contexts; capped at 2
    h.max_features = 0
    assert select_hesitation(cands, h) == [1, 5, 2]
    lat = pa.table({"feature": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int32()),
                    "live": [True, True, True, True, False, True, True]})
    r = random_control(lat, exclude=[1, 2], n=3, seed=0)
    assert len(r) == 3 and set(r) <= {3, 4, 6, 7} and r == random_control(lat, [1, 2], 3, 0)
    with pytest.raises(TranscoderError, match="cannot draw 5"):
        random_control(lat, [1, 2], 5, 0)


def test_hesitation_sql_counts_contexts_at_and_before_hesitation_tokens():
    from rank1_core import sql as S

    con = S.connect(None)
    con.execute("CREATE TABLE hits AS SELECT * FROM (VALUES "
                "('F00001', 'pos', 1, 0::BIGINT, 2, 5.0::FLOAT), ('F00001', 'pos', 2, 1::BIGINT, 0, 4.0::FLOAT), "
                "('F00002', 'pos', 1, 0::BIGINT, 1, 3.0::FLOAT), ('F00002', 'pos', 2, 1::BIGINT, 1, 2.0::FLOAT), "
                "('F00002', 'neg', 1, 1::BIGINT, 1, -2.0::FLOAT)) t(feature, sign, rank, doc_id, pos, value)")
    con.execute("CREATE TABLE tokens AS SELECT * FROM (VALUES (0::BIGINT, 0, '3'), (0, 1, ' so'), (0, 2, ' Wait'), "
                "(1, 0, 'Hmm'), (1, 1, ','), (1, 2, ' no')) t(doc_id, pos, token)")
    res = {r[0]: r[1:4] for r in S.run_query(con, "transcoder_hesitation",
                                              {"contexts": 4, "words": ["wait", "hmm"], "match": "token"}).fetchall()}
    assert res == {"F00001": (2, 2, 1.0), "F00002": (2, 0, 0.0)}
    res = {r[0]: r[1:4] for r in S.run_query(con, "transcoder_hesitation",
                                              {"contexts": 4, "words": ["wait", "hmm"], "match": "next"}).fetchall()}
    assert res == {"F00001": (2, 0, 0.0), "F00002": (2, 1, 0.5)}  # ' so' precedes ' Wait'
    res = {r[0]: r[1:4] for r in S.run_query(con, "transcoder_hesitation",
                                              {"contexts": 1, "words": ["wait"], "match": "either"}).fetchall()}
    assert res == {"F00001": (1, 1, 1.0), "F00002": (1, 1, 1.0)}


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("section, message", [
    ({"k": 0}, "transcoder.k must be >= 1"),
    ({"expansion": 0}, "transcoder.expansion"),
    ({"layers": [0, 0]}, "duplicates"),
    ({"layers": []}, "non-empty list"),
    ({"layers": [-1]}, "negative"),
    ({"recon_coef": 0, "kl_coef": 0}, "nothing to train on"),
    ({"sparsity_coef": -1}, "transcoder.sparsity_coef"),
    ({"recon": "residual"}, "'transcoder.recon' must be one of"),
    ({"lr": 0}, "transcoder.lr"),
    ({"target": ""}, "transcoder.target"),
    ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ({"bogus": 1}, "unknown key 'transcoder.bogus'"),
])
def test_bad_configs_are_rejected_naming_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict({"transcoder": section})


@pytest.mark.parametrize("data, message", [
    ({"transcoder_extract": {"hesitation": {"min_contexts": 9, "contexts": 8}}}, "min_contexts"),
    ({"transcoder_extract": {"hesitation": {"words": []}}}, "words"),
    ({"transcoder_extract": {"hesitation": {"min_share": 0}}}, "min_share"),
    ({"transcoder_extract": {"hesitation": {"match": "prev"}}}, "'transcoder_extract.hesitation.match' must be one of"),
    ({"transcoder_extract": {"splits": ["test"]}}, "transcoder_extract.splits"),
    ({"transcoder_eval": {"reference": "paper"}}, "'transcoder_eval.reference' must be one of"),
    ({"transcoder_eval": {"actors": 0}}, "transcoder_eval.actors"),
    ({"transcoder_extract": {"hesitation": {"random_control": False}}}, "unknown key "
     "'transcoder_extract.hesitation.random_control'"),
    # the sections that used to be nested in `transcoder:` say where they went
    ({"transcoder": {"extract": {"actors": 2}}}, "'transcoder.extract' moved to the top-level section "
     "'transcoder_extract:'"),
    ({"transcoder": {"hesitation": {"contexts": 8}}}, "'transcoder.hesitation' moved to 'transcoder_extract.hesitation:' "
     "(same keys, except random_control: now transcoder_eval.random_control)"),
    ({"transcoder": {"eval": {"limit": 5}}}, "'transcoder.eval' moved to the top-level section 'transcoder_eval:'"),
])
def test_bad_transcoder_stage_sections_are_rejected_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(data)


def test_an_override_of_a_moved_key_is_blamed(tiny_cfg):
    with pytest.raises(ConfigError, match=r"^override 'transcoder.eval.batch_size=8': 'transcoder.eval' moved to "
                                          r"the top-level section 'transcoder_eval:'"):
        tiny_cfg("transcoder.eval.batch_size=8")


def test_layers_and_k_are_checked_against_the_model(tiny_cfg):
    from ray_jobs.transcoder import validate

    assert validate(tiny_cfg()) == 2
    with pytest.raises(ConfigError, match="layer 5 is out of range"):
        validate(tiny_cfg("transcoder.layers=[0,5]"))
    with pytest.raises(ConfigError, match="exceeds the latents per layer"):
        validate(tiny_cfg("transcoder.k=1000"))


def test_stage_hashes_ignore_the_sections_a_stage_does_not_read(tiny_cfg):
    from rank1_core.config import section_hash

    a, b = tiny_cfg(), tiny_cfg("transcoder_extract.hesitation.min_share=0.9", "transcoder_eval.batch_size=3")
    assert section_hash(a, "transcoder") == section_hash(b, "transcoder")
    assert section_hash(a, "transcoder_extract") != section_hash(b, "transcoder_extract")
    assert section_hash(a, "transcoder_eval") != section_hash(b, "transcoder_eval")
    d = tiny_cfg("transcoder_eval.batch_size=3")
    assert section_hash(a, "transcoder_extract") == section_hash(d, "transcoder_extract")
    c = tiny_cfg("transcoder.k=4")
    assert section_hash(a, "transcoder") != section_hash(c, "transcoder")
    # the transcoder section holds no other stage's settings (its config.yaml shows none at a default)
    assert {"extract", "hesitation", "eval"}.isdisjoint(b.to_dict()["transcoder"])
    assert math.isclose(b.transcoder_extract.hesitation.min_share, 0.9)


def test_generation_worker_ablating_no_feature_is_the_adapters_and_all_features_the_base(tiny_model_dir, tmp_path):
    """The benchmark actor of transcoder_eval: variants share one engine; ablating [] gives the
    adapters' own generations, ablating every feature (no decoder bias) the base model's."""
    import pandas as pd

    from rank1_core.models import load_model
    from rank1_core.transcoder import TranscoderEngineSpec, TranscoderGenerationWorker

    m = load_model(tiny_model_dir)
    a = TranscoderAdapter.for_model(m, build_cfg(k=4))
    with torch.no_grad():
        for l in a.layers:
            a.layer(l).W_enc.normal_()
            a.layer(l).W_dec.normal_(std=2.0)
    a.save(str(tmp_path / "tc"))
    variants = {"base": None, "transcoder": [], "also_transcoder": [], "all_ablated": list(range(a.n_features))}
    spec = TranscoderEngineSpec(str(tiny_model_dir), str(tmp_path / "tc"), variants,
                                {"max_new_tokens": 6, "temperature": 0.0, "n": 1, "seed": 0}, batch_size=4, threads=2)
    w = TranscoderGenerationWorker(spec.to_dict())
    prompts = [[151644, 872, 198, 17, 10, 18], [151644, 872, 198, 19], [151644, 77091, 198]]
    rows = [{"variant": v, "benchmark": "b", "problem_id": str(i), "prompt_ids": p, "answer": "1", "kind": "math",
             "n_choices": 0} for v in variants for i, p in enumerate(prompts)]
    out = w(pd.DataFrame(rows))
    w.close()
    resp = {v: list(g["response"]) for v, g in out.groupby("variant")}
    assert len(out) == 12 and set(out["lora_mode"].isna()) == {True}
    assert resp["transcoder"] == resp["also_transcoder"]
    assert resp["all_ablated"] == resp["base"]
    assert resp["transcoder"] != resp["base"]  # the adapters do change the generations
