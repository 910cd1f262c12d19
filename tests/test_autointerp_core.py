"""autointerp library, fast tier: limiter and retry on a fake clock, cache, budget, prompts and
parsers worked out by hand, and the worker against a local server through the real SDKs."""

from __future__ import annotations

import asyncio
import json
import random
import re

import pytest

from rank1_core.autointerp import prompts as P
from rank1_core.autointerp.cache import ResponseCache, request_key
from rank1_core.autointerp.clients import Endpoint, LLMRequest, Secret, cache_payload, redact
from rank1_core.autointerp.gate import Gate, LocalGate
from rank1_core.autointerp.limiter import ManualClock, ModelLimiter, TokenBucket
from rank1_core.autointerp.pricing import Budget, Price
from rank1_core.autointerp.retry import (RetriesExhausted, RetryPolicy, TransientError, parse_retry_after,
                                         with_retries)
from rank1_core.autointerp.worker import AsyncRunner, Worker
from tests.llm_server import FakeLLMServer

# --------------------------------------------------------------------------- limiter


def test_token_bucket_by_hand():
    clock = ManualClock()
    b = TokenBucket(rate_per_min=60, capacity=2, clock=clock)  # 1 unit/s, 2 at once
    assert [b.reserve(1) for _ in range(4)] == [0.0, 0.0, 1.0, 2.0]
    clock.advance(10)  # debt of 2 repaid, then refills to the capacity only
    assert b.reserve(2) == 0.0
    assert b.reserve(1) == 1.0
    b.give_back(5)  # never above capacity
    assert b.level == 2.0


