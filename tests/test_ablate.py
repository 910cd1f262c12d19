"""KL ablation sanity on a tiny model: ablating nothing or a zero-B component gives 0, a
random-B adapter gives positive KL, the batched/restarted computation equals an independent
brute-force one (weights zeroed in a copy, plain forward, KL by hand), ablated adapters on
disk equal hook ablations. The ablate stage end to end is in test_evaluate.py (it needs
the evaluate stage first)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from rank1_core.ablation import (ATTN_MODULES, MLP_MODULES, Ablation, KLAblator, aggregate, kl_per_position,
                                 lora_components, parse_component, plan_ablations, schedule,
                                 write_ablated_adapter)
from rank1_core.models import load_model
from test_evaluate_fixtures import make_adapter

GROUPS = [("attn", ATTN_MODULES, ()), ("mlp", MLP_MODULES, ())]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("abl")
    return {"random": make_adapter(tiny_model_dir, d / "random", seed=0),
            "zero": make_adapter(tiny_model_dir, d / "zero", zero_b=True)}


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (18, 11, 15)]
    mask = [[0] * 5 + [1] * (len(x) - 5) for x in ids]
    return [10, 11, 12], ids, mask


def brute_force_kl(model, names, ids, mask) -> tuple[float, int]:
    """Mean KL(ablated || full) with the components' lora_A weights zeroed in a deep copy,
    one trace at a time through the model's own forward."""
    ablated = copy.deepcopy(model)
    comps = lora_components(ablated)
    with torch.no_grad():
        for n in names:
            comps[n].weight.zero_()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, m in zip(ids, mask):
            a = torch.log_softmax(ablated(torch.tensor([x])).logits[0], -1)
            r = torch.log_softmax(model(torch.tensor([x])).logits[0], -1)
            for t in range(len(x) - 1):
                if m[t + 1]:
                    total += float((a[t].exp() * (a[t] - r[t])).sum())
                    count += 1
    return total / count, count


