"""Steering on a tiny model (no Ray): alpha 1 reproduces the unsteered generation token for
token, alpha 0 equals the ablation through a separate path (an adapter written by the ablate
stage's `write_ablated_adapter`, generated without hooks), hooks are removed after use (also
after an error), an SAE direction at alpha 0 is the identity and otherwise adds exactly
alpha x mean_act x W_dec[f] x norm_scale, random directions have the requested norm,
position gating, the teacher-forced KL against a brute-force one, hesitation counting and
the automatic choice worked by hand, bad targets, results and the figure."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rank1_core.ablation import kl_per_position, lora_components, write_ablated_adapter
from rank1_core.config import ConfigError
from rank1_core.sae import BatchTopKSAE
from rank1_core.steering import (RESULT_COLUMNS, ComponentStats, Condition, SteerError, SteeringHooks, SteerWorker,
                                 WorkerSpec, aggregate, check_components, check_sae_features, component_condition,
                                 component_magnitude, count_hesitations, hesitation_contexts, hook_count, kl_rows,
                                 plot_target, random_condition, random_direction, sae_condition, sae_direction,
                                 state_norm, unsteered)
from test_evaluate_fixtures import make_adapter

PROMPTS = [[151644, 872, 198, 17, 488, 18, 284], [151644, 872, 198, 20], [151644, 872, 198, 19, 481, 16, 284, 30, 11]]
STATS = ComponentStats(0.2, 1.5)
STEERED = ["L00_q_proj", "L01_gate_proj", "L01_down_proj"]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    # lora_B large enough that one component moves the logits of a random tiny model.
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("steer") / "adapter", seed=3, scale=0.5)


def _spec(model_dir, adapter_dir, **kw):
    return WorkerSpec(str(model_dir), str(adapter_dir), max_new_tokens=10, batch_size=4, threads=1, **kw).to_dict()


@pytest.fixture(scope="module")
def worker(tiny_model_dir, adapter):
    w = SteerWorker(_spec(tiny_model_dir, adapter))
    yield w
    w.close()


@pytest.fixture(scope="module")
def baseline(worker):
    return [s[0].token_ids for s in worker.generate(unsteered(), PROMPTS)]


def tokens(worker, cond, prompts=PROMPTS):
    return [s[0].token_ids for s in worker.generate(cond, prompts)]


def logits(worker, cond: Condition | None, ids: list[int]) -> torch.Tensor:
    """Full-vocabulary logits of one unpadded sequence through the model's own forward."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        if cond is None:
            return worker.model(input_ids=x).logits[0]
        with SteeringHooks(worker.model, cond, prompt_width=len(ids)):
            return worker.model(input_ids=x).logits[0]


# --------------------------------------------------------------------------- alpha 1 and alpha 0


@pytest.mark.parametrize("after", [None, 0, 3])
def test_scale_alpha_one_reproduces_the_unsteered_generation(worker, baseline, after):
    for name in STEERED:
        assert tokens(worker, component_condition(name, "scale", 1.0, STATS, after)) == baseline
    # add alpha 0 and set alpha 1 with typical = the component's constant value are identities too
    assert tokens(worker, component_condition("L01_gate_proj", "add", 0.0, STATS, after)) == baseline
    assert hook_count(worker.model) == 0


def test_steering_changes_generation_at_large_alpha(worker, baseline):
    changed = [tokens(worker, component_condition(n, "scale", 100.0, STATS)) != baseline for n in STEERED]
    assert any(changed)


