"""Progress of a stage on the Ray dashboard (ray.util.metrics) and in the terminal (tqdm).

    from ray_jobs.progress import Progress

    with Progress("extract", total=n_tokens, unit="tok") as p:   # main counter: tokens
        for batch in batches:
            ...
            p.update(len(batch_tokens), docs=len(batch))          # bar + counters
    with Progress("autointerp", total=n_features, main="features_explained", unit="feat") as p:
        p.update(1, llm_calls=1, llm_tokens_in=900, llm_tokens_out=40, spend_usd=0.0004)
        p.set(loss=0.31)                                           # gauges

Every counter becomes a Ray metric named `rank1_<name>` with the tag `stage`, so Prometheus
sees `ray_rank1_tokens_total{stage="extract"}` and the Ray dashboard's Metrics view (with its
Grafana) can chart tokens processed, features explained, LLM calls and spend per stage.
Beside the counters, `rank1_progress` holds the fraction done (when `total` is known) and
`rank1_<main>_per_s` the recent rate. Metrics exist only when Ray is initialised; without
Ray the same calls drive only the terminal bar, so library code and tests can use it freely.

The terminal shows a tqdm bar when stderr is a terminal, a log line every `log_every`
seconds otherwise (job logs), and inside a Ray worker process Ray's `tqdm_ray`, whose bars
the driver draws.

Ray drops a gauge from its Prometheus endpoint about 30 s after it was last set (measured,
Ray 2.60), so while a Progress is open a daemon thread sets its gauges again every
`keepalive` seconds; counters are cumulative and stay.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from typing import Any, Optional

# Counters every stage may use, with their dashboard descriptions. Other names work too.
COUNTERS = {
    "tokens": "Tokens processed",
    "docs": "Documents processed",
    "steps": "Optimizer steps taken",
    "samples": "Benchmark samples generated and graded",
    "ablations": "Ablations evaluated",
    "features": "Features processed (contexts selected, pages written)",
    "features_explained": "Features explained by the LLM",
    "llm_calls": "LLM calls made (cached ones included)",
    "llm_cached": "LLM calls answered from the cache",
    "llm_errors": "LLM calls that failed",
    "llm_tokens_in": "Prompt tokens sent to the LLM",
    "llm_tokens_out": "Completion tokens received from the LLM",
    "spend_usd": "Dollars spent on LLM calls",
}
GAUGES = {
    "progress": "Fraction of the stage's work done (0-1)",
    "loss": "Latest training loss",
    "heldout_loss": "Latest held-out loss",
    "lr": "Current learning rate",
    "fvu": "SAE: fraction of variance unexplained (latest batch)",
    "l0": "SAE: active latents per token (latest batch)",
    "dead_fraction": "SAE: fraction of dead latents",
}
NAME_RE = re.compile(r"[a-z][a-z0-9_]*")

_lock = threading.Lock()
_metrics: dict[tuple[str, str], Any] = {}


def ray_ready() -> bool:
    """True when this process is connected to Ray (driver or worker)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported ray counts as absent
        return False


def in_ray_worker() -> bool:
    if not ray_ready():
        return False
    import ray

    try:
        return ray.get_runtime_context().worker.mode == ray.WORKER_MODE
    except Exception:  # noqa: BLE001
        return False


