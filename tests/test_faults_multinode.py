"""Fault tolerance on a multi-node Ray cluster.

Each test starts its own cluster with Ray's test utility `ray.cluster_utils.Cluster`: a head
node (no CPUs: the driver, Ray Train's controller and Ray Data's coordinator live there, no
work does) and worker nodes, each a separate raylet with its own object store on this
machine. A worker node "crashes": its raylet and every process on it are SIGKILLed at once
(`crash_node`), then a replacement node joins.

1. extract: the node holding the Ray Data extraction actors dies after their first committed
   Parquet part; the actors restart on the new node, and every (doc_id, pos) is in the output
   exactly once.
2. train: the node of the Ray Train worker dies once a checkpoint is registered; Ray Train
   starts the worker on the new node, which resumes from the last registered checkpoint (not
   step 0), and the run ends with the same weights as a run that never failed.
3. autointerp: the node running the stage's driver dies mid-run (its gate and LLM actors,
   wherever Ray placed them, die with their owner) and the stage fails; run again, it
   finishes with every feature, and no answer that was stored is paid for twice (only
   requests in flight at the crash can be sent again).
4. pipeline: the `python -m ray_jobs.pipeline` driver is SIGKILLed during train; submitted
   again it skips finished stages (markers and manifests untouched) and train resumes from
   its checkpoint; a third submission redoes nothing.

Auth: token authentication stays on, with a private token file (env vars read by every node,
the driver and subprocesses). No test uses the session's `ray_session`: a local instance it
started earlier is shut down for this module and started again after it.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from rank1_core.rundir import RunDir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
# A dead node noticed after ~5 s of missed health checks instead of Ray's default ~15 s
# (not faster: a raylet starved of CPU on this 2-core machine must not be taken for dead).
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
               "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5}
DRIVER_ENV = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}
TEMP_DIRS: list[str] = []  # the clusters' temp dirs (a late log write can recreate one after removal)


# --------------------------------------------------------------------------- cluster helpers


@pytest.fixture(scope="module", autouse=True)
def _no_session_ray():
    """A process holds one Ray connection: the session's local instance (conftest
    `ray_session`, if an earlier module started it) is shut down for this module and started
    again afterwards, as conftest starts it, for the modules that follow."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    yield
    for d in TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    if was and not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})


@pytest.fixture
def cluster(tmp_path):
    """A head node with no CPUs; add worker nodes with `cluster.add_node(num_cpus=...)`."""
    import ray
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    saved_env = {k: os.environ.get(k) for k in AUTH_VARS}
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    for k in AUTH_VARS:
        os.environ.pop(k, None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    reset_auth_token_state()
    # Cluster writes its address to Ray's "current cluster" file; put back what was there.
    addr_file = Path(get_ray_address_file(None))
    saved_addr = addr_file.read_text() if addr_file.exists() else None
    temp_dir = tempfile.mkdtemp(prefix="r1c-", dir="/tmp")  # short: Ray's socket paths live in it
    TEMP_DIRS.append(temp_dir)
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False, "_system_config": FAST_HEALTH})
        yield c
    finally:
        try:
            ray.shutdown()
            if c is not None:
                c.shutdown()
        finally:
            _restore(temp_dir, addr_file, saved_addr, saved_env)


def _restore(temp_dir, addr_file, saved_addr, saved_env) -> None:
    from ray._private.authentication_test_utils import reset_auth_token_state

    shutil.rmtree(temp_dir, ignore_errors=True)
    if saved_addr is not None:
        addr_file.write_text(saved_addr)
    elif addr_file.exists():
        addr_file.unlink()
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reset_auth_token_state()


def connect(cluster):
    import ray

    ray.init(address=cluster.address, runtime_env=DRIVER_ENV)
    return ray