@pytest.mark.parametrize("name", STEERED)
def test_alpha_zero_equals_the_ablated_adapter(worker, baseline, tiny_model_dir, adapter, tmp_path, name):
    """Separate path: the ablate stage's writer zeroes lora_A on disk; that adapter is
    generated with no hook at all."""
    write_ablated_adapter(adapter, [name], tmp_path / "ablated")
    ablated = SteerWorker(_spec(tiny_model_dir, tmp_path / "ablated"))
    try:
        want = tokens(ablated, unsteered())
        ids = PROMPTS[0] + baseline[0]
        ref = logits(ablated, None, ids)
        for mode in ("scale", "set"):
            cond = component_condition(name, mode, 0.0, STATS)
            assert tokens(worker, cond) == want
            assert torch.equal(logits(worker, cond, ids), ref)
        # and the ablation does something on this adapter (the test could fail)
        assert not torch.equal(logits(worker, None, ids), ref)
    finally:
        ablated.close()


# --------------------------------------------------------------------------- hooks


def test_hooks_are_removed_after_use_and_after_an_error(worker, baseline):
    cond = component_condition("L01_gate_proj", "scale", 50.0, STATS, after=1)
    before = hook_count(worker.model)
    assert before == 0
    with SteeringHooks(worker.model, cond) as h:
        assert hook_count(worker.model) == 2  # decoder pre-hook + one lora_A
        assert h._handles
    assert hook_count(worker.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with SteeringHooks(worker.model, cond):
            raise RuntimeError("boom")
    assert hook_count(worker.model) == 0
    # a failed generation leaves no hook either
    with pytest.raises(Exception):
        with SteeringHooks(worker.model, cond):
            worker.gen.generate([[]], "lora")
    assert hook_count(worker.model) == 0
    assert tokens(worker, unsteered()) == baseline


def test_unknown_component_in_a_condition_fails_before_hooking(worker):
    cond = Condition("x", "L07_q_proj", "component", "adapter", "scale", 2.0, scale={"L07_q_proj": 2.0})
    with pytest.raises(SteerError, match="L07_q_proj"):
        SteeringHooks(worker.model, cond)
    assert hook_count(worker.model) == 0


# --------------------------------------------------------------------------- positions


def test_after_steers_only_from_the_given_position(worker, baseline):
    k = 3
    out = tokens(worker, component_condition("L00_q_proj", "add", 200.0, STATS, after=k))
    everywhere = tokens(worker, component_condition("L00_q_proj", "add", 200.0, STATS))
    # token j is predicted from position (prompt end + j - 1): tokens 0..k are unsteered
    assert all(o[:k + 1] == b[:k + 1] for o, b in zip(out, baseline))
    assert out != baseline and everywhere != baseline
    assert any(e[0] != b[0] for e, b in zip(everywhere, baseline))  # the prompt is steered too


# --------------------------------------------------------------------------- SAE directions


@pytest.fixture(scope="module")
def sae(worker):
    cols = list(lora_components(worker.model))
    s = BatchTopKSAE(len(cols), 4 * len(cols), 4, cols, seed=5)
    with torch.no_grad():
        s.norm_scale.copy_(torch.linspace(0.5, 3.0, len(cols)))
    return s


def test_sae_direction_is_the_unnormalised_decoder_row(sae):
    d = sae_direction(sae, 7)
    want = (sae.W_dec[7] * sae.norm_scale).detach().numpy()
    assert list(d) == sae.columns
    np.testing.assert_allclose(list(d.values()), want, rtol=1e-6)
    with pytest.raises(SteerError, match="does not exist"):
        sae_direction(sae, sae.d_sae)


def test_sae_alpha_zero_is_the_identity(worker, baseline, sae):
    d = sae_direction(sae, 7)
    cond = sae_condition("F00007", d, 0.0, mean_act=2.5)
    assert set(cond.shift) == set(lora_components(worker.model))  # every component is hooked
    assert tokens(worker, cond) == baseline
    ids = PROMPTS[1] + baseline[1]
    assert torch.equal(logits(worker, cond, ids), logits(worker, None, ids))
    assert hook_count(worker.model) == 0


def test_sae_shift_reaches_the_lora_b_input(worker, sae):
    """lora_B's input is the (steered) lora_A output: layer 0's q/k/v read the unsteered
    embeddings, so it moves by exactly alpha x mean_act x W_dec[f] x norm_scale there."""
    d = sae_direction(sae, 3)
    cond = sae_condition("F00003", d, -4.0, mean_act=1.5)
    ids = torch.tensor([PROMPTS[2]])
    model = worker.model
    paths = {n: m for n, m in model.named_modules() if n.endswith("lora_B.lora")}
    assert paths
    got: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, mod in paths.items():
        layer = int(path.split(".layers.")[1].split(".")[0])
        name = f"L{layer:02d}_{path.split('.lora_B')[0].rsplit('.', 1)[-1]}"
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: got.setdefault(n, []).append(a[0].clone())))
    try:
        with torch.inference_mode():
            model(input_ids=ids)
            with SteeringHooks(model, cond, prompt_width=ids.shape[1]):
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for n in ("L00_q_proj", "L00_k_proj", "L00_v_proj"):
        diff = got[n][1] - got[n][0]
        assert torch.allclose(diff, torch.full_like(diff, -4.0 * 1.5 * d[n]), atol=1e-5)