def metric(kind: str, name: str):
    """The process-wide Ray metric `rank1_<name>` (kind 'counter' or 'gauge'), or None
    without Ray. Created once per process and reused."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"metric name {name!r} must be lower_snake_case")
    if not ray_ready():
        return None
    key = (kind, name)
    with _lock:
        m = _metrics.get(key)
        if m is None:
            from ray.util import metrics as rm

            if kind == "counter":
                m = rm.Counter(f"rank1_{name}", description=COUNTERS.get(name, name.replace("_", " ")),
                               tag_keys=("stage",))
            elif kind == "gauge":
                m = rm.Gauge(f"rank1_{name}", description=GAUGES.get(name, name.replace("_", " ")),
                             tag_keys=("stage",))
            else:
                raise ValueError(f"unknown metric kind {kind!r}")
            _metrics[key] = m
    return m


def count(stage: str, name: str, value: float = 1) -> None:
    """Add `value` (> 0) to counter `rank1_<name>` of `stage` (no-op without Ray)."""
    if value and value > 0:
        m = metric("counter", name)
        if m is not None:
            m.inc(float(value), tags={"stage": stage})


def gauge(stage: str, name: str, value: float) -> None:
    m = metric("gauge", name)
    if m is not None and value is not None:
        m.set(float(value), tags={"stage": stage})


class _LineBar:
    """A progress 'bar' for logs: one line every `every` seconds and at the end."""

    def __init__(self, desc: str, total: Optional[int], unit: str, every: float, file=None):
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self.file = file or sys.stderr

    def update(self, n: float) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        print(f"{self.desc}: {self.n:,.0f}{of} {self.unit}{pct}, {rate:,.1f} {self.unit}/s", file=self.file, flush=True)

    def close(self) -> None:
        self._print(time.monotonic())


class Progress:
    """A stage's progress: a terminal bar over the main counter plus Ray metrics.

    `update(n, **counters)` advances the bar and counter `main` by n and adds each keyword
    to its own counter; `set(**gauges)` sets gauges. Thread-safe enough for one producer.
    """

    def __init__(self, stage: str, total: Optional[int] = None, *, main: str = "tokens", unit: str = "it",
                 desc: Optional[str] = None, bar: Optional[bool] = None, log_every: float = 30.0,
                 rate_every: float = 2.0, keepalive: float = 10.0):
        self.stage, self.total, self.main = stage, total, main
        self.n = 0
        self._gauges: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._rate_every = rate_every
        self._rate_t = time.monotonic()
        self._rate_n = 0
        desc = desc or f"[{stage}] {main.replace('_', ' ')}"
        show = True if bar is None else bar
        self._bar: Any = None
        if show:
            if in_ray_worker():
                from ray.experimental import tqdm_ray

                self._bar = tqdm_ray.tqdm(total=total, desc=desc, unit=unit)
            elif sys.stderr.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, unit_scale=True)
            else:
                self._bar = _LineBar(desc, total, unit, log_every)
        metric("counter", main)  # the main counter appears on the dashboard from the start
        if total:
            self._gauge("progress", 0.0)
        if ray_ready() and keepalive > 0:
            self._thread = threading.Thread(target=self._keepalive, args=(keepalive,), daemon=True,
                                            name=f"rank1-progress-{stage}")
            self._thread.start()

    def _gauge(self, name: str, value: float) -> None:
        self._gauges[name] = float(value)
        gauge(self.stage, name, value)

    def _keepalive(self, every: float) -> None:
        while not self._stop.wait(every):
            for name, value in list(self._gauges.items()):
                gauge(self.stage, name, value)

    def update(self, n: float = 1, **counters: float) -> None:
        if n:
            self.n += n
            count(self.stage, self.main, n)
            if self._bar is not None:
                self._bar.update(n)
        for name, v in counters.items():
            count(self.stage, name, v)
        now = time.monotonic()
        if now - self._rate_t >= self._rate_every:
            self._gauge(f"{self.main}_per_s", (self.n - self._rate_n) / (now - self._rate_t))
            self._rate_t, self._rate_n = now, self.n
            if self.total:
                self._gauge("progress", min(1.0, self.n / self.total))

    def set(self, **gauges: float) -> None:
        for name, v in gauges.items():
            self._gauge(name, v)
        if self._bar is not None and hasattr(self._bar, "set_postfix") and gauges:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in gauges.items()}, refresh=False)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.total:
            gauge(self.stage, "progress", min(1.0, self.n / self.total))
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
