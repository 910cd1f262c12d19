"""Fuzzing and simulation scores: pieces worked out by hand, then the autointerp stage against
the local protocol server (tests/llm_server.py), with and without token log-probabilities."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rank1_core.autointerp import scorers as S
from rank1_core.autointerp.prompts import Context, ParseError
from tests.llm_server import FakeLLMServer
from tests.test_autointerp_stage import SIGNATURE, _cfg, keys, write_topk  # noqa: F401  (keys: fixture)


def ctx(tokens, values, hit):
    return Context(rank=1, doc_id=1, pos=hit, value=values[hit], tokens=tokens, values=values, hit_index=hit)


def test_fuzz_marks_strongest_tokens_or_random_weak_ones():
    toks = ["a", " b", " c", " d", " e", " f"]
    c = ctx(toks, [0.0, 4.0, 0.1, 2.5, 0.2, 1.0], 1)
    items = S.fuzz_items([c, c, c, c], "pos", random.Random(0))
    assert sorted(t for _, t in items) == [0, 0, 1, 1]  # half marked right, half at random
    for text, truth in items:
        marks = [m for m in text.split("<<")[1:]]
        marked = {m.split(">>")[0] for m in marks}
        if truth:  # the top token and any within half of it: ' b' (4.0), ' d' (2.5)
            assert marked == {" b", " d"} and text == "a<< b>> c<< d>> e f"
        else:  # as many weak tokens, never a strong one
            assert len(marked) == 2 and not marked & {" b", " d"}
    # the negative side marks the most negative tokens
    n = ctx(toks, [0.0, -4.0, 0.1, 0.0, 0.2, 0.0], 1)
    assert S.fuzz_items([n], "neg", random.Random(0)) == [("a<< b>> c d e f", 1)]


def test_simulation_window_prompt_and_parse():
    c = ctx([f"t{i}" for i in range(30)], [float(i) for i in range(30)], 20)
    toks, vals = S.sim_window(c, 9)
    assert toks == [f"t{i}" for i in range(14, 23)] and vals[6] == 20.0  # 6 before the hit, 2 after
    assert S.sim_window(ctx(["x", "y"], [1.0, 0.0], 0), 9) == (["x", "y"], [1.0, 0.0])
    p = S.simulation_prompt("the token 'y'", [["x", "y"], ["y"]])
    assert 'Excerpt 1 (2 tokens): ["x", "y"]' in p and "(2, 1 integers)" in p
    assert S.parse_simulation('```json\n{"activations": [[0, 10], [3]]}\n```', [2, 1]) == [[0.0, 10.0], [3.0]]
    with pytest.raises(ParseError, match="excerpt 1: 3 predictions for 2 tokens"):
        S.parse_simulation('{"activations": [[0, 1, 2], [3]]}', [2, 1])
    with pytest.raises(ParseError, match="not a number from 0 to 10"):
        S.parse_simulation('{"activations": [[0, 11], [3]]}', [2, 1])
    schema = S.simulation_schema(2, limits=True)
    assert schema["properties"]["activations"]["minItems"] == 2


def test_expected_value_over_digit_tokens_by_hand():
    text = '{"activations": [[0, 10]]}'
    lp = [{"token": '{"activations": [[', "top": []},
          {"token": "0", "top": [["0", math.log(0.5)], ["3", math.log(0.25)], ["a", math.log(0.25)]]},
          {"token": ", ", "top": []},
          {"token": "1", "top": [["1", math.log(0.9)]]}, {"token": "0", "top": [["0", 0.0]]},  # '10' split
          {"token": "]]}", "top": []}]
    vals, method = S.expected_values(text, lp, [[0.0, 10.0]])
    # position 1: (0 * .5 + 3 * .25) / .75 = 1.0 (only digit alternatives count); '10' spans two
    # tokens: the written value
    assert method == "logprobs" and vals == [[pytest.approx(1.0), 10.0]]
    assert S.expected_values(text, None, [[0.0, 10.0]]) == ([[0.0, 10.0]], "parsed")
    # tokens that do not spell the text cannot be aligned: the written values
    assert S.expected_values(text, lp[:2], [[0.0, 10.0]])[1] == "parsed"


def test_correlation_and_weighted_mean_by_hand():
    assert S.correlation([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0)
    assert S.correlation([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert S.correlation([1, 1, 1], [0, 1, 2]) is None
    assert S.weighted_mean([1.0, 0.0, None], [3.0, 1.0, 5.0]) == pytest.approx(0.75)
    assert S.weighted_mean([1.0], [0.0]) is None


def _truth_pred(sig_value_rank):  # contexts of write_topk: the signature token at index 4
    true = [0.1, 0.0, 0.05, 0.2, None, 0.3, 0.0, 0.1, 0.0]
    out_t, out_p = [], []
    for v in sig_value_rank:
        t = list(true)
        t[4] = v
        out_t += t
        out_p += [0, 0, 0, 0, 1, 0, 0, 0, 0]
    return out_t, out_p


@pytest.mark.parametrize("logprobs", [True, False])
def test_stage_scores_every_explained_feature(tiny_cfg, tmp_path, keys, logprobs):  # noqa: F811
    from ray_jobs import autointerp

    with FakeLLMServer(api_key=None) as srv:
        provider = "openai" if logprobs else "anthropic"
        cfg = _cfg(tiny_cfg, tmp_path, srv, "autointerp.scorers=[detection, fuzzing, simulation]",
                   f"autointerp.tasks.score.model={'gpt-5-mini' if logprobs else 'claude-opus-4-1'}")
        run_dir = Path(cfg.run.dir)
        write_topk(run_dir)
        m = autointerp.run(cfg)
        out = run_dir / "autointerp"
        rows = pq.read_table(out / "explanations.parquet").to_pylist()
        assert len(rows) == 9 and all(r["error"] is None for r in rows)
        n_explain = 6  # of the 8 contexts per feature in the fixture: 6 explain, 2 held out (tiny config)
        held = list(range(n_explain + 1, n_explain + 1 + rows[0]["fuzz_n"]))
        for r in rows:
            assert r["score"] == 1.0 and r["fuzz_score"] == 1.0 and r["fuzz_n"] == len(held), r
            top = 5.0 - 0.3 * list(SIGNATURE).index((r["source"], r["feature"]))
            if r["feature"] == "L01_o_proj":
                top = 1.0
            t, p = _truth_pred([top - 0.1 * k for k in held])
            if logprobs:  # expected values over the digit alternatives the server offers
                p = [9.7778 if x else 0.2222 for x in p]
            assert r["simulation_method"] == ("logprobs" if logprobs else "parsed")
            assert r["simulation_n"] == len(t)
            assert r["simulation_score"] == pytest.approx(np.corrcoef(p, t)[0, 1], abs=1e-3), r
        sim_reqs = [q for q in srv.requests if "predict how strongly" in q["prompt"]]
        assert len(sim_reqs) == 9 and all(q["kind"] == provider for q in sim_reqs)
        if logprobs:
            assert all(q["body"]["logprobs"] is True and q["body"]["top_logprobs"] == S.TOP_LOGPROBS for q in sim_reqs)
        calls = pq.read_table(out / "calls.parquet").to_pylist()
        assert sum(c["task"] == "fuzz" for c in calls) == sum(c["task"] == "simulate" for c in calls) == 9
        summ = {r["source"]: r for r in pq.read_table(out / "score_summary.parquet").to_pylist()}
        assert summ["adapter"]["n_fuzz"] == summ["adapter"]["n_simulation"] == 3
        assert summ["adapter"]["mean_fuzz"] == 1.0 and summ["adapter"]["weighted_fuzz"] == 1.0
        sims = {r["feature"]: r["simulation_score"] for r in rows if r["source"] == "sae"}
        rate = {"F00001": 0.08, "F00002": 0.09, "F00003": 0.10}  # write_topk's frac_active
        want = sum(sims[f] * w for f, w in rate.items()) / sum(rate.values())
        assert summ["sae"]["weighted_simulation"] == pytest.approx(want, abs=1e-4)
        costs = m["extra"]["scorer_costs"]
        assert costs["fuzz"]["calls"] == costs["simulate"]["calls"] == costs["score"]["calls"] == 9
        assert costs["simulate"]["features_scored"] == 9 and costs["simulate"]["tokens_out"] > 0
        assert m["extra"]["mean_scores"]["neuron"]["mean_fuzz"] == 1.0
        # the same numbers through `rank1 sql`
        from rank1_core import sql as Q

        con = Q.connect(str(run_dir))
        got = con.sql("SELECT source, weighted_simulation FROM score_summary ORDER BY source").fetchall()
        assert dict(got)["sae"] == pytest.approx(want, abs=1e-4)
        con.close()
        # a rerun answers every scorer from the cache, log-probabilities included
        n = len(srv.requests)
        m2 = autointerp.run(cfg, force=True)
        assert len(srv.requests) == n and m2["extra"]["calls"] == {"cached": len(calls)}
        assert pq.read_table(out / "explanations.parquet").to_pylist() == rows


def test_unparsable_and_skipped_scores_are_labelled(tiny_cfg, tmp_path, keys):  # noqa: F811
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv, "autointerp.scorers=[fuzzing, simulation]")
        write_topk(Path(cfg.run.dir))
        srv.rules.append(["predict how strongly", "malformed", 99])
        autointerp.run(cfg)
        rows = pq.read_table(Path(cfg.run.dir) / "autointerp" / "explanations.parquet").to_pylist()
        assert all(r["score"] is None and r["fuzz_score"] == 1.0 for r in rows)  # detection off
        assert all(r["simulation_score"] is None and "simulate: unparsable answer" in r["error"] for r in rows)
        assert not any(q for q in srv.requests if "text excerpts. The neuron fires strongly" in q["prompt"])
