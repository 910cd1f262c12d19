"""A private local Ray instance (no RAY_ADDRESS) listens on the loopback address only, and its
auth token is readable by its owner only: the real sockets of a real instance."""

import json
import os
import stat
import subprocess
import sys

from tests.conftest import REPO

PROBE = r"""
import json, os, time, psutil
from rank1_core.config import load_config
from ray_jobs.common import ensure_ray
ray = ensure_ray(load_config("configs/tiny.yaml", ["ray.num_cpus=1"]))
@ray.remote
def pid():
    return os.getpid()
ray.get(pid.remote())  # a worker process, with its own gRPC port
time.sleep(2)  # the agents open their ports a moment after start
me = psutil.Process()
socks = []
for p in [me, *me.children(recursive=True)]:
    try:
        socks += [[p.pid, p.name(), c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print("SOCKETS " + json.dumps(socks))
ray.shutdown()
"""


def test_local_instance_listens_on_loopback_only_with_a_private_token(tmp_path):
    token = tmp_path / "auth_token"
    env = dict(os.environ, RAY_AUTH_TOKEN_PATH=str(token), TOKENIZERS_PARALLELISM="false")
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("SOCKETS "))
    socks = json.loads(line.removeprefix("SOCKETS "))
    names = {s[1] for s in socks}
    assert "gcs_server" in names and "raylet" in names and len(socks) >= 5, socks
    exposed = [s for s in socks if s[2] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
