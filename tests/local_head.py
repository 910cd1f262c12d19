"""A Ray head started with `ray start --head` on 127.0.0.1, token authentication on, for tests.

Ports and the temp dir are private to the instance, and stopping it kills only its own
processes (never `ray stop`, which would kill every Ray process on the machine).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil


_given: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process (Ray refuses a port
    number used by two of its components)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port


class LocalHead:
    def __init__(self, tmp: Path, num_cpus: int = 4):
        self.tmp = Path(tmp)
        self.token_file = self.tmp / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        # Short: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="r1h-", dir="/tmp"))
        self.gcs_port, self.dash_port, self.client_port = free_port(), free_port(), free_port()
        self.num_cpus = num_cpus
        # Token authentication stays on: clients get the token through the environment.
        # Single-machine mode: the node IP stays 127.0.0.1 and every port listens there only
        # (the README's local-head recipe).
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file),
                        TOKENIZERS_PARALLELISM="false", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        self.env.pop("RAY_ADDRESS", None)
        # As a user with the venv activated: the job's `python` is this interpreter (jobs
        # inherit the head's environment), not whatever python comes first on PATH.
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def ray_cli(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def start(self) -> "LocalHead":
        # Worker ports below the kernel's ephemeral range (32768-60999 here), where the
        # free_port() picks of the other components live, so they never collide.
        base = 20000 + (self.gcs_port % 12) * 1000
        cmd = [self.ray_cli(), "start", "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dash_port}",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={self.client_port}",
               f"--min-worker-port={base}", f"--max-worker-port={base + 999}", f"--num-cpus={self.num_cpus}",
               # Every other listening port private too: with the defaults (agent 52365, ...) a
               # head started while another Ray instance runs on the machine (a test session's
               # ray.init) has a job agent that cannot bind, and jobs are refused for good
               # ("No available agent to submit job").
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        self.wait_for_job_agent()
        return self

    def wait_for_job_agent(self, timeout: float = 240.0) -> None:
        """`ray start` returns before the head's job agent has registered; until it has, the
        job server answers 500 "No available agent to submit job". Submit a no-op job until
        one is accepted, so callers (tests, like users) submit to a head that is ready."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = subprocess.run([self.ray_cli(), "job", "submit", "--address", self.dashboard, "--no-wait",
                                "--", "true"], env=self.env, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                return
            last = (r.stdout + r.stderr)[-1500:]
            time.sleep(2.0)
        self.stop()
        raise RuntimeError(f"the job agent of the head at {self.dashboard} never became ready:\n{last}")

    def stop(self) -> None:
        marks = [str(self.temp_dir), f":{self.gcs_port}", f"={self.client_port}", f"={self.dash_port}"]
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(m in " ".join(p.info["cmdline"] or []) for m in marks):
                    roots.append(p)
            except psutil.Error:
                continue
        procs = set(roots)
        for r in roots:
            try:
                procs.update(r.children(recursive=True))
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(procs), timeout=15)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