def _window_max(times: list[float], width: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - width + 1e-9:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize("rpm,burst_s", [(120, 1.0), (600, 0.5), (30, 2.0)])
def test_limiter_never_exceeds_its_rate(rpm, burst_s):
    """Bursty arrivals from many callers: the send times (arrival + wait) never put more than
    capacity + rate * W requests into any window W, and over 60 s never more than rpm + capacity."""
    clock = ManualClock()
    lim = ModelLimiter(rpm=rpm, burst_s=burst_s, clock=clock)
    rng = random.Random(0)
    sends = []
    for _ in range(400):
        clock.advance(rng.choice([0.0, 0.0, 0.0, 0.01, 0.5, 3.0]))
        sends.append(clock() + lim.reserve(0))
    cap, rate = max(1.0, rpm / 60 * burst_s), rpm / 60
    for width in (0.5, 1.0, 10.0, 60.0):
        assert _window_max(sends, width) <= cap + rate * width + 1e-6, width
    # and it is not needlessly slow: a burst goes out at exactly the rate after the capacity
    burst_clock = ManualClock()
    lim = ModelLimiter(rpm=rpm, burst_s=burst_s, clock=burst_clock)
    waits = [lim.reserve(0) for _ in range(20)]
    ncap = int(cap)
    assert waits == pytest.approx([0.0] * ncap + [(k + 1 - (cap - ncap)) / rate for k in range(20 - ncap)])


def test_tokens_per_minute_and_settle():
    clock = ManualClock()
    lim = ModelLimiter(rpm=10_000, tpm=6000, burst_s=1.0, clock=clock)  # 100 tokens/s, 100 at once
    assert lim.reserve(100) == 0.0
    assert lim.reserve(500) == pytest.approx(5.0)  # larger than the capacity: passes after a wait
    lim.settle(estimated=500, actual=100)  # 400 given back
    assert lim.reserve(400) == pytest.approx(5.0)


# --------------------------------------------------------------------------- retry


def test_backoff_delays_and_retry_after():
    pol = RetryPolicy(base_s=1.0, multiplier=2.0, max_s=5.0, jitter=0.5, rng=random.Random(1))
    for attempt, b in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        for _ in range(20):
            assert 0.5 * b <= pol.delay(attempt) <= b
    for _ in range(20):
        assert 3.0 <= pol.delay(1, retry_after=3.0) <= 3.0 + 0.15
    assert pol.delay(1, retry_after=100.0) <= 5.0 + 0.15  # capped


def test_parse_retry_after():
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_with_retries_on_fake_clock():
    clock = ManualClock()
    errors = [TransientError("429", status=429, retry_after=3.0), TransientError("500", status=500)]
    seen = []

    async def fn():
        if errors:
            raise errors.pop(0)
        return "ok"

    pol = RetryPolicy(base_s=1.0, jitter=0.5, rng=random.Random(0))
    out = asyncio.run(with_retries(fn, pol, clock.sleep, seen.append))
    assert out == "ok"
    assert [a.status for a in seen] == [429, 500]
    assert 3.0 <= clock.slept[0] <= 3.15  # Retry-After honoured (+ at most 0.1 * backoff + 0.05)
    assert 1.0 <= clock.slept[1] <= 2.0  # second backoff: base * 2 with up to 50% jitter
    assert clock() == pytest.approx(sum(clock.slept))


def test_retries_exhausted_and_permanent_errors():
    clock = ManualClock()
    calls = []

    async def always_busy():
        calls.append(1)
        raise TransientError("503", status=503)

    with pytest.raises(RetriesExhausted, match="gave up after 4 attempts"):
        asyncio.run(with_retries(always_busy, RetryPolicy(max_attempts=4, base_s=0.5), clock.sleep))
    assert len(calls) == 4 and len(clock.slept) == 3

    async def bad():
        raise ValueError("bad request")

    clock2 = ManualClock()
    with pytest.raises(ValueError):
        asyncio.run(with_retries(bad, RetryPolicy(), clock2.sleep))
    assert clock2.slept == []


# --------------------------------------------------------------------------- budget, gate, cache, secrets


def test_budget_refuses_before_the_cap_and_stays_stopped():
    b = Budget(1.0)
    assert b.reserve(0.4) and b.reserve(0.4)
    assert not b.reserve(0.4)  # 0.8 in flight + 0.4 > 1.0
    assert b.exhausted
    b.settle(0.4, 0.1)
    assert not b.reserve(0.01)  # stopped for good: the stage winds down
    assert b.spent == pytest.approx(0.1)


def test_gate_books_worst_case_and_settles_real_cost():
    gate = Gate({"m": (60, None)}, {"m": Price(1.0, 2.0)}, budget_usd=0.01)
    adm = gate.admit("m", est_tokens_in=1000, max_tokens_out=1000)  # worst case $0.003
    assert adm.ok and adm.reserved_usd == pytest.approx(0.003)
    assert gate.settle(adm, 500, 100) == pytest.approx(0.0007)
    assert gate.budget.spent == pytest.approx(0.0007) and gate.budget.reserved == 0
    for _ in range(3):
        assert gate.admit("m", 1000, 1000).ok  # 0.0007 + 3 * 0.003 = 0.0097
    refused = gate.admit("m", 1000, 1000)
    assert not refused.ok and "budget cap" in refused.reason


def test_budget_refusal_prints_the_figures_that_stopped_it():
    """The issue's case: a cap of $0.02, $0.0139 spent, calls of up to $0.0008. The refusal that
    stops the stage came with $0.0056 in flight; later refusals, after those settled (the issue
    printed '$0.0139 spent + $0.0008 in flight'), repeat its figures, which add up past the cap."""
    gate = Gate({"m": (6000, None)}, {"m": Price(1.0, 1.0)}, budget_usd=0.02)
    first = gate.admit("m", 6_950, 6_950)  # $0.0139
    gate.settle(first, 6_950, 6_950)
    flying = [gate.admit("m", 400, 400) for _ in range(6)]  # 6 x $0.0008 = $0.0048 in flight
    assert all(a.ok for a in flying)
    assert gate.admit("m", 400, 400).ok  # 0.0139 + 0.0048 + 0.0008 = 0.0195 < 0.02: admitted
    refused = gate.admit("m", 400, 400)  # 0.0139 + 0.0056 + 0.0008 = 0.0203 > 0.02
    assert not refused.ok
    for a in flying:
        gate.settle(a, 0, 0)
    later = gate.admit("m", 400, 400)  # $0.0139 spent + $0.0008 in flight now: would fit, but stopped
    assert not later.ok and later.reason == refused.reason

    m = re.fullmatch(r"budget cap reached: \$(\S+) spent \+ \$(\S+) in flight \+ \$(\S+) for the next call at most "
                     r"= \$(\S+), over the cap of \$(\S+)", refused.reason)
    assert m, refused.reason
    spent, flight, call, total, cap = map(float, m.groups())
    assert (spent, flight, call, cap) == (0.0139, 0.0056, 0.0008, 0.02)
    assert spent + flight + call == pytest.approx(total) and total > cap
    # figures that round to the cap get more digits until the sum shown is over it
    from rank1_core.autointerp.pricing import refusal_reason
    assert "= $0.0200001, over the cap of $0.0200000" in refusal_reason(0.0100001, 0.005, 0.005, 0.02)


def test_cache_roundtrip_and_keys(tmp_path):
    cache = ResponseCache(str(tmp_path / "c"))
    ep = Endpoint("m", model="gpt-x")
    req = LLMRequest("explain", "m", "prompt", 100)
    k = request_key(cache_payload(ep, req))
    assert k == request_key(cache_payload(Endpoint("m", model="gpt-x", base_url="http://elsewhere"), req))
    assert k != request_key(cache_payload(ep, LLMRequest("explain", "m", "prompt", 101)))
    assert k != request_key(cache_payload(Endpoint("m", model="gpt-y"), req))
    assert cache.get(k) is None
    cache.put(k, {"text": "hi", "tokens_in": 3})
    assert cache.get(k)["text"] == "hi" and len(cache) == 1
    (tmp_path / "c" / k[:2] / f"{k}.json").write_text("{torn")
    assert cache.get(k) is None  # damaged entry = miss


def test_secret_never_prints_and_redact():
    s = Secret("sk-live-abcdefghijklmnop")
    assert "abcdef" not in f"{s} {s!r} {str(s)} {[s]}"
    msg = "Incorrect API key provided: sk-live-***mnop; also Bearer sk-live-abcdefghijklmnop"
    out = redact(msg, s)
    assert "abcdefghijklmnop" not in out and "klmnop" not in out and "sk-live" not in out


# --------------------------------------------------------------------------- prompts and parsers


def _ctx(tokens, values, rank=1, hit=None):
    hit = max(range(len(values)), key=lambda i: values[i]) if hit is None else hit
    return P.Context(rank, 0, 10, max(values), tokens, values, hit)


def test_activation_format_by_hand():
    c1 = _ctx(["cat", " and", " mouse", "\n"], [0.5, 0.0, 2.0, 0.1])
    c2 = _ctx(["the", " tree"], [1.0, -3.0])
    assert P.format_activations([c1, c2], "pos", listed_tokens=2) == (
        "cat and mouse\\n\nmouse 10.00\ncat 2.50\n\nthe tree\nthe 5.00")
    # negative sign: -3.0 is the strongest, the scale follows it
    assert P.format_activations([c2], "neg", listed_tokens=8) == "the tree\ntree 10.00"
    assert P.show_token("\n") == '"\\n"' and P.show_token(" Wait") == "Wait"


def test_explain_prompt_is_the_papers_and_fits_the_budget():
    fx = P.FeatureExamples("adapter", "L00_q_proj", "pos",
                           [_ctx([f"w{i}"] * 30, [float(i + 1)] * 30, rank=i + 1) for i in range(20)])
    prompt, n = P.explain_prompt(fx, 20, 4, max_prompt_tokens=100_000)
    assert n == 20
    assert "Each neuron looks for some particular thing in a short document." in prompt
    assert '"classification": <0, 1, or 2>,' in prompt and "{{" not in prompt
    small, n_small = P.explain_prompt(fx, 20, 4, max_prompt_tokens=1200)
    assert 1 <= n_small < 20 and len(small) < len(prompt)
    from rank1_core.autointerp.clients import estimate_tokens
    assert estimate_tokens(small) <= 1200


def test_parse_explanation_variants():
    fenced = 'Sure!\n```json\n{"explanation": "Wait tokens", "classification": 0, ' \
             '"classification_reasoning": "all"}\n```\nHope this helps {x}'
    e = P.parse_explanation(fenced)
    assert (e.explanation, e.classification, e.reasoning, e.note) == ("Wait tokens", 0, "all", None)
    trailing = '{"explanation": "x", "classification": "2"} and then some text'
    assert P.parse_explanation(trailing).classification == 2
    bad_cls = P.parse_explanation('{"explanation": "x", "classification": 7}')
    assert bad_cls.classification is None and "not 0, 1 or 2" in bad_cls.note
    for bad in ["", "no json here", '{"classification": 1}', "[1, 2]"]:
        with pytest.raises(P.ParseError):
            P.parse_explanation(bad)


def test_parse_categories_and_choice():
    text = 'Here:\n```json\n{"categories": [{"string_id": "Math Ops", "name": "Math", "definition": "d", ' \
           '"examples": ["a"]}, {"string_id": "math_ops", "name": "dup"}, {"name": "Format tokens"}], ' \
           '"summary": "s"}\n```'
    cats, summary = P.parse_categories(text)
    assert [c.string_id for c in cats] == ["math_ops", "format_tokens"] and summary == "s"
    ids = ["math_ops", "format_tokens"]
    for answer in ["math_ops", "`format_tokens`", '{"string_id": "math_ops"}', '"math_ops"',
                   "The best fit is format_tokens.", "Math Ops"]:
        assert P.parse_category_choice(answer, ids) in ids
    assert P.parse_category_choice("The best fit is format_tokens, not math_ops.", ids) == "format_tokens"
    with pytest.raises(P.ParseError, match="names none"):
        P.parse_category_choice("reasoning_control", ids)
    with pytest.raises(P.ParseError):
        P.parse_categories('{"summary": "no list"}')


def test_detection_scores_by_hand():
    assert P.parse_labels('{"labels": [1, 0, true, "1"]}', 4) == [1, 0, 1, 1]
    with pytest.raises(P.ParseError, match="3 labels for 4"):
        P.parse_labels('{"labels": [1, 0, 1]}', 4)
    assert P.detection_scores([1, 0, 1, 1], [1, 0, 0, 1]) == (0.75, 0.75)
    assert P.detection_scores([1, 1, 1, 1], [1, 1, 1, 0]) == (0.75, 0.5)  # always-yes: chance


# --------------------------------------------------------------------------- worker through the SDKs


KEY = "sk-test-0123456789abcdef"


def _worker(srv, tmp_path, provider="openai", timeout_s=5.0, budget=None, prices=None, attempts=5):
    base = srv.openai_url if provider == "openai" else srv.anthropic_url
    ep = Endpoint("m", provider=provider, model="fake-model", base_url=base, api_key_env="RANK1_TEST_KEY",
                  timeout_s=timeout_s)
    gate = Gate({"m": (60_000, None)}, prices or {}, budget_usd=budget)
    w = Worker({"m": ep}, {"m": Secret(KEY)}, LocalGate(gate), ResponseCache(str(tmp_path / "cache")),
               RetryPolicy(max_attempts=attempts, base_s=0.01, max_s=0.5))
    return w, gate


def _explain_request(tag="adapter/L00_q_proj/pos"):
    """A B.1 request whose examples peak on ' Wait' (the prompt differs per tag)."""
    fx = P.FeatureExamples("adapter", "L00_q_proj", "pos",
                           [_ctx([tag, " Wait", ","], [0.1, 3.0, 0.2], rank=r) for r in (1, 2)])
    prompt, _ = P.explain_prompt(fx, 2, 4, 10_000)
    return LLMRequest("explain", "m", prompt, 200, schema=P.explain_schema(), tag=tag)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_worker_retries_429_and_500_then_caches(provider, tmp_path):
    with FakeLLMServer(api_key=KEY) as srv:
        w, gate = _worker(srv, tmp_path, provider, prices={"m": Price(1.0, 1.0)})
        srv.faults.extend(["429", "500"])
        req = _explain_request()
        res = asyncio.run(w.process(req))
        assert res.status == "ok" and res.attempts == 3, res
        assert [r["status"] for r in res.retries] == [429, 500]
        assert res.retries[0]["waited_s"] >= 0.05  # Retry-After: 0.05
        assert P.parse_explanation(res.text).explanation == "the token 'Wait'"
        assert res.cost_usd > 0 and gate.budget.spent == pytest.approx(res.cost_usd)
        sent = [r for r in srv.requests if r["status"] == 200]
        assert len(sent) == 1 and (("response_format" in sent[0]["body"]) if provider == "openai"
                                   else ("output_config" in sent[0]["body"]))
        n = len(srv.requests)
        w2, _ = _worker(srv, tmp_path, provider)
        again = asyncio.run(w2.process(req))
        assert again.status == "cached" and again.cached and again.text == res.text and again.cost_usd == 0
        assert len(srv.requests) == n  # a cache hit makes no call


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_worker_records_permanent_errors_without_retrying(provider, tmp_path):
    with FakeLLMServer(api_key=KEY) as srv:
        w, _ = _worker(srv, tmp_path, provider)
        srv.faults.append("400")
        res = asyncio.run(w.process(_explain_request()))
        assert res.status == "error" and "HTTP 400" in res.error and res.attempts == 1
        srv.faults.append("badbody")
        res = asyncio.run(w.process(_explain_request("x/y/pos")))
        assert res.status == "error" and res.attempts == 1
        # wrong key: the server echoes part of it; the recorded error does not
        w.secrets["m"] = Secret("sk-wrong-key-9876543210zyxw")
        w.clients.clear()
        res = asyncio.run(w.process(_explain_request("x/z/pos")))
        assert "HTTP 401" in res.error and "9876543210" not in res.error and "zyxw" not in res.error


def test_worker_timeout_is_retried_and_exhaustion_recorded(tmp_path):
    with FakeLLMServer(api_key=KEY, slow_s=1.5) as srv:
        w, _ = _worker(srv, tmp_path, timeout_s=0.5, attempts=2)
        srv.faults.append("slow")
        res = asyncio.run(w.process(_explain_request()))
        assert res.status == "ok" and res.attempts == 2 and "timeout" in res.retries[0]["error"]
        assert res.timeouts == 1 and res.row()["timeouts"] == 1  # abandoned: the server may bill it
        srv.faults.extend(["500", "500"])
        res = asyncio.run(w.process(_explain_request("a/b/pos")))
        assert res.status == "error" and "gave up after 2 attempts" in res.error
        assert res.timeouts == 0  # a 500 is not billed; only timeouts count


def test_identical_requests_in_flight_are_paid_once_and_unparsable_answers_never_served(tmp_path):
    """Six identical requests at once (as two category groups with the same prompt): the
    server is hit once and every request gets that answer. The answer is malformed: it is
    returned, not served from the cache, so the next run asks again (once) and caches the
    good answer; a third run asks nothing."""
    with FakeLLMServer(api_key=KEY, delay_s=0.3) as srv:
        ep = Endpoint("m", model="fake-model", base_url=srv.openai_url, api_key_env="K", timeout_s=5.0)
        cache = ResponseCache(str(tmp_path / "cache"))
        gate = Gate({"m": (60_000, None)}, {"m": Price(1.0, 1.0)})

        def run():
            runner = AsyncRunner(lambda: Worker({"m": ep}, {"m": Secret(KEY)}, LocalGate(gate), cache,
                                                RetryPolicy(base_s=0.01)), concurrency=8)
            one = _explain_request()
            reqs = [LLMRequest("explain", "m", one.prompt, 200, schema=one.schema, tag=f"g{i}/x/pos",
                               origin="attempt-1", check=P.parse_explanation) for i in range(6)]
            return runner.run(reqs)

        srv.rules.append([" Wait", "malformed", 1])
        first = run()
        assert len(srv.requests) == 1
        assert sorted(r.status for r in first) == ["cached"] * 5 + ["ok"]
        assert len({r.text for r in first}) == 1 and "hard to say" in first[0].text
        assert gate.budget.spent > 0 and sum(r.cost_usd for r in first) == pytest.approx(gate.budget.spent)
        entry = cache.get(first[0].key)
        assert entry["unparsable"] and entry["paid_by"] == "attempt-1"  # a cost record, never served

        second = run()
        assert len(srv.requests) == 2
        assert P.parse_explanation(second[0].text).explanation == "the token 'Wait'"
        third = run()
        assert len(srv.requests) == 2 and all(r.status == "cached" for r in third)


def test_cache_entries_written_before_parsing_was_checked_are_not_served(tmp_path):
    """A cache poisoned by an older version (a malformed answer stored as good) is asked again."""
    with FakeLLMServer(api_key=KEY) as srv:
        w, _ = _worker(srv, tmp_path)
        req = _explain_request()
        w.cache.put(w.key_of(req), {"text": "not json at all", "tokens_in": 1, "tokens_out": 1})
        unchecked = asyncio.run(w.process(req))  # no parser given: served as before
        assert unchecked.status == "cached" and srv.requests == []
        checked = LLMRequest(req.task, req.model, req.prompt, req.max_tokens, req.schema, tag=req.tag,
                             check=P.parse_explanation)
        res = asyncio.run(w.process(checked))
        assert res.status == "ok" and len(srv.requests) == 1
        assert w.cache.get(res.key)["unparsable"] is None


def test_worker_budget_stop_is_a_result(tmp_path):
    with FakeLLMServer(api_key=KEY) as srv:
        w, gate = _worker(srv, tmp_path, budget=0.0001, prices={"m": Price(1000.0, 1000.0)})
        res = asyncio.run(w.process(_explain_request()))
        assert res.status == "budget" and "budget cap" in res.error
        assert srv.requests == []  # refused before sending


def test_runner_keeps_the_rate_at_the_server(tmp_path):
    """60 requests, 16 in flight, limiter at 1200/min with a 0.25 s burst: the arrival times
    at the server never put more than capacity + rate * W into a window W."""
    with FakeLLMServer(api_key=KEY) as srv:
        ep = Endpoint("m", model="fake-model", base_url=srv.openai_url, api_key_env="K", timeout_s=5.0)
        gate = Gate({"m": (1200, None)}, {}, burst_s=0.25)
        runner = AsyncRunner(lambda: Worker({"m": ep}, {"m": Secret(KEY)}, LocalGate(gate), None,
                                            RetryPolicy(base_s=0.01)), concurrency=16)
        reqs = [LLMRequest("explain", "m", f"prompt {i}", 10, tag=f"s/f{i}/pos") for i in range(60)]
        results = runner.run(reqs)
        assert all(r.status == "ok" for r in results)
        times = [r["time"] for r in srv.requests]
        cap, rate = 5, 20.0
        for width in (0.25, 0.5, 1.0, 2.0):
            assert _window_max(times, width) <= cap + rate * width + 2, width  # +2: network jitter
        assert max(times) - min(times) >= (60 - cap) / rate - 0.1


def test_cache_payload_has_no_key_or_url():
    ep = Endpoint("m", model="x", base_url="http://127.0.0.1:9/v1", api_key_env="OPENAI_API_KEY")
    blob = json.dumps(cache_payload(ep, LLMRequest("explain", "m", "p", 5)))
    assert "127.0.0.1" not in blob and "OPENAI_API_KEY" not in blob


LOCAL_SCHEMAS = [P.explain_schema(True), P.categories_schema(True), P.score_schema(6, True),
                 P.categorize_schema(["a_b", "c"])]


def test_local_schemas_compile_with_xgrammar():
    xgrammar = pytest.importorskip("xgrammar")
    for schema in LOCAL_SCHEMAS:
        xgrammar.Grammar.from_json_schema(json.dumps(schema))


@pytest.mark.slow
def test_local_schemas_pass_vllms_xgrammar_check():
    """vLLM refuses some keyword mixes xgrammar compiles (e.g. pattern + maxLength): HTTP 400."""
    backend = pytest.importorskip("vllm.v1.structured_output.backend_xgrammar")
    for schema in LOCAL_SCHEMAS:
        assert not backend.has_xgrammar_unsupported_json_features(schema), schema


def test_select_features_takes_the_first_neurons_of_every_layer_and_caps():
    import pyarrow as pa

    from rank1_core.autointerp.pipeline import InputError, select_features
    from rank1_core.config import AutointerpConfig, ConfigError

    names = [f"N{l:02d}_{i:04d}" for l in range(3) for i in range(5)] + ["L00_q_proj", "L01_q_proj"]
    stats = pa.table({"source": ["neuron"] * 15 + ["adapter"] * 2, "feature": names,
                      "max": [float(i) for i in range(17)], "min": [-float(i) for i in range(17)]})
    avail = {("neuron" if n.startswith("N") else "adapter", n, "pos") for n in names}
    a = AutointerpConfig(neurons_per_layer=2)
    got = select_features(stats, a, avail)
    assert [f for s, f, _ in got if s == "neuron"] == ["N00_0000", "N00_0001", "N01_0000", "N01_0001",
                                                        "N02_0000", "N02_0001"]
    assert [f for s, f, _ in got if s == "adapter"] == ["L00_q_proj", "L01_q_proj"]
    # with a cap too: the largest max activations among the first two of each layer
    got = select_features(stats, AutointerpConfig(neurons_per_layer=2, max_features={"neuron": 3}), avail)
    assert [f for s, f, _ in got if s == "neuron"] == ["N01_0001", "N02_0000", "N02_0001"]
    assert len([1 for s, *_ in select_features(stats, AutointerpConfig(), avail) if s == "neuron"]) == 15
    bad = pa.table({"source": ["neuron"], "feature": ["neuron7"], "max": [1.0], "min": [0.0]})
    with pytest.raises(InputError, match="'neuron7'"):
        select_features(bad, a, {("neuron", "neuron7", "pos")})
    with pytest.raises(ConfigError, match="neurons_per_layer"):
        AutointerpConfig(neurons_per_layer=-1)


def test_a_feature_that_is_never_positive_has_its_negative_side_explained():
    import pyarrow as pa

    from rank1_core.autointerp.pipeline import select_features
    from rank1_core.config import AutointerpConfig

    stats = pa.table({"source": ["adapter"] * 3, "feature": ["L00_q_proj", "L00_k_proj", "L00_v_proj"],
                      "max": [2.0, -0.1, 1.0], "min": [-1.0, -3.0, -0.5]})
    avail = {("adapter", "L00_q_proj", "pos"), ("adapter", "L00_q_proj", "neg"), ("adapter", "L00_k_proj", "neg"),
             ("adapter", "L00_v_proj", "pos")}
    got = select_features(stats, AutointerpConfig(), avail)
    assert sorted(got) == [("adapter", "L00_k_proj", "neg"), ("adapter", "L00_q_proj", "pos"),
                           ("adapter", "L00_v_proj", "pos")]
    assert ("adapter", "L00_k_proj", "neg") not in select_features(stats, AutointerpConfig(negative_fallback=False), avail)
    # the cap counts them too, by the size of the side explained: |min| 3.0 beats max 2.0 and 1.0
    capped = select_features(stats, AutointerpConfig(max_features={"adapter": 2}), avail)
    assert capped == [("adapter", "L00_k_proj", "neg"), ("adapter", "L00_q_proj", "pos")]
    assert select_features(stats, AutointerpConfig(max_features={"adapter": 1}), avail) == [
        ("adapter", "L00_k_proj", "neg")]
    both = select_features(stats, AutointerpConfig(signs=["pos", "neg"]), avail)
    assert sorted(both) == sorted([("adapter", "L00_q_proj", "pos"), ("adapter", "L00_v_proj", "pos"),
                                   ("adapter", "L00_q_proj", "neg"), ("adapter", "L00_k_proj", "neg")])


def test_answers_copied_from_the_prompt_are_recognised():
    """The sentences SmolLM2-135M answered with in the demo are the prompt's own; real
    explanations, short ones and quotes of the examples are not."""
    from rank1_core.autointerp import prompts as P

    for text in ["The feature is specific, clear, and monosemantic.",
                 "The feature is specific, clear, and monosemantic. All given examples clearly do.",
                 "Your concise explanation in just a few words", "your concise explanation in just a few words"]:
        assert P.copied_from(text, P.EXPLAIN_INSTRUCTIONS), text
    for text in ["the token ' Wait' after a wrong partial sum", "digits after an equals sign", "Wait", "",
                 "numbers in a chain of additions"]:
        assert not P.copied_from(text, P.EXPLAIN_INSTRUCTIONS), text
    for text in ["Human Readable Category Name", "category_identifier_in_snake_case"]:
        assert P.copied_from(text, P.CATEGORIES_INSTRUCTIONS), text
    assert not P.copied_from("Hesitation and self-correction markers", P.CATEGORIES_INSTRUCTIONS)
    # the examples are not part of the instructions: quoting a context is no copy
    assert "{activations_str}" not in P.EXPLAIN_INSTRUCTIONS and "{feature_list}" not in P.CATEGORIES_INSTRUCTIONS
