"""The autointerp work: explain -> (categories, score) -> categorize, and the tables.

    routing = hosted_routing(cfg.autointerp)           # or, without keys, local_routing(...)
    result = run_autointerp(cfg, stage, topk_stage, routing, runner)

``runner(requests, on_result) -> results`` executes LLM requests: an in-process
:class:`~rank1_core.autointerp.worker.AsyncRunner` or the Ray actors of
``ray_jobs/autointerp.py``. Prompts are deterministic (seeded sampling, sorted inputs), so a
rerun or a resumed crashed run rebuilds the same requests and the cache answers every one it
has already paid for.

Reads ``topk/contexts.parquet`` and ``topk/stats.parquet``; writes into the stage folder:

- ``explanations.parquet``: source, feature, sign, explanation, classification (0/1/2 or
  null), classification_reasoning, category, category_group, score (detection balanced
  accuracy), score_accuracy, score_n, n_contexts, model, error;
- ``categories.json``: generated categories per category group (B.2 schema);
- ``calls.parquet``: one row per request (all attempts of the stage, resumed ones included;
  rows a killed attempt never logged are rebuilt from the cache, see :class:`CallLog`);
- ``classification_shares.parquet``, ``category_shares.parquet`` (Figure 2; Figure 3's
  activation densities), ``score_summary.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import uuid
from collections import Counter
from functools import partial
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rank1_core.autointerp import prompts as P
from rank1_core.autointerp import scorers as S
from rank1_core.autointerp.cache import ResponseCache, request_key
from rank1_core.autointerp.clients import Endpoint, LLMRequest, Secret, cache_payload
from rank1_core.autointerp.pricing import Price
from rank1_core.autointerp.worker import BUDGET, CallResult
from rank1_core.config import AutointerpConfig, Config, ConfigError
from rank1_core.rundir import StageDir

TASKS = ("explain", "categories", "categorize", "score")
CONTEXT_COLUMNS = ("source", "feature", "sign", "rank", "doc_id", "pos", "value", "context_tokens",
                   "context_values", "hit_index")
STATS_COLUMNS = ("source", "feature", "n_tokens", "mean", "std", "min", "max", "frac_active")

Runner = Callable[[list[LLMRequest], Callable[[CallResult], Any]], list[CallResult]]


class InputError(ValueError):
    """The top-k tables are missing or malformed; the message names the file and column."""


# --------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """Which endpoint answers each task, with the limits and prices of every endpoint."""

    endpoints: dict[str, Endpoint]
    task_model: dict[str, str]
    max_tokens: dict[str, int]
    limits: dict[str, tuple[float, float | None]]
    prices: dict[str, Price]
    local: bool = False
    schema_limits: dict[str, bool] = field(default_factory=dict)
    described: str = ""

    def secrets(self, env: dict | None = None) -> dict[str, Secret | None]:
        env = os.environ if env is None else env
        return {n: (Secret(env[e.api_key_env]) if e.api_key_env and env.get(e.api_key_env) else None)
                for n, e in self.endpoints.items()}


def reachable(m, env=None) -> bool:
    """A model can be called: its API key is in the environment, or it has its own server."""
    env = os.environ if env is None else env
    return bool(m.base_url) or bool(m.api_key_env and env.get(m.api_key_env))


def resolve_use_local(a: AutointerpConfig, env=None) -> bool:
    """autointerp.use_local_server, with None decided from the environment."""
    if a.use_local_server is not None:
        return a.use_local_server
    used = {getattr(a.tasks, t).model for t in TASKS}
    ok = {n: reachable(a.model(n), env) for n in sorted(used)}
    if all(ok.values()):
        return False
    if not any(ok.values()):
        return True
    missing = [f"{n} (set ${a.model(n).api_key_env})" for n, v in ok.items() if not v]
    raise ConfigError(
        "autointerp: some task models have an API key or base_url and some do not: "
        f"missing {', '.join(missing)}. Set the keys, give those models a base_url, or set "
        "autointerp.use_local_server=true to answer every task with the local vLLM server")


def resolved(cfg):
    """The config with use_local_server decided from the environment (part of the stage hash,
    so setting an API key later reruns the stage with the hosted models)."""
    import dataclasses

    use_local = resolve_use_local(cfg.autointerp)
    return dataclasses.replace(cfg, autointerp=dataclasses.replace(cfg.autointerp, use_local_server=use_local))


def hosted_routing(a: AutointerpConfig) -> Routing:
    eps, limits, prices, lims = {}, {}, {}, {}
    for m in a.models:
        eps[m.name] = Endpoint(name=m.name, provider=m.provider, model=m.model or m.name, base_url=m.base_url,
                               api_key_env=m.api_key_env, structured=m.structured, temperature=m.temperature,
                               extra_output_tokens=m.extra_output_tokens, params=dict(m.params),
                               timeout_s=m.timeout_s)
        limits[m.name] = (m.rpm, m.tpm)
        prices[m.name] = Price(m.input_usd_per_mtok, m.output_usd_per_mtok)
        lims[m.name] = m.schema_limits
    task_model = {t: getattr(a.tasks, t).model for t in TASKS}
    used = sorted(set(task_model.values()))
    described = ", ".join(f"{t}: {task_model[t]} ({eps[task_model[t]].provider}"
                          + (f" at {eps[task_model[t]].base_url}" if eps[task_model[t]].base_url else "") + ")"
                          for t in TASKS)
    return Routing({n: eps[n] for n in used}, task_model, {t: getattr(a.tasks, t).max_tokens for t in TASKS},
                   {n: limits[n] for n in used}, {n: prices[n] for n in used}, False,
                   {n: lims[n] for n in used}, described)


def local_model_name(cfg: Config) -> str:
    name = cfg.autointerp.local_server.model or cfg.model.name
    return Path(name).name if os.sep in name else name


def local_routing(cfg: Config, base_url: str) -> Routing:
    ls = cfg.autointerp.local_server
    name = local_model_name(cfg)
    ep = Endpoint(name=name, provider="openai", model=name, base_url=base_url, api_key_env=None, structured=True,
                  temperature=ls.temperature, timeout_s=600.0)
    return Routing({name: ep}, {t: name for t in TASKS},
                   {t: min(getattr(cfg.autointerp.tasks, t).max_tokens, ls.max_tokens) for t in TASKS},
                   {name: (ls.rpm, None)}, {name: Price()}, True, {name: True},
                   f"{name} (local vLLM server on 127.0.0.1, {ls.dtype}, structured output) for every task")


@contextmanager
def answerers(cfg: Config, stage: StageDir, use_local: bool, log=print) -> Iterator[Routing]:
    """The routing of a run; with ``use_local`` a vLLM server is started for its duration."""
    if not use_local:
        yield hosted_routing(cfg.autointerp)
        return
    from rank1_core.autointerp.server import LocalServer
    from rank1_core.config import ModelConfig
    from rank1_core.models import resolve_model_dir

    ls = cfg.autointerp.local_server
    mcfg = cfg.model if ls.model is None else ModelConfig(name=ls.model, tiny=cfg.model.tiny)
    model_dir = resolve_model_dir(mcfg)
    log_path = stage.local_path("vllm_server.log") if stage.is_local else Path(f"/tmp/rank1-vllm-{os.getpid()}.log")
    so = json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})
    server = LocalServer(model_dir, local_model_name(cfg), log_path=log_path, dtype=ls.dtype,
                         max_model_len=ls.max_model_len, kv_cache_bytes=int(ls.kv_cache_gb * (1 << 30)),
                         max_num_seqs=ls.max_num_seqs, startup_timeout_s=ls.startup_timeout_s,
                         extra_args=["--structured-outputs-config", so, *ls.extra_args])
    log(f"[autointerp] no API keys: starting a local vLLM server for {local_model_name(cfg)} ({ls.dtype})")
    t0 = time.perf_counter()
    with server:
        log(f"[autointerp] local server ready at {server.base_url} in {time.perf_counter() - t0:.0f}s")
        yield local_routing(cfg, server.base_url)


# --------------------------------------------------------------------------- inputs


def _read(stage: StageDir, name: str, columns: tuple[str, ...], filters=None) -> pa.Table:
    path = stage.path(name)
    if not stage.exists(name):
        raise InputError(f"{stage.uri_of(name)} does not exist: the topk stage must write it")
    try:
        schema = pq.read_schema(path, filesystem=stage.fs) if stage.fs.get_file_info(path).type == pafs.FileType.File \
            else pq.ParquetDataset(path, filesystem=stage.fs).schema
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{stage.uri_of(name)} is not readable Parquet: {e}") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(f"{stage.uri_of(name)} lacks column(s) {missing} (has {schema.names})")
    return pq.read_table(path, filesystem=stage.fs, columns=list(columns), filters=filters)


def _signs_read(a: AutointerpConfig) -> list[str]:
    """Context signs to read: the configured ones, plus 'neg' for the negative fallback."""
    return sorted(set(a.signs) | ({"neg"} if a.negative_fallback and "pos" in a.signs else set()))


def prompt_copies(explained: list) -> dict[str, int]:
    """Explanations per source that repeat the explanation prompt's own wording."""
    out = Counter(r.source for r in explained if P.copied_from(r.explanation, P.EXPLAIN_INSTRUCTIONS))
    return dict(sorted(out.items()))


