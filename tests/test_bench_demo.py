"""The memory sampler of benchmarks/bench_demo.py sees what the run's child processes hold."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def test_sampler_counts_the_memory_of_descendant_processes():
    import bench_demo
    import psutil

    code = ("import subprocess, sys;"
            "p = subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(300 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); time.sleep(30)']);"
            "p.wait()")
    with bench_demo.Sampler(interval=0.05) as s:
        before = s.peak_tree
        parent = subprocess.Popen([sys.executable, "-c", code])  # a grandchild holds 300 MB
        time.sleep(2.5)
        for p in [*psutil.Process(parent.pid).children(recursive=True), psutil.Process(parent.pid)]:
            p.kill()
        parent.wait()
    assert s.peak_tree - before > 250 * 2**20
    assert s.peak_largest > 250 * 2**20 and s.peak_machine > s.peak_largest