def test_kl_of_two_distributions_by_hand():
    # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3)
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    assert float(kl_per_position(p, q)[0]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    assert float(kl_per_position(q, q)[0]) == pytest.approx(0.0, abs=1e-7)


def test_plans_name_every_component_layer_and_group():
    comps = [f"L{i:02d}_{m}" for i in range(3) for m in ("q_proj", "gate_proj")]
    plan = plan_ablations(comps, groups=GROUPS + [("late", ("gate_proj",), (2,))])
    names = [a.name for a in plan]
    assert names[:6] == ["L00_q_proj", "L00_gate_proj", "L01_q_proj", "L01_gate_proj", "L02_q_proj", "L02_gate_proj"]
    assert names[6:9] == ["layer_00", "layer_01", "layer_02"]
    by = {a.name: a for a in plan}
    assert by["attn"].components == {"L00_q_proj", "L01_q_proj", "L02_q_proj"}
    assert by["late"].components == {"L02_gate_proj"} and by["late"].start_layer == 2
    assert by["layer_01"].components == {"L01_q_proj", "L01_gate_proj"}
    # Passes share a start layer and hold at most `per_pass` ablations.
    passes = schedule(plan, 3)
    assert all(len({a.start_layer for a in p}) == 1 and len(p) <= 3 for p in passes)
    assert sorted(a.name for p in passes for a in p) == sorted(names)
    with pytest.raises(ValueError, match="selects no component"):
        plan_ablations(comps, groups=[("none", ("down_proj",), ())])
    assert parse_component("L07_down_proj") == (7, "down_proj")
    with pytest.raises(ValueError):
        parse_component("L07_lm_head")


def test_nothing_ablated_and_zero_b_components_give_zero_kl(tiny_model_dir, adapters, docs):
    doc_ids, ids, mask = docs
    model = load_model(tiny_model_dir, "float32", adapter=adapters["zero"])
    comps = list(lora_components(model))
    plan = plan_ablations(comps, groups=GROUPS) + [Ablation("none", "none", frozenset())]
    ab = KLAblator(model, plan)
    agg = aggregate(ab(doc_ids, ids, mask).rows, plan)
    ab.close()
    assert (agg["n_tokens"] == sum(len(x) - 5 for x in ids)).all()
    assert agg["kl_mean"].abs().max() < 1e-9  # B = 0: no ablation changes anything

    model = load_model(tiny_model_dir, "float32", adapter=adapters["random"])
    nothing = [Ablation("none", "none", frozenset())]
    ab = KLAblator(model, nothing)
    agg = aggregate(ab(doc_ids, ids, mask).rows, nothing)
    ab.close()
    assert abs(float(agg["kl_mean"][0])) < 1e-9


def test_random_b_kl_is_positive_and_equals_brute_force(tiny_model_dir, adapters, docs):
    doc_ids, ids, mask = docs
    model = load_model(tiny_model_dir, "float32", adapter=adapters["random"])
    comps = list(lora_components(model))
    assert len(comps) == 14
    plan = plan_ablations(comps, groups=GROUPS)
    ab = KLAblator(model, plan, ablations_per_pass=8)
    res = ab(doc_ids, ids, mask)
    ab.close()
    assert ab.restart  # the restart-at-layer path reproduced the model's own forward
    agg = aggregate(res.rows, plan).set_index("ablation")
    assert (agg["kl_mean"] > 1e-6).all()
    for name in ["L00_gate_proj", "L01_v_proj", "layer_00", "layer_01", "attn", "mlp"]:
        a = next(x for x in plan if x.name == name)
        want, n = brute_force_kl(model, a.components, ids, mask)
        assert agg.loc[name, "n_tokens"] == n
        assert agg.loc[name, "kl_mean"] == pytest.approx(want, rel=1e-4, abs=1e-9)
    # Per-trace rows add up to the mean.
    rows = [r for r in res.rows if r["ablation"] == "attn"]
    assert sorted(r["doc_id"] for r in rows) == doc_ids
    assert sum(r["kl_sum"] for r in rows) / sum(r["n_tokens"] for r in rows) == pytest.approx(agg.loc["attn", "kl_mean"])


def test_full_passes_equal_restarted_passes(tiny_model_dir, adapters, docs):
    doc_ids, ids, mask = docs
    model = load_model(tiny_model_dir, "float32", adapter=adapters["random"])
    plan = plan_ablations(list(lora_components(model)), groups=GROUPS)
    fast = KLAblator(model, plan, ablations_per_pass=5)
    a = aggregate(fast(doc_ids, ids, mask).rows, plan)
    fast.close()
    slow = KLAblator(model, plan, ablations_per_pass=3, restart=False)
    b = aggregate(slow(doc_ids, ids, mask).rows, plan)
    slow.close()
    assert a["kl_mean"].tolist() == pytest.approx(b["kl_mean"].tolist(), rel=1e-4)


def test_aggregate_mean_and_standard_error_by_hand():
    plan = [Ablation("x", "component", frozenset(["L00_q_proj"]), 0, "q_proj")]
    # Per-token KLs 1, 2 (doc 0) and 3 (doc 1): mean 2, sample var 1, sem 1/sqrt(3).
    rows = [{"ablation": "x", "doc_id": 0, "kl_sum": 3.0, "kl_sumsq": 5.0, "kl_max": 2.0, "n_tokens": 2},
            {"ablation": "x", "doc_id": 1, "kl_sum": 3.0, "kl_sumsq": 9.0, "kl_max": 3.0, "n_tokens": 1}]
    r = aggregate(rows, plan).iloc[0]
    assert r.kl_mean == pytest.approx(2.0) and r.kl_sem == pytest.approx(1 / math.sqrt(3))
    assert r.kl_max == 3.0 and r.n_tokens == 3 and r.n_docs == 2


def test_ablated_adapter_on_disk_equals_hook_ablation(tiny_model_dir, adapters, docs, tmp_path):
    doc_ids, ids, mask = docs
    mlp = plan_ablations(list(lora_components(load_model(tiny_model_dir, "float32", adapter=adapters["random"]))),
                         per_component=False, per_layer=False, groups=[("mlp", MLP_MODULES, ())])[0]
    done = write_ablated_adapter(adapters["random"], mlp.components, tmp_path / "mlp")
    assert set(done) == set(mlp.components) and len(done) == 6
    assert json.loads((tmp_path / "mlp" / "ablated_components.json").read_text()) == done
    full = load_model(tiny_model_dir, "float32", adapter=adapters["random"])
    on_disk = load_model(tiny_model_dir, "float32", adapter=tmp_path / "mlp")
    disk_comps = lora_components(on_disk)
    for name, mod in disk_comps.items():
        assert bool((mod.weight == 0).all()) == (name in mlp.components)
    ab = KLAblator(full, [mlp])
    hook = aggregate(ab(doc_ids, ids, mask).rows, [mlp])["kl_mean"][0]
    ab.close()
    want, _ = brute_force_kl(full, [], ids, mask)  # sanity: the full model against itself
    assert want == pytest.approx(0.0, abs=1e-9)
    # KL of the on-disk adapter's distribution against the full adapter's, by hand.
    total, count = 0.0, 0
    with torch.no_grad():
        for x, m in zip(ids, mask):
            a = torch.log_softmax(on_disk(torch.tensor([x])).logits[0], -1)
            r = torch.log_softmax(full(torch.tensor([x])).logits[0], -1)
            for t in range(len(x) - 1):
                if m[t + 1]:
                    total += float((a[t].exp() * (a[t] - r[t])).sum())
                    count += 1
    assert hook == pytest.approx(total / count, rel=1e-4)
    with pytest.raises(ValueError, match="has no component L09_q_proj"):
        write_ablated_adapter(adapters["random"], ["L09_q_proj"], tmp_path / "bad")