# --------------------------------------------------------------------------- random directions


def test_random_directions_have_the_requested_norm():
    comps = [f"L{i:02d}_{m}" for i in range(3) for m in ("q_proj", "gate_proj")]
    u = random_direction(comps, 0, run_seed=1)
    assert list(u) == comps
    assert math.sqrt(sum(v * v for v in u.values())) == pytest.approx(1.0, abs=1e-12)
    assert u == random_direction(comps, 0, run_seed=1)
    assert u != random_direction(comps, 1, run_seed=1) and u != random_direction(comps, 0, run_seed=2)
    w = {c: 10.0 ** i for i, c in enumerate(comps)}
    un = random_direction(comps, 0, run_seed=1, weights=w)
    assert math.sqrt(sum(v * v for v in un.values())) == pytest.approx(1.0, abs=1e-12)
    assert abs(un[comps[-1]]) > abs(un[comps[0]])  # leans on the large components
    for mode, alpha in [("scale", 10.0), ("scale", -3.0), ("set", 2.0), ("add", -7.0)]:
        target = component_condition("L01_gate_proj", mode, alpha, ComponentStats(3.0, 4.0))
        m = component_magnitude(mode, alpha, ComponentStats(3.0, 4.0))
        r = random_condition(u, 0, m, target)
        assert state_norm(r) == pytest.approx(abs(m), rel=1e-12)
        assert r.perturbation_rms == pytest.approx(target.perturbation_rms, rel=1e-12)
        assert (r.target, r.target_kind, r.mode, r.alpha, r.seed) == ("L01_gate_proj", "random", mode, alpha, 0)
    # SAE: the target's constant shift and its control have the same norm at every token
    d = {c: float(i + 1) for i, c in enumerate(comps)}
    t = sae_condition("F00001", d, 5.0, mean_act=0.5)
    m = 5.0 * 0.5 * math.sqrt(sum(v * v for v in d.values()))
    assert state_norm(random_condition(u, 2, m, t)) == pytest.approx(state_norm(t), rel=1e-12)


def test_component_conditions_by_hand():
    s = ComponentStats(3.0, 4.0)  # rms 5
    assert s.rms == 5.0
    c = component_condition("L1_up_proj", "scale", 10.0, s)
    assert (c.id, c.scale, c.shift, c.perturbation_rms) == ("L01_up_proj|scale|10", {"L01_up_proj": 10.0}, {}, 45.0)
    c = component_condition("L01_up_proj", "set", 2.0, s)
    assert (c.scale, c.shift) == ({"L01_up_proj": 0.0}, {"L01_up_proj": 10.0})
    assert c.perturbation_rms == pytest.approx(math.sqrt(7 ** 2 + 4 ** 2))
    assert component_magnitude("set", 2.0, s) == pytest.approx(math.sqrt(65))
    assert component_magnitude("set", -2.0, s) == pytest.approx(-math.sqrt(13 ** 2 + 16))
    c = component_condition("L01_up_proj", "add", -0.5, s)
    assert (c.scale, c.shift, c.perturbation_rms) == ({}, {"L01_up_proj": -2.5}, 2.5)
    assert component_condition("L01_up_proj", "scale", 1.0, s).identity
    assert component_condition("L01_up_proj", "add", 0.0, s).identity
    assert not component_condition("L01_up_proj", "set", 0.0, s).identity
    with pytest.raises(ValueError, match="mode"):
        component_condition("L01_up_proj", "multiply", 2.0, s)