def node_processes(node) -> dict[int, str]:
    """Every process of a node but its raylet (workers, actors, agents): pid -> command line."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    out = {}
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            out[p.pid] = " ".join(p.cmdline()).strip()
        except psutil.Error:
            pass
    return out


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def crash_node(cluster, node) -> dict[int, str]:
    """A worker node crashes: its raylet and all its processes SIGKILLed together (workers
    do not get the second or so they would otherwise run on after their raylet died)."""
    from ray._private import ray_constants

    procs = node_processes(node)
    os.kill(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid, signal.SIGKILL)
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)  # the rest of the node's processes; bookkeeping
    wait_for(lambda: not any(alive(p) for p in procs), 30, "the crashed node's processes to be gone")
    return procs


def wait_for(pred, timeout: float, what: str, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its checkpoint manager's snapshot,
    written once a reported checkpoint is registered; a restarted run resumes from these)."""
    snap = run_dir / "train" / "checkpoints" / "ray_train" / "checkpoint_manager_snapshot.json"
    try:
        return sorted(int(r["metrics"]["step"]) for r in json.loads(snap.read_text())["checkpoint_results"])
    except (FileNotFoundError, ValueError, KeyError):
        return []


# --------------------------------------------------------------------------- 1. extract


@pytest.mark.timeout(240)
def test_extract_node_crash_leaves_every_token_exactly_once(cluster, tiny_cfg, tmp_path, tiny_model_dir):
    from ray_jobs import extract, prepare
    from test_extract import fake_train_stage

    # 240 traces in batches of 4: ~60 batches, so the node dies with most of the work to do.
    overrides = ("data.num_traces=240", "extract.batch_docs=4")
    cfg = tiny_cfg(*overrides, run_dir=tmp_path / "run")
    prepare.run(cfg)
    fake_train_stage(tmp_path / "run", tiny_model_dir, seed=9)
    n_tokens = RunDir(cfg.run.dir).stage("prepare").manifest()["rows"]["tokens"]
    tokens_dir = tmp_path / "run" / "extract" / "tokens"

    def committed() -> list[str]:
        return [n for n in os.listdir(tokens_dir) if not n.startswith(".")] if tokens_dir.exists() else []

    node_a = cluster.add_node(num_cpus=4)  # 2 actors of 1 CPU + room for read/repartition tasks
    connect(cluster)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(extract.run, cfg)
        wait_for(lambda: committed() or fut.done(), 180, "the first committed Parquet part")
        assert not fut.done(), "extract finished before the node could be killed"
        killed = crash_node(cluster, node_a)
        at_kill = len(committed())
        cluster.add_node(num_cpus=4)  # the replacement
        m = fut.result(timeout=180)

    actors_a = {p for p, cmd in killed.items() if "MapWorker" in cmd or "Extractor" in cmd}
    assert actors_a, f"no extraction actor ran on the crashed node: {killed}"
    assert 1 <= at_kill < m["rows"]["files"], (at_kill, m["rows"]["files"])
    # Batches were reported by the actors that ran after the crash (on the new node)...
    after = set(m["extra"]["actor_pids"]) - set(killed)
    assert after, m["extra"]["actor_pids"]
    assert not any(alive(p) for p in killed)
    # ...and every (doc_id, pos) is there exactly once, in each of the three tables.
    assert m["rows"]["tokens"] == n_tokens
    con = duckdb.connect()
    for table in ("tokens", "activations", "neurons"):
        got = con.execute(f"SELECT count(*), count(DISTINCT (doc_id, pos)) "
                          f"FROM read_parquet('{tmp_path}/run/extract/{table}/*.parquet')").fetchone()
        assert got == (n_tokens, n_tokens), table
        assert not [p for p in (tmp_path / "run" / "extract" / table).iterdir() if p.name.startswith(".tmp-")]
    names = {t: sorted(p.name for p in (tmp_path / "run" / "extract" / t).iterdir())
             for t in ("tokens", "activations", "neurons")}
    assert names["tokens"] == names["activations"] == names["neurons"]
    assert len(names["tokens"]) == m["rows"]["files"]


# --------------------------------------------------------------------------- 2. train


