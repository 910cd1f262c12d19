"""Read rank1's Ray metrics back from the node's Prometheus endpoint, as the dashboard's
Prometheus would."""

from __future__ import annotations

import time
import urllib.request


def scrape(ray) -> str:
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def value(text: str, name: str, stage: str) -> float:
    """The sum of a metric over every series tagged with `stage` (workers report separately)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'stage="{stage}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(ray, want: dict[tuple[str, str], float], timeout_s: float = 60.0, at_least: bool = True) -> dict:
    """Poll until every (metric, stage) reaches its value (Ray exports every ~10 s); returns
    what was last read."""
    deadline = time.monotonic() + timeout_s
    got: dict = {}
    while time.monotonic() < deadline:
        text = scrape(ray)
        got = {k: value(text, *k) for k in want}
        if all((got[k] >= v) if at_least else abs(got[k] - v) <= 1e-6 * max(1.0, abs(v)) for k, v in want.items()):
            break
        time.sleep(1)
    return got