# --------------------------------------------------------------------------- KL


def test_teacher_forced_kl_equals_a_brute_force_one(worker, baseline):
    cond = component_condition("L01_gate_proj", "scale", 30.0, STATS, after=1)
    rows = kl_rows(worker.lm, worker.decoder, worker.head, PROMPTS, baseline, worker.gen.pad_id,
                   lambda w: SteeringHooks(worker.model, cond, prompt_width=w), cond.after)
    for r, (p, resp) in enumerate(zip(PROMPTS, baseline)):
        ids = p + resp
        ref = torch.log_softmax(logits(worker, None, ids).float(), -1)
        with torch.inference_mode(), SteeringHooks(worker.model, cond, prompt_width=len(p)):
            st = worker.model(input_ids=torch.tensor([ids])).logits[0]
        pos = [len(p) + j - 1 for j in range(cond.after + 1, len(resp))]
        kl = kl_per_position(st[pos], ref[pos]).double()
        assert rows[r][2] == len(pos)
        assert rows[r][0] == pytest.approx(float(kl.sum()), rel=2e-3, abs=1e-6)
        assert rows[r][1] == pytest.approx(float(kl.max()), rel=2e-3, abs=1e-6)
    assert sum(x[0] for x in rows) > 0
    # the identity has KL 0 over every response token
    same = kl_rows(worker.lm, worker.decoder, worker.head, PROMPTS, baseline, worker.gen.pad_id,
                   lambda w: SteeringHooks(worker.model, component_condition("L01_gate_proj", "scale", 1.0, STATS),
                                           prompt_width=w))
    assert [x[0] for x in same] == [0.0, 0.0, 0.0] and [x[2] for x in same] == [len(b) for b in baseline]


def test_worker_unit_rows(worker, baseline):
    items = [{"benchmark": "b", "problem_id": f"p{i}", "prompt_ids": p, "answer": "7", "kind": "math",
              "n_choices": 0, "baseline_ids": baseline[i]} for i, p in enumerate(PROMPTS)]
    same = worker({"condition": component_condition("L00_q_proj", "scale", 1.0, STATS).to_dict(), "items": items})
    assert [r["identical"] for r in same] == [True] * 3 and all(r["kl_sum"] == 0.0 for r in same)
    assert [r["token_ids"] for r in same] == baseline
    far = worker.run({"condition": component_condition("L00_q_proj", "add", 300.0, STATS).to_dict(), "items": items})
    assert sum(r["kl_sum"] for r in far) > 0 and not all(r["identical"] for r in far)
    assert all(r["kl_tokens"] == len(b) for r, b in zip(far, baseline))
    # the unsteered log-probabilities of a batch are cached and shared by its conditions
    assert len(worker._ref) == 1
    cond = component_condition("L01_up_proj", "scale", -20.0, STATS)
    cached = worker.run({"condition": cond.to_dict(), "items": items})
    assert len(worker._ref) == 1
    fresh = kl_rows(worker.lm, worker.decoder, worker.head, PROMPTS, baseline, worker.gen.pad_id,
                    lambda w: SteeringHooks(worker.model, cond, prompt_width=w))
    assert [(r["kl_sum"], r["kl_max"], r["kl_tokens"]) for r in cached] == fresh


# --------------------------------------------------------------------------- measures and targets