@pytest.mark.timeout(300)
def test_train_node_crash_resumes_from_the_last_checkpoint(cluster, tiny_cfg, prepared_run, copy_run, tmp_path):
    from ray_jobs import train
    from test_train_ray import assert_same_adapter_as_uninterrupted

    run_dir = copy_run(prepared_run)
    overrides = ("train.epochs=4", "train.max_steps=8", "train.checkpoint_every=2")
    cfg = tiny_cfg(*overrides, run_dir=run_dir)
    node_a = cluster.add_node(num_cpus=2)  # room for the one 2-CPU Ray Train worker
    connect(cluster)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(train.run, cfg)
        wait_for(lambda: registered_steps(run_dir) or fut.done(), 240, "a registered checkpoint", every=0.05)
        assert not fut.done(), "training finished before the node could be killed"
        killed = crash_node(cluster, node_a)
        at_kill = max(registered_steps(run_dir))
        cluster.add_node(num_cpus=2)
        m = fut.result(timeout=240)

    assert any("RayTrainWorker" in cmd for cmd in killed.values()), killed
    steps = m["rows"]["steps"]
    assert steps == 8
    (resumed,) = m["extra"]["resumed_from"]  # restarted once, from the last checkpoint, not step 0
    assert 2 <= at_kill <= resumed < steps and resumed % 2 == 0, (at_kill, resumed)
    metrics = pq.read_table(run_dir / "train" / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(steps + 1))

    # The same weights as a run that never failed (the loop run in this process).
    assert_same_adapter_as_uninterrupted(tiny_cfg, overrides, prepared_run, run_dir, tmp_path / "ref")


# --------------------------------------------------------------------------- 3. autointerp


@pytest.mark.timeout(240)
def test_autointerp_node_crash_loses_no_feature_and_pays_no_stored_answer_twice(cluster, tiny_cfg, tmp_path,
                                                                               monkeypatch):
    from rank1_core.autointerp.cache import ResponseCache
    from ray_jobs import autointerp
    from tests.llm_server import FakeLLMServer
    from tests.test_autointerp_stage import ANTHROPIC_KEY, OPENAI_KEY, SIGNATURE, _cfg, _keys, write_topk

    for k, v in {"RANK1_FAKE_OPENAI_KEY": OPENAI_KEY, "RANK1_FAKE_ANTHROPIC_KEY": ANTHROPIC_KEY}.items():
        monkeypatch.setenv(k, v)
    actors, concurrency = 2, 1
    node_a = cluster.add_node(num_cpus=1, resources={"stage_node": 1})
    ray = connect(cluster)

    # The stage's driver runs on node A (as a job's entrypoint scheduled onto a worker node
    # would). Its gate and LLM actors reserve no CPU, and Ray places those on any node, head
    # included (measured); when their owner dies with node A, they die too.
    @ray.remote(num_cpus=0, resources={"stage_node": 1}, max_retries=0)
    def stage_on_node_a(cfg):
        return autointerp.run(cfg)["finished_at"]

    def llm_actors() -> dict[str, str]:
        from ray._private.state import actors as actor_table  # the GCS's view (no dashboard here)

        return {a["ActorID"]: a["State"] for a in actor_table().values()
                if a["ActorClassName"] in ("WorkerActor", "GateActor")}

    with FakeLLMServer(delay_s=0.4) as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv, f"autointerp.actors={actors}", f"autointerp.concurrency={concurrency}")
        run_dir = Path(cfg.run.dir)
        stage = run_dir / "autointerp"
        write_topk(run_dir)
        keys = {k: os.environ[k] for k in ("RANK1_FAKE_OPENAI_KEY", "RANK1_FAKE_ANTHROPIC_KEY")}
        ref = stage_on_node_a.options(runtime_env={"env_vars": keys}).remote(cfg)
        # 6 received with 2 in flight and a 0.4 s answer: at least 4 answered and cached
        wait_for(lambda: len(srv.answered()) >= 6, 120, "6 LLM requests")
        assert len(llm_actors()) == actors + 1
        killed = crash_node(cluster, node_a)
        with pytest.raises(ray.exceptions.RayError) as err:  # the stage died with its node
            ray.get(ref, timeout=60)
        assert not isinstance(err.value, ray.exceptions.GetTimeoutError)
        wait_for(lambda: set(llm_actors().values()) == {"DEAD"}, 60, "the stage's actors to be dead")
        first = list(srv.requests)
        assert not (stage / "_SUCCESS").exists()
        cache = ResponseCache(str(tmp_path / "llm-cache"))
        stored = {cache.get(k)["request"]["prompt"] for k in _keys(cache)}
        sent_first = {r["prompt"] for r in first}
        assert stored and stored <= sent_first and len(first) < 20, (len(stored), len(first))

        # Once the cluster knows node A is gone (else new actors could be placed on it), a
        # new node joins and the stage runs again, its driver in this process.
        wait_for(lambda: not [n for n in ray.nodes() if n["NodeID"] == node_a.node_id and n["Alive"]], 60,
                 "the cluster to see the node dead")
        cluster.add_node(num_cpus=1)
        srv.delay_s = 0.05
        m = autointerp.run(cfg)  # same config: resumes the partial stage
        second = srv.requests[len(first):]

    assert any("stage_on_node_a" in cmd for cmd in killed.values()), killed
    # No stored answer was requested again; only requests in flight at the crash (their
    # answers never reached a worker) can have been sent twice.
    assert not {r["prompt"] for r in second} & stored
    sent = collections.Counter(r["prompt"] for r in first + second)
    repeated = {p for p, n in sent.items() if n > 1}
    assert repeated <= sent_first - stored and len(repeated) <= actors * concurrency
    assert max(sent.values()) <= 2
    assert m["extra"]["calls"].get("cached", 0) >= len(stored)

    # Every feature is there, explained and scored; every request once in the call log.
    t = pq.read_table(stage / "explanations.parquet").to_pylist()
    assert sorted((r["source"], r["feature"]) for r in t) == sorted(k for k in SIGNATURE
                                                                    if k != ("adapter", "L01_o_proj"))
    assert all(r["explanation"] and r["score"] == 1.0 and r["error"] is None for r in t)
    calls = pq.read_table(stage / "calls.parquet").to_pylist()
    fresh = collections.Counter(c["key"] for c in calls if c["status"] == "ok")  # paid (not from the cache)
    assert fresh and max(fresh.values()) == 1
    assert sum(fresh.values()) <= sum(1 for r in first + second if r["status"] == 200)
    last = max(c["attempt_run"] for c in calls)
    final = [c for c in calls if c["attempt_run"] == last]
    assert len(final) == 9 + 2 + 9 + 9 and {c["status"] for c in final} == {"ok", "cached"}
    # what the crashed attempt logged as paid, the rerun took from the cache
    assert {c["key"] for c in calls if c["attempt_run"] != last and c["status"] == "ok"} <= \
        {c["key"] for c in final if c["status"] == "cached"}
    assert (stage / "_SUCCESS").exists()