def neuron_index(name: str) -> int:
    """The neuron's index inside its MLP, from its name 'N<layer>_<index>' (e.g. N03_0012 -> 12)."""
    m = re.fullmatch(r"N\d+_(\d+)", name)
    if m is None:
        raise InputError(f"topk/stats.parquet: neuron feature {name!r} is not named N<layer>_<index>")
    return int(m.group(1))


def select_features(stats: pa.Table, a: AutointerpConfig, available: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(source, feature, sign) to interpret: per source and sign, the features with contexts
    (baseline neurons: the first ``neurons_per_layer`` of every MLP), capped by ``max_features``
    keeping the largest activation of that sign. With ``negative_fallback``, a never-positive
    feature competes for the cap by the size of its negative side."""
    rows = stats.to_pylist()
    if a.neurons_per_layer:
        rows = [r for r in rows if r["source"] != "neuron" or neuron_index(r["feature"]) < a.neurons_per_layer]
    out = []
    fallback = a.negative_fallback and "pos" in a.signs and "neg" not in a.signs
    for source in a.sources:
        for sign in a.signs:
            # (size of the explained side, feature, sign explained)
            cand = [((r["max"] or 0.0) if sign == "pos" else -(r["min"] or 0.0), r["feature"], sign)
                    for r in rows if r["source"] == source and (source, r["feature"], sign) in available]
            if fallback and sign == "pos":
                # Never positive: explain the side it has (marked by its sign 'neg'), ranked
                # with the others by the size of that side, under the same cap.
                cand += [(-(r["min"] or 0.0), r["feature"], "neg") for r in rows if r["source"] == source
                         and (source, r["feature"], "pos") not in available and (source, r["feature"], "neg") in available]
            cand.sort(key=lambda c: (-c[0], c[1]))
            cap = a.max_features.get(source, 0)
            if cap:
                cand = cand[:cap]
            out.extend((source, f, sg) for _, f, sg in sorted(cand, key=lambda c: (c[2] == sign, c[1])))
    return out


def load_features(topk: StageDir, a: AutointerpConfig) -> tuple[list[P.FeatureExamples], pa.Table, dict]:
    """Selected features with their contexts (rank order), the stats table and counts."""
    stats = _read(topk, "stats.parquet", STATS_COLUMNS, filters=[("source", "in", list(a.sources))])
    max_rank = a.explain_contexts + a.score_positives
    ctx = _read(topk, "contexts.parquet", CONTEXT_COLUMNS,
                filters=[("source", "in", list(a.sources)), ("sign", "in", _signs_read(a)), ("rank", "<=", max_rank)])
    keys = set(zip(ctx.column("source").to_pylist(), ctx.column("feature").to_pylist(), ctx.column("sign").to_pylist()))
    chosen = select_features(stats, a, keys)
    wanted = set(chosen)
    by_key: dict[tuple, P.FeatureExamples] = {k: P.FeatureExamples(*k) for k in chosen}
    pools: dict[str, list[P.Context]] = {}
    for i, r in enumerate(ctx.to_pylist()):
        toks, vals = r["context_tokens"], r["context_values"]
        if toks is None or vals is None or len(toks) != len(vals):
            raise InputError(f"{topk.uri_of('contexts.parquet')}: row {i} ({r['source']}/{r['feature']} rank "
                             f"{r['rank']}): context_tokens and context_values differ in length")
        c = P.Context(int(r["rank"]), int(r["doc_id"]), int(r["pos"]), float(r["value"]), list(toks),
                      [float(v) for v in vals], int(r["hit_index"]))
        k = (r["source"], r["feature"], r["sign"])
        if k in wanted:
            by_key[k].contexts.append(c)
        if r["sign"] in a.signs:  # negatives for scoring: contexts of the configured signs only
            pools.setdefault(r["source"], []).append((r["feature"], c))
    for fx in by_key.values():
        fx.contexts.sort(key=lambda c: c.rank)
    counts = {"features_available": len({(s, f) for s, f, _ in keys}), "features_selected": len(chosen)}
    return [by_key[k] for k in chosen], stats, {"counts": counts, "pools": pools}


# --------------------------------------------------------------------------- the call log


class CallLog:
    """Call rows flushed to ``calls/part-*.parquet`` as they land (a crash loses at most a few
    seconds of log); ``finish`` merges every attempt's parts into ``calls.parquet``.

    Before a batch is sent, its request keys go to ``calls/asked-*.parquet``. A killed attempt
    may have paid for answers (cached, each entry naming the attempt in ``paid_by``) whose rows
    never reached a part: reading the earlier attempts, the log rebuilds those rows from the
    cache (``recovered``) and writes them as a part, so the spend counts every paid answer.
    A part a crash left unreadable (torn Parquet) is named in a warning, moved aside to
    ``*.corrupt`` and its paid calls recovered the same way; the stage goes on."""

    def __init__(self, stage: StageDir, cache: ResponseCache | None = None, log=print, flush_rows: int = 64,
                 flush_s: float = 5.0) -> None:
        self.stage = stage
        self.cache = cache
        self.log = log
        self.attempt = f"{int(time.time() * 1000)}-{uuid.uuid4().hex[:6]}"
        self.rows: list[dict] = []
        self.parts = 0
        self.asked_batches = 0
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.last = time.monotonic()
        self.this_run: list[dict] = []

    @staticmethod
    def _split_tag(tag: str) -> dict:
        parts = tag.split("/")
        if len(parts) == 3:
            return {"source": parts[0], "feature": parts[1], "sign": parts[2], "group": None}
        return {"source": None, "feature": None, "sign": None, "group": parts[1] if len(parts) == 2 else tag}

    def asked(self, reqs: list[LLMRequest], keys: list[str]) -> None:
        """Record the keys of a batch before it is sent (what a crash recovery looks up)."""
        if not reqs:
            return
        table = pa.table({"attempt_run": [self.attempt] * len(reqs), "key": keys, "task": [r.task for r in reqs],
                          "model": [r.model for r in reqs], "tag": [r.tag for r in reqs]})
        self.stage.write_parquet(f"calls/asked-{self.attempt}-{self.asked_batches:05d}.parquet", table)
        self.asked_batches += 1

    def add(self, r: CallResult) -> None:
        row = {**r.row(), **self._split_tag(r.tag), "attempt_run": self.attempt, "recovered": False}
        self.rows.append(row)
        self.this_run.append(row)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last > self.flush_s:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.rows:
            return
        self.stage.write_parquet(f"calls/part-{self.attempt}-{self.parts:05d}.parquet", _calls_table(self.rows))
        self.parts += 1
        self.rows = []

    def _earlier(self, kind: str) -> list[pa.Table]:
        """Readable ``calls/<kind>-*.parquet`` of earlier attempts; unreadable ones quarantined."""
        if not self.stage.exists("calls"):
            return []
        sel = pafs.FileSelector(self.stage.path("calls"), allow_not_found=True)
        files = sorted(i.path for i in self.stage.fs.get_file_info(sel)
                       if i.type == pafs.FileType.File and i.base_name.startswith(f"{kind}-")
                       and i.base_name.endswith(".parquet") and not i.base_name.startswith(f"{kind}-{self.attempt}-"))
        out = []
        for f in files:
            try:
                out.append(pq.read_table(f, filesystem=self.stage.fs))
            except (pa.ArrowInvalid, OSError) as e:
                name = f.rsplit("/", 1)[1]
                self.stage.fs.move(f, f"{f}.corrupt")
                lost = ("its paid calls are recovered from the LLM cache" if kind == "part" else
                        "the calls it listed can no longer be recovered if their rows were lost too")
                self.log(f"[autointerp] warning: {self.stage.uri_of('calls', name)} is unreadable, torn by a "
                         f"crashed attempt ({type(e).__name__}: {e}); moved aside to {name}.corrupt; {lost}")
        return out

    def _recover(self, logged: list[pa.Table]) -> pa.Table | None:
        """Rows for answers an earlier attempt asked for, paid for and cached, but never logged."""
        asked = self._earlier("asked") if self.cache is not None else []
        if not asked:
            return None
        paid = set()
        for t in logged:
            for a, k, st in zip(t.column("attempt_run").to_pylist(), t.column("key").to_pylist(),
                                t.column("status").to_pylist()):
                if st == "ok":
                    paid.add((a, k))
        rows: dict[tuple[str, str], dict] = {}
        for t in asked:
            for r in t.to_pylist():
                ak = (r["attempt_run"], r["key"])
                if ak in paid or ak in rows:
                    continue
                e = self.cache.get(r["key"])
                if e is None or e.get("paid_by") != r["attempt_run"]:
                    continue  # not paid by that attempt (a cache hit, or never answered)
                rows[ak] = {"time": float(e.get("stored_at") or time.time()), "attempt_run": r["attempt_run"],
                            "task": r["task"], "model": r["model"], "tag": r["tag"], **self._split_tag(r["tag"]),
                            "cached": False, "status": "ok", "tokens_in": int(e.get("tokens_in") or 0),
                            "tokens_out": int(e.get("tokens_out") or 0), "cost_usd": float(e.get("cost_usd") or 0.0),
                            "error": e.get("unparsable") and f"unparsable answer: {e['unparsable']}",
                            "finish_reason": e.get("finish_reason"), "key": r["key"], "recovered": True}
        if not rows:
            return None
        table = _calls_table(list(rows.values()))
        # Named for the attempt that paid; unique per recovering attempt, so nothing is overwritten.
        self.stage.write_parquet(f"calls/part-{min(a for a, _ in rows)}-recovered-{self.attempt}.parquet", table)
        cost = sum(r["cost_usd"] for r in rows.values())
        self.log(f"[autointerp] {len(rows)} paid call(s) of a killed attempt were missing from the call log: "
                 f"recovered from the LLM cache (${cost:.4f})")
        return table

    def previous(self) -> pa.Table | None:
        """Rows of earlier (crashed) attempts of this stage, recovered ones included."""
        logged = [_conform(t) for t in self._earlier("part")]
        rec = self._recover(logged)
        tables = logged + ([rec] if rec is not None else [])
        return pa.concat_tables(tables) if tables else None

    def spent_before(self) -> float:
        t = self.previous()
        if t is None:
            return 0.0
        return float(pc.sum(t.column("cost_usd")).as_py() or 0.0)

    def finish(self) -> pa.Table:
        self.flush()
        prev = self.previous()
        mine = _calls_table(self.this_run)
        table = pa.concat_tables([prev, mine]) if prev is not None else mine
        table = table.sort_by([("time", "ascending")])
        self.stage.write_parquet("calls.parquet", table)
        return table


CALLS_SCHEMA = pa.schema([
    ("time", pa.timestamp("ms", tz="UTC")), ("attempt_run", pa.string()), ("task", pa.string()),
    ("model", pa.string()), ("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()),
    ("group", pa.string()), ("tag", pa.string()), ("cached", pa.bool_()), ("status", pa.string()),
    ("tokens_in", pa.int64()), ("tokens_out", pa.int64()), ("cost_usd", pa.float64()),
    ("latency_s", pa.float64()), ("attempts", pa.int32()), ("retries", pa.int32()),
    ("retry_errors", pa.string()), ("error", pa.string()), ("finish_reason", pa.string()), ("key", pa.string()),
    ("timeouts", pa.int32()), ("recovered", pa.bool_()),
])


def previous_spend(stage: StageDir, cache: ResponseCache | None = None, log=print) -> float:
    """Dollars spent by earlier, unfinished attempts of this stage (they count against the
    budget), with paid answers a killed attempt never logged recovered from ``cache``."""
    return CallLog(stage, cache, log).spent_before()


def _calls_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in CALLS_SCHEMA}
    cols["time"] = [int(t * 1000) for t in cols["time"]]
    return pa.table(cols, schema=CALLS_SCHEMA)


def _conform(t: pa.Table) -> pa.Table:
    """A part written by an earlier version of this schema: missing columns as nulls."""
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
            for f in CALLS_SCHEMA]
    return pa.Table.from_arrays(cols, schema=CALLS_SCHEMA)


# --------------------------------------------------------------------------- the work


def _unparsable(res: CallResult, err: Exception) -> str:
    cut = " (cut off at max_tokens)" if res.finish_reason in ("length", "max_tokens") else ""
    return f"unparsable answer{cut}: {err}"


def _rng(seed: int, *parts: str) -> random.Random:
    h = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


@dataclass
class FeatureRow:
    source: str
    feature: str
    sign: str
    explanation: str | None = None
    classification: int | None = None
    classification_reasoning: str | None = None
    category: str | None = None
    category_group: str | None = None
    score: float | None = None
    score_accuracy: float | None = None
    score_n: int | None = None
    fuzz_score: float | None = None
    fuzz_accuracy: float | None = None
    fuzz_n: int | None = None
    simulation_score: float | None = None
    simulation_n: int | None = None
    simulation_method: str | None = None
    n_contexts: int = 0
    model: str | None = None
    errors: list[str] = field(default_factory=list)

    def fail(self, task: str, message: str) -> None:
        self.errors.append(f"{task}: {message}")


@dataclass
class AutointerpResult:
    rows: dict[str, int]
    extra: dict


def _held_out(fx: P.FeatureExamples, a: AutointerpConfig) -> tuple[int, list[P.Context]]:
    """(contexts for the explanation, held-out activating contexts for scoring): the
    explanation takes up to explain_contexts but always leaves score_positives aside."""
    n = len(fx.contexts)
    n_explain = max(1, min(a.explain_contexts, n - a.score_positives)) if a.score_positives else min(a.explain_contexts, n)
    return n_explain, fx.contexts[n_explain:n_explain + a.score_positives]


def _negatives(fx: P.FeatureExamples, pool: list[tuple[str, P.Context]], k: int, seed: int) -> list[P.Context]:
    """``k`` contexts of other features of the same source that overlap none of this
    feature's contexts (same document, token windows intersecting) nor each other."""
    if k <= 0 or not pool:
        return []
    mine = {}
    for c in fx.contexts:
        mine.setdefault(c.doc_id, []).append((c.pos - c.hit_index, c.pos - c.hit_index + len(c.tokens)))

    def overlaps(c: P.Context, spans) -> bool:
        lo, hi = c.pos - c.hit_index, c.pos - c.hit_index + len(c.tokens)
        return any(lo < h and l < hi for l, h in spans.get(c.doc_id, ()))

    rng = _rng(seed, "negatives", fx.tag)
    order = list(range(len(pool)))
    rng.shuffle(order)
    out: list[P.Context] = []
    taken: dict[int, list[tuple[int, int]]] = {}
    for i in order:
        feat, c = pool[i]
        if feat == fx.feature or overlaps(c, mine) or overlaps(c, taken):
            continue
        out.append(c)
        taken.setdefault(c.doc_id, []).append((c.pos - c.hit_index, c.pos - c.hit_index + len(c.tokens)))
        if len(out) == k:
            break
    return out


def run_autointerp(cfg: Config, stage: StageDir, topk: StageDir, routing: Routing, runner: Runner,
                   log=print, on_call: Callable[[CallResult], Any] | None = None) -> AutointerpResult:
    """The whole stage body. ``on_call`` sees every call result as it lands (progress bars)."""
    a = cfg.autointerp
    seed = cfg.run.seed
    t_start = time.perf_counter()
    features, stats, info = load_features(topk, a)
    log(f"[autointerp] {len(features)} features selected of {info['counts']['features_available']} "
        f"({', '.join(f'{s}: {sum(1 for f in features if f.source == s)}' for s in a.sources)})")
    calls = CallLog(stage, ResponseCache(default_cache_dir(a)), log)
    state = {"stopped": None}
    rows = {fx.tag: FeatureRow(fx.source, fx.feature, fx.sign) for fx in features}
    fx_by_tag = {fx.tag: fx for fx in features}

    def request(task: str, prompt: str, schema: dict | None, tag: str, check=None) -> LLMRequest:
        """``check``: the answer's parser; an answer it rejects is never served from the cache."""
        model = routing.task_model[task]
        return LLMRequest(task=task, model=model, prompt=prompt, max_tokens=routing.max_tokens[task],
                          schema=schema, tag=tag, origin=calls.attempt, check=check)

    def scorer_request(task, prompt, schema, tag, check, max_tokens, logprobs, n) -> LLMRequest:
        """Fuzzing and simulation go to the detection task's model (and its limits)."""
        model = routing.task_model["score"]
        lp = S.TOP_LOGPROBS if logprobs and routing.endpoints[model].provider == "openai" else 0
        return LLMRequest(task=task, model=model, prompt=prompt,
                          max_tokens=max(routing.max_tokens["score"], max_tokens or 0),
                          schema=schema(n, limits_of[model]), tag=tag, origin=calls.attempt, check=check,
                          top_logprobs=lp)

    def execute(reqs: list[LLMRequest]) -> list[CallResult]:
        if state["stopped"]:
            return [CallResult(tag=r.tag, task=r.task, model=r.model, status=BUDGET, error=state["stopped"])
                    for r in reqs]
        def landed(r: CallResult) -> None:
            calls.add(r)
            if on_call is not None:
                on_call(r)

        calls.asked(reqs, [request_key(cache_payload(routing.endpoints[r.model], r)) if r.model in routing.endpoints
                           else "" for r in reqs])
        results = runner(reqs, landed)
        calls.flush()
        for r in results:
            if r.status == BUDGET and not state["stopped"]:
                state["stopped"] = r.error or "budget cap reached"
                log(f"[autointerp] stopping: {state['stopped']}")
        return results

    limits_of = routing.schema_limits

    # ---- 1. explanations (B.1)
    reqs, used = [], {}
    for fx in features:
        n_explain, _ = _held_out(fx, a)
        prompt, n = P.explain_prompt(fx, n_explain, a.listed_tokens, a.max_prompt_tokens)
        used[fx.tag] = n
        reqs.append(request("explain", prompt, P.explain_schema(limits_of[routing.task_model["explain"]]), fx.tag,
                            P.parse_explanation))
    with _timed(info, "explain"):
        results = execute(reqs)
    for res in results:
        row = rows[res.tag]
        row.n_contexts = used[res.tag]
        row.model = res.model
        if res.text is None:
            row.fail("explain", res.error or res.status)
            continue
        try:
            e = P.parse_explanation(res.text)
        except P.ParseError as err:
            row.fail("explain", _unparsable(res, err))
            continue
        row.explanation, row.classification, row.classification_reasoning = e.explanation, e.classification, e.reasoning
        if e.note:
            row.fail("explain", e.note)
    explained = [rows[fx.tag] for fx in features if rows[fx.tag].explanation]
    log(f"[autointerp] explained {len(explained)}/{len(features)}")
    copies = prompt_copies(explained)
    if copies:
        log(f"[autointerp] warning: {sum(copies.values())} of {len(explained)} explanations repeat the prompt's own "
            f"wording instead of describing the contexts ({', '.join(f'{s} {n}' for s, n in copies.items())}): "
            f"{routing.task_model['explain']} is too weak an explainer; the scores will show it")

    # ---- 2. category generation per group (B.2) and detection scoring, in one batch
    group_of = {s: g for g, srcs in a.category_groups.items() for s in srcs}
    groups: dict[str, dict] = {}
    batch: list[LLMRequest] = []
    present = {fx.source for fx in features}
    for g, srcs in a.category_groups.items():
        # A group whose sources the run does not have (e.g. no transcoder) makes no call.
        srcs = [s for s in srcs if s in a.sources and s in present]
        if not srcs:
            continue
        shown = _category_sample(explained, srcs, a.category_max_features, seed, g)
        prompt, shown = _fit_categories(shown, a.max_prompt_tokens)
        groups[g] = {"sources": srcs, "model": routing.task_model["categories"], "n_features_shown": len(shown),
                     "categories": [], "summary": "", "error": None}
        if not shown:
            groups[g]["error"] = "no explained features in this group"
            continue
        batch.append(request("categories", prompt, P.categories_schema(limits_of[routing.task_model["categories"]]),
                             f"group/{g}", P.parse_categories))
    truth: dict[str, list[int]] = {}
    if "detection" in a.scorers and a.score_positives and a.score_negatives:
        for row in explained:
            fx = fx_by_tag[f"{row.source}/{row.feature}/{row.sign}"]
            _, pos = _held_out(fx, a)
            neg = _negatives(fx, info["pools"].get(fx.source, []), a.score_negatives, seed)
            if not pos or not neg:
                row.fail("score", f"not scored: {len(pos)} held-out activating and {len(neg)} non-activating "
                                  "contexts available")
                continue
            items = [(c, 1) for c in pos] + [(c, 0) for c in neg]
            _rng(seed, "score-order", fx.tag).shuffle(items)
            truth[fx.tag] = [t for _, t in items]
            batch.append(request("score", P.score_prompt(row.explanation, ["".join(c.tokens) for c, _ in items]),
                                 P.score_schema(len(items), limits_of[routing.task_model["score"]]), fx.tag,
                                 partial(P.parse_labels, n=len(items))))
    more = S.build_requests(
        a.scorers, explained,
        lambda r: (_held_out(fx_by_tag[f"{r.source}/{r.feature}/{r.sign}"], a)[1],
                   _negatives(fx_by_tag[f"{r.source}/{r.feature}/{r.sign}"], info["pools"].get(r.source, []),
                              a.score_negatives, seed)),
        None, a.simulation_tokens, lambda name, tag: _rng(seed, name, tag), scorer_request)
    batch.extend(more["requests"])
    for (scorer, tag), why in more["skipped"].items():
        rows[tag].fail(S.TASKS[scorer], why)
    with _timed(info, "categories+score"):
        results = execute(batch)
    for res in results:
        if res.task == "categories":
            g = res.tag.split("/", 1)[1]
            if res.text is None:
                groups[g]["error"] = res.error or res.status
                continue
            try:
                cats, summary = P.parse_categories(res.text)
            except P.ParseError as err:
                groups[g]["error"] = _unparsable(res, err)
                continue
            groups[g]["categories"] = [c.__dict__ for c in cats]
            groups[g]["summary"] = summary
            groups[g]["copied_from_prompt"] = [c.string_id for c in cats
                                               if P.copied_from(c.name, P.CATEGORIES_INSTRUCTIONS)
                                               or P.copied_from(c.string_id, P.CATEGORIES_INSTRUCTIONS)]
            if groups[g]["copied_from_prompt"]:
                log(f"[autointerp] warning: categories of group {g!r} copy the prompt's placeholders "
                    f"({', '.join(groups[g]['copied_from_prompt'])}): {routing.task_model['categories']} "
                    "is too weak for category generation")
        elif res.task in S.TASKS.values():
            S.apply_result(res, rows[res.tag], more["cases"], _unparsable)
        else:
            row = rows[res.tag]
            if res.text is None:
                row.fail("score", res.error or res.status)
                continue
            try:
                labels = P.parse_labels(res.text, len(truth[res.tag]))
            except P.ParseError as err:
                row.fail("score", _unparsable(res, err))
                continue
            row.score_accuracy, row.score = P.detection_scores(labels, truth[res.tag])
            row.score_n = len(labels)
    for g, info_g in groups.items():
        if info_g["error"]:
            log(f"[autointerp] categories for group {g!r}: {info_g['error']}")

    # ---- 3. one category per feature (B.2)
    reqs = []
    for row in explained:
        g = group_of.get(row.source)
        if g is None or g not in groups:
            continue
        row.category_group = g
        cats = [P.Category(**c) for c in groups[g]["categories"]]
        if not cats:
            row.fail("categorize", f"no categories for group {g!r}")
            continue
        fx = fx_by_tag[f"{row.source}/{row.feature}/{row.sign}"]
        prompt = P.categorize_prompt(row.explanation, fx, cats, a.categorize_contexts, a.listed_tokens)
        ids = [c.string_id for c in cats]
        reqs.append(request("categorize", prompt, P.categorize_schema(ids), fx.tag,
                            partial(P.parse_category_choice, ids=ids)))
    with _timed(info, "categorize"):
        results = execute(reqs)
    for res in results:
        row = rows[res.tag]
        if res.text is None:
            row.fail("categorize", res.error or res.status)
            continue
        ids = [c["string_id"] for c in groups[row.category_group]["categories"]]
        try:
            row.category = P.parse_category_choice(res.text, ids)
        except P.ParseError as err:
            row.fail("categorize", _unparsable(res, err))

    # ---- outputs
    table = _explanations_table([rows[fx.tag] for fx in features])
    stage.write_parquet("explanations.parquet", table)
    stage.write_json("categories.json", {"groups": groups})
    call_table = calls.finish()
    shares = classification_shares(table)
    cat_shares = category_shares(table, stats, groups)
    scores = score_summary(table, stats)
    stage.write_parquet("classification_shares.parquet", shares)
    stage.write_parquet("category_shares.parquet", cat_shares)
    stage.write_parquet("score_summary.parquet", scores)

    mine = calls.this_run
    extra = {
        "explanations_by": routing.described,
        "local_server": routing.local,
        "models": dict(routing.task_model),
        "spend_usd": round(sum(r["cost_usd"] for r in mine), 6),
        "spend_total_usd": round(float(pc.sum(call_table.column("cost_usd")).as_py() or 0.0), 6),
        "budget_usd": a.budget_usd,
        "budget_stopped": state["stopped"],
        "calls": _count(r["status"] for r in mine),
        "calls_all_attempts": call_table.num_rows,
        "calls_recovered": int(pc.sum(call_table.column("recovered")).as_py() or 0),
        "abandoned_after_timeout": sum(r["timeouts"] for r in mine),
        "abandoned_after_timeout_all_attempts": int(pc.sum(call_table.column("timeouts")).as_py() or 0),
        "tokens_in": sum(r["tokens_in"] for r in mine if not r["cached"]),
        "tokens_out": sum(r["tokens_out"] for r in mine if not r["cached"]),
        "features": {
            **info["counts"],
            "explained": len(explained),
            "classified": sum(1 for r in rows.values() if r.classification is not None),
            "categorized": sum(1 for r in rows.values() if r.category),
            "scored": sum(1 for r in rows.values() if r.score is not None),
            "with_errors": sum(1 for r in rows.values() if r.errors),
        },
        "classification_shares": {s: {str(c): round(v, 4) for c, v in d.items()} for s, d in _shares_dict(shares).items()},
        "mean_detection_score": {r["source"]: r["mean_score"] for r in scores.to_pylist()},
        "mean_scores": {r["source"]: {k: r[k] for k in SCORE_MEANS} for r in scores.to_pylist()},
        "scorer_costs": scorer_costs(mine, rows.values()),
        "categories": {g: [c["string_id"] for c in v["categories"]] for g, v in groups.items()},
        "prompt_copies": {"explanations": copies, "explained": dict(Counter(r.source for r in explained)),
                          "categories": {g: v.get("copied_from_prompt", []) for g, v in groups.items()
                                         if v.get("copied_from_prompt")}},
        "timings": {k: round(v, 2) for k, v in info.get("timings", {}).items()},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return AutointerpResult(rows={"explanations": table.num_rows, "calls": len(mine),
                                  "categories": sum(len(v["categories"]) for v in groups.values())}, extra=extra)


@contextmanager
def _timed(info: dict, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        info.setdefault("timings", {})[name] = time.perf_counter() - t0


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _category_sample(explained: list[FeatureRow], srcs: list[str], cap: int, seed: int, group: str) -> list[str]:
    """Equal numbers of distinct explanations per source (paper: as many MLP neurons as LoRA
    directions), at most ``cap`` in all, in a seeded random order."""
    per_src = {s: sorted({r.explanation for r in explained if r.source == s and r.explanation}) for s in srcs}
    present = [s for s in srcs if per_src[s]]
    if not present:
        return []
    n = min(min(len(v) for v in per_src.values() if v), max(1, cap // len(present)))
    rng = _rng(seed, "categories", group)
    shown: list[str] = []
    for s in present:
        shown.extend(rng.sample(per_src[s], n))
    shown = list(dict.fromkeys(shown))
    rng.shuffle(shown)
    return shown


def _fit_categories(shown: list[str], max_prompt_tokens: int) -> tuple[str, list[str]]:
    from rank1_core.autointerp.clients import estimate_tokens

    while True:
        prompt = P.categories_prompt(shown)
        if len(shown) <= 1 or estimate_tokens(prompt) <= max_prompt_tokens:
            return prompt, shown
        shown = shown[: max(1, int(len(shown) * max_prompt_tokens / estimate_tokens(prompt)) - 1)]


EXPLANATIONS_SCHEMA = pa.schema([
    ("source", pa.string()), ("feature", pa.string()), ("sign", pa.string()), ("explanation", pa.string()),
    ("classification", pa.int8()), ("classification_reasoning", pa.string()), ("category", pa.string()),
    ("category_group", pa.string()), ("score", pa.float64()), ("score_accuracy", pa.float64()),
    ("score_n", pa.int32()), ("fuzz_score", pa.float64()), ("fuzz_accuracy", pa.float64()), ("fuzz_n", pa.int32()),
    ("simulation_score", pa.float64()), ("simulation_n", pa.int32()), ("simulation_method", pa.string()),
    ("n_contexts", pa.int32()), ("model", pa.string()), ("error", pa.string()),
])


def _explanations_table(rows: list[FeatureRow]) -> pa.Table:
    data = {f.name: [] for f in EXPLANATIONS_SCHEMA}
    for r in rows:
        for f in EXPLANATIONS_SCHEMA:
            data[f.name].append("; ".join(r.errors) or None if f.name == "error" else getattr(r, f.name))
    return pa.table(data, schema=EXPLANATIONS_SCHEMA)


def classification_shares(table: pa.Table) -> pa.Table:
    """Figure 2 (left): per source, the share of classified features in each class."""
    out = {"source": [], "classification": [], "n_features": [], "share": []}
    rows = table.to_pylist()
    for src in sorted({r["source"] for r in rows}):
        cls = [r["classification"] for r in rows if r["source"] == src and r["classification"] is not None]
        for c in (0, 1, 2):
            n = sum(1 for x in cls if x == c)
            out["source"].append(src)
            out["classification"].append(c)
            out["n_features"].append(n)
            out["share"].append(n / len(cls) if cls else None)
    return pa.table(out, schema=pa.schema([("source", pa.string()), ("classification", pa.int8()),
                                           ("n_features", pa.int64()), ("share", pa.float64())]))


def _shares_dict(shares: pa.Table) -> dict:
    d: dict[str, dict] = {}
    for r in shares.to_pylist():
        if r["share"] is not None:
            d.setdefault(r["source"], {})[r["classification"]] = r["share"]
    return d


def category_shares(table: pa.Table, stats: pa.Table, groups: dict) -> pa.Table:
    """Figure 2 (right) and Figure 3: per source and category, the share of features and the
    category's activation density: the sum over its features of the feature's activation
    mass on the sampled tokens (mean in the feature's sign, floored at 0, times n_tokens),
    normalised over the source's categorized features. ``firing_density`` does the same with
    frac_active * n_tokens (how often rather than how strongly)."""
    st = {(r["source"], r["feature"]): r for r in stats.to_pylist()}
    names = {(g, c["string_id"]): c["name"] for g, v in groups.items() for c in v["categories"]}
    acc: dict[tuple, dict] = {}
    for r in table.to_pylist():
        if not r["category"]:
            continue
        s = st.get((r["source"], r["feature"]), {})
        mean, n_tok, frac = s.get("mean") or 0.0, s.get("n_tokens") or 0, s.get("frac_active") or 0.0
        mass = max(0.0, -mean if r["sign"] == "neg" else mean) * n_tok
        k = (r["source"], r["category_group"], r["category"])
        e = acc.setdefault(k, {"n": 0, "mass": 0.0, "fire": 0.0})
        e["n"] += 1
        e["mass"] += mass
        e["fire"] += frac * n_tok
    out = {k: [] for k in ("source", "category_group", "category", "category_name", "n_features", "feature_share",
                           "activation_density", "firing_density")}
    for src in sorted({k[0] for k in acc}):
        keys = sorted(k for k in acc if k[0] == src)
        n_all = sum(acc[k]["n"] for k in keys)
        m_all = sum(acc[k]["mass"] for k in keys)
        f_all = sum(acc[k]["fire"] for k in keys)
        for k in keys:
            e = acc[k]
            out["source"].append(src)
            out["category_group"].append(k[1])
            out["category"].append(k[2])
            out["category_name"].append(names.get((k[1], k[2]), k[2]))
            out["n_features"].append(e["n"])
            out["feature_share"].append(e["n"] / n_all)
            out["activation_density"].append(e["mass"] / m_all if m_all > 0 else None)
            out["firing_density"].append(e["fire"] / f_all if f_all > 0 else None)
    return pa.table(out, schema=pa.schema([
        ("source", pa.string()), ("category_group", pa.string()), ("category", pa.string()),
        ("category_name", pa.string()), ("n_features", pa.int64()), ("feature_share", pa.float64()),
        ("activation_density", pa.float64()), ("firing_density", pa.float64())]))


SCORE_MEANS = ("mean_score", "mean_fuzz", "mean_simulation", "weighted_score", "weighted_fuzz",
               "weighted_simulation")
"""Per-source means of score_summary.parquet (weighted_*: weighted by the feature's firing rate)."""


def score_summary(table: pa.Table, stats: pa.Table | None = None) -> pa.Table:
    """Per source: features scored by each scorer and their mean score (detection and fuzzing:
    balanced accuracy, 0.5 = chance; simulation: correlation, 0 = chance); ``weighted_*``
    weight each feature by its firing rate (``frac_active`` of topk/stats.parquet)."""
    rows = table.to_pylist()
    rate = {(r["source"], r["feature"]): r["frac_active"] for r in stats.to_pylist()} if stats is not None else {}
    cols = {"score": ("n_scored", "mean_score", "weighted_score"), "fuzz_score": ("n_fuzz", "mean_fuzz", "weighted_fuzz"),
            "simulation_score": ("n_simulation", "mean_simulation", "weighted_simulation")}
    out: dict[str, list] = {"source": [], "n_features": [], "mean_accuracy": []}
    for n, m, w in cols.values():
        out.update({n: [], m: [], w: []})
    r4 = lambda v: None if v is None else round(v, 4)  # noqa: E731
    for src in sorted({r["source"] for r in rows}):
        mine = [r for r in rows if r["source"] == src]
        out["source"].append(src)
        out["n_features"].append(len(mine))
        for col, (n, m, w) in cols.items():
            scored = [r for r in mine if r.get(col) is not None]
            out[n].append(len(scored))
            out[m].append(r4(sum(r[col] for r in scored) / len(scored)) if scored else None)
            out[w].append(r4(S.weighted_mean([r[col] for r in scored],
                                             [rate.get((src, r["feature"])) for r in scored])))
        det = [r for r in mine if r["score"] is not None]
        out["mean_accuracy"].append(r4(sum(r["score_accuracy"] for r in det) / len(det)) if det else None)
    fields = [("source", pa.string()), ("n_features", pa.int64())]
    for n, m, w in cols.values():
        fields += [(n, pa.int64()), (m, pa.float64()), (w, pa.float64())]
    fields.append(("mean_accuracy", pa.float64()))
    return pa.table({f: out[f] for f, _ in fields}, schema=pa.schema(fields))


def scorer_costs(calls: list[dict], rows) -> dict:
    """Per scoring task (score = detection, fuzz, simulate): calls, tokens in and out (cached
    answers count their original tokens) and dollars, in all and per feature scored."""
    scored = {"score": sum(1 for r in rows if r.score is not None),
              "fuzz": sum(1 for r in rows if r.fuzz_score is not None),
              "simulate": sum(1 for r in rows if r.simulation_n)}
    out = {}
    for task in scored:
        mine = [c for c in calls if c["task"] == task]
        if not mine:
            continue
        d = {"calls": len(mine), "tokens_in": sum(c["tokens_in"] for c in mine),
             "tokens_out": sum(c["tokens_out"] for c in mine), "cost_usd": round(sum(c["cost_usd"] for c in mine), 6),
             "features_scored": scored[task]}
        n = max(1, len(mine))
        d["per_call"] = {"tokens_in": round(d["tokens_in"] / n, 1), "tokens_out": round(d["tokens_out"] / n, 1)}
        out[task] = d
    return out


def default_cache_dir(a: AutointerpConfig) -> str:
    if a.cache_dir:
        return a.cache_dir
    from rank1_core.models import cache_dir

    return str(cache_dir() / "llm")