def test_hesitation_counting_by_hand():
    words = ["Wait", "Hmm"]
    # whole-word and case-insensitive (rank1_core.lexicon): "wait." counts, "Waiting" does not
    assert count_hesitations("Wait, 2 + 2 = 5. Hmm... Wait! Waiting, await, wait. HmmWait", words) == 4
    assert count_hesitations("", words) == 0
    assert count_hesitations("x\nWait\nWait", words) == 2
    assert count_hesitations("a = b. = c", ["="]) == 2


def test_hesitation_contexts_by_hand():
    ctx = pd.DataFrame([
        # feature A: hit on " Wait" (offset 0), hit just before "Wait" (offset 1), a plain context
        {"source": "adapter", "feature": "L00_q_proj", "sign": "pos", "value": 3.0,
         "context_tokens": ["1", " Wait", ","], "hit_index": 1},
        {"source": "adapter", "feature": "L00_q_proj", "sign": "pos", "value": 2.0,
         "context_tokens": [".", "\n", "Wait", ","], "hit_index": 1},
        {"source": "adapter", "feature": "L00_q_proj", "sign": "pos", "value": 1.0,
         "context_tokens": ["3", " +", " 4"], "hit_index": 1},
        # feature B: "Hmm" split over two tokens at offset 0; a "Waiting" that must not count
        {"source": "adapter", "feature": "L01_up_proj", "sign": "pos", "value": 5.0,
         "context_tokens": [" H", "mm", ","], "hit_index": 0},
        {"source": "adapter", "feature": "L01_up_proj", "sign": "pos", "value": 4.0,
         "context_tokens": [" Waiting"], "hit_index": 0},
        # negative contexts and other sources are ignored
        {"source": "adapter", "feature": "L01_o_proj", "sign": "neg", "value": -9.0,
         "context_tokens": ["Wait"], "hit_index": 0},
        {"source": "sae", "feature": "F00001", "sign": "pos", "value": 9.0, "context_tokens": ["Wait"], "hit_index": 0},
    ])
    h = hesitation_contexts(ctx, "adapter", ["Wait", "Hmm"], [0, 1])
    assert h.to_dict("records") == [
        {"feature": "L00_q_proj", "n_contexts": 3, "n_hesitation": 2, "hesitation_value": 5.0},
        {"feature": "L01_up_proj", "n_contexts": 2, "n_hesitation": 1, "hesitation_value": 5.0},
    ]
    only_hit = hesitation_contexts(ctx, "adapter", ["Wait", "Hmm"], [0])
    assert only_hit.set_index("feature")["n_hesitation"].to_dict() == {"L00_q_proj": 1, "L01_up_proj": 1}
    assert hesitation_contexts(ctx, "sae", ["Wait"], [0])["n_hesitation"].tolist() == [1]


def test_bad_targets_fail_with_clear_errors():
    have = ["L00_q_proj", "L00_k_proj", "L01_down_proj"]
    assert check_components(["L0_q_proj", "L01_down_proj"], have) == ["L00_q_proj", "L01_down_proj"]
    with pytest.raises(SteerError, match=r"unknown component 'L05_q_proj'.*3 components, L00_q_proj \.\. L01_down_proj"):
        check_components(["L05_q_proj"], have)
    with pytest.raises(SteerError, match="not a component name"):
        check_components(["layer5"], have)
    lat = pd.DataFrame({"feature": [0, 1, 2], "name": ["F00000", "F00001", "F00002"], "live": [True, False, False],
                        "dead_in_training": [False, True, False], "mean_act": [1.5, 0.0, 0.0]})
    assert check_sae_features(["F00000"], lat) == [0]
    with pytest.raises(SteerError, match=r"'F00001' is not live \(dead in training\); 1 of 3"):
        check_sae_features(["F00001"], lat)
    with pytest.raises(SteerError, match=r"'F00002' is not live \(never fires\)"):
        check_sae_features(["F00002"], lat)
    with pytest.raises(SteerError, match=r"'F00009' does not exist \(the SAE has 3 latents"):
        check_sae_features(["F00009"], lat)
    assert issubclass(SteerError, ConfigError)  # the CLI prints it as an error, exit code 2