# --------------------------------------------------------------------------- 4. pipeline


@pytest.mark.timeout(360)
def test_pipeline_driver_killed_mid_train_resubmitted_redoes_no_finished_stage(cluster, tiny_cfg, tmp_path):
    from rank1_core.config import dump_yaml

    run_dir = tmp_path / "run"
    cfg = tiny_cfg("train.epochs=4", "train.max_steps=8", "train.checkpoint_every=2", run_dir=run_dir)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_yaml(cfg))
    cluster.add_node(num_cpus=2)
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ray_jobs.pipeline", "--config", str(cfg_path), "--stages", "prepare,train"]

    def submit(log: Path) -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    first = submit(tmp_path / "first.log")
    try:
        wait_for(lambda: registered_steps(run_dir) or first.poll() is not None, 240,
                 "a registered train checkpoint", every=0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
        at_kill = max(registered_steps(run_dir))
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    prep, tr = run_dir / "prepare", run_dir / "train"
    assert (prep / "_SUCCESS").exists() and not (tr / "_SUCCESS").exists()
    prep_state = (json.loads((prep / "manifest.json").read_text()), (prep / "_SUCCESS").stat().st_mtime_ns)

    second = submit(tmp_path / "second.log")
    assert second.wait(300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    out = (tmp_path / "second.log").read_text()
    assert "[prepare] done already" in out and "[train] resuming a partial run" in out
    assert (json.loads((prep / "manifest.json").read_text()), (prep / "_SUCCESS").stat().st_mtime_ns) == prep_state
    m = json.loads((tr / "manifest.json").read_text())
    (resumed,) = m["extra"]["resumed_from"]
    assert 2 <= at_kill <= resumed < 8 and m["rows"]["steps"] == 8  # from the checkpoint, not step 0
    metrics = pq.read_table(tr / "metrics.parquet").to_pylist()
    assert [r["step"] for r in metrics] == list(range(9))

    third = submit(tmp_path / "third.log")
    assert third.wait(120) == 0, (tmp_path / "third.log").read_text()[-3000:]
    out = (tmp_path / "third.log").read_text()
    assert "[prepare] done already" in out and "[train] done already" in out
    assert json.loads((tr / "manifest.json").read_text())["finished_at"] == m["finished_at"]
    assert (json.loads((prep / "manifest.json").read_text()), (prep / "_SUCCESS").stat().st_mtime_ns) == prep_state