@pytest.mark.parametrize("override, match", [
    ("steer.components=[foo]", "not a component name"),
    ("steer.sae_features=[feat12]", "not an SAE feature name"),
    ("steer.sae_features=[12]", "must be a string"),
    ("steer.after=-1", "steer.after"),
    ("steer.alphas=[]", "steer.alphas"),
    ("steer.alphas=[1, 1]", "more than once"),
    ("steer.modes=[multiply]", "steer.modes"),
    ("steer.hesitation_tokens=[' Wait']", "hesitation_tokens"),
    ("steer.auto_components=0;steer.components=[]", "nothing to steer"),
    ("steer.batch_size=0", "steer.batch_size"),
])
def test_config_errors(tiny_cfg, override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(*override.split(";"))


# --------------------------------------------------------------------------- results and figure


def _samples(cond_id, correct, n_tokens, hes, kl, kl_tok, identical):
    return [{"condition": cond_id, "benchmark": "b", "problem_id": f"p{i}", "response": "", "n_tokens": t,
             "finished": True, "correct": c, "marker_found": True, "hesitations": h, "kl_sum": k, "kl_max": k,
             "kl_tokens": kt, "identical": s, "token_ids": []}
            for i, (c, t, h, k, kt, s) in enumerate(zip(correct, n_tokens, hes, kl, kl_tok, identical))]


def test_aggregate_by_hand():
    base = unsteered()
    c = component_condition("L00_q_proj", "scale", 10.0, STATS)
    rows = _samples(base.id, [True, False], [10, 30], [0, 1], [0.0, 0.0], [10, 30], [True, True]) + \
        _samples(c.id, [False, False], [50, 150], [3, 5], [4.0, 6.0], [50, 150], [False, True])
    res = aggregate(pd.DataFrame(rows), [base, c])
    assert list(res.columns) == RESULT_COLUMNS
    b, s = res.iloc[0], res.iloc[1]
    assert (b.hesitation_rate, b.mean_length, b.accuracy, b.kl_mean) == (2.5, 20.0, 0.5, 0.0)
    assert b.accuracy_stderr == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert (s.hesitation_rate, s.mean_length, s.accuracy, s.kl_mean, s.identical_rate) == (4.0, 100.0, 0.0, 0.05, 0.5)
    assert (s["target"], s["target_kind"], s["mode"], s["alpha"], s["n"]) == ("L00_q_proj", "component", "scale", 10.0, 2)
    with pytest.raises(ValueError, match="no samples"):
        aggregate(pd.DataFrame(rows), [base, c, component_condition("L00_q_proj", "scale", 2.0, STATS)])


def test_figure_per_target(tmp_path):
    u = random_direction(["L00_q_proj", "L01_up_proj"], 0)
    conds, rows = [unsteered()], []
    rows += _samples("unsteered", [True], [20], [1], [0.0], [20], [True])
    for a in (-10.0, 0.0, 1.0, 10.0, 100.0):
        c = component_condition("L00_q_proj", "scale", a, STATS)
        conds.append(c)
        rows += _samples(c.id, [a == 1.0], [20 + abs(a)], [int(abs(a) // 10)], [abs(a - 1)], [20], [a == 1.0])
        for s in (0, 1):
            r = random_condition(u, s, component_magnitude("scale", a, STATS), c)
            conds.append(r)
            rows += _samples(r.id, [a == 1.0], [20 + s], [s], [abs(a - 1) / 10], [20], [a == 1.0])
    res = aggregate(pd.DataFrame(rows), conds)
    p = plot_target(res, "L00_q_proj", tmp_path / "adapter_L00_q_proj.png", dpi=50)
    assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no steering results"):
        plot_target(res, "L09_q_proj", tmp_path / "x.png")
