"""Wall time and peak memory of every stage of a pipeline run (the demo by default).

    python benchmarks/bench_demo.py                                   # configs/demo.yaml -> runs/bench-demo
    python benchmarks/bench_demo.py --config configs/tiny.yaml --run /tmp/bench-tiny
    python benchmarks/bench_demo.py --run runs/bench-demo --force     # redo every stage
    python benchmarks/bench_demo.py --stages extract,sae              # a subset (inputs must be done)

It starts its own local Ray instance (RAY_ADDRESS is ignored: on a cluster the stage's
processes are not on this machine) and runs the config's stages one after the other through
the same `ray_jobs.<stage>.run` the pipeline calls. While a stage runs, a sampler thread
reads every 0.5 s the memory of the whole process tree the run owns: this driver, Ray's own
processes (GCS, raylet, dashboard), every worker and actor, and what they start (the vLLM
servers of evaluate, ablate and autointerp). Each process's RSS and the machine's used memory
are read on every sample; the tree's PSS (smaps_rollup, which walks every page table of every
process: at every 0.5 s it took ~15% of a core and slowed the stages it measured) on every
tenth. Printed per stage:

- wall: seconds from the stage's start to its success marker;
- tree PSS: peak of the summed proportional set size of the tree (shared pages, such as
  the object store and the model files mapped by several actors, counted once), sampled every
  5 s (`--pss-every`): a shorter peak shows in the machine's figure;
- largest: peak RSS of the single largest process (the one to size a worker for);
- machine: peak of used memory on the machine (total - available, every process included),
  with the value before the run on the first line.

A stage already done (same config hash) is skipped and printed as such; `--force` redoes
every stage. The figures also go to `<run>/bench_demo-<UTC time>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1024 ** 3


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (smaps_rollup), or its RSS where that is missing."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class Sampler:
    """Peak memory of this process and all its descendants while `with` is open."""

    def __init__(self, interval: float = 0.5, pss_every: int = 10):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.pss_every = max(1, pss_every)
        self._n = 0
        self.root = psutil.Process()
        self.peak_tree = self.peak_largest = self.peak_machine = 0
        self.largest_name = ""
        self.cpu_s = 0.0
        """CPU seconds the sampler itself spent (it shares the cores with what it measures)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, pss: bool | None = None) -> None:
        ps = self.psutil
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except ps.Error:
            pass
        if pss is None:
            pss = self._n % self.pss_every == 0
        self._n += 1
        tree, largest, name = 0, 0, ""
        for p in procs:
            if pss:
                tree += pss_bytes(p.pid)
            try:
                rss = p.memory_info().rss
            except ps.Error:
                continue
            if rss > largest:
                try:
                    largest, name = rss, " ".join(p.cmdline()[:3])[:60] or p.name()
                except ps.Error:
                    largest, name = rss, "?"
        vm = ps.virtual_memory()
        self.peak_tree = max(self.peak_tree, tree)
        self.peak_machine = max(self.peak_machine, vm.total - vm.available)
        if largest > self.peak_largest:
            self.peak_largest, self.largest_name = largest, name

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            t0 = time.thread_time()
            self.sample()
            self.cpu_s += time.thread_time() - t0

    def __enter__(self) -> "Sampler":
        self.sample(pss=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(pss=True)


def main(argv: list[str] | None = None) -> int:
    from ray_jobs.common import add_config_args, config_from_args, ensure_ray
    from ray_jobs.pipeline import stage_module

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(p)
    p.set_defaults(run="runs/bench-demo")
    p.add_argument("--stages", default=None, help="comma-separated subset of the config's stages")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--pss-every", type=int, default=10, help="read the tree's PSS on every Nth sample")
    args = p.parse_args(argv)
    os.environ.pop("RAY_ADDRESS", None)
    cfg = config_from_args(args)
    cfg.ray.address = None
    stages = args.stages.split(",") if args.stages else list(cfg.stages)

    import psutil

    vm = psutil.virtual_memory()
    print(f"bench_demo: {args.config} -> {cfg.run.dir}; {psutil.cpu_count()} CPUs, "
          f"{vm.total / GB:.1f} GB, {(vm.total - vm.available) / GB:.2f} GB in use before the run", flush=True)
    rows = []
    t_all = time.perf_counter()
    with Sampler(args.interval, args.pss_every) as s:
        t0 = time.perf_counter()
        ensure_ray(cfg)
    rows.append({"stage": "(ray start)", "seconds": time.perf_counter() - t0, "tree_pss_gb": s.peak_tree / GB,
                 "largest_rss_gb": s.peak_largest / GB, "largest": s.largest_name, "machine_gb": s.peak_machine / GB})
    for name in stages:
        mod = stage_module(name)
        print(f"=== stage {name} ===", flush=True)
        with Sampler(args.interval, args.pss_every) as s:
            started, t0 = time.time(), time.perf_counter()
            manifest = mod.run(cfg, args.force)
            secs = time.perf_counter() - t0
        # a skipped stage hands back the manifest of the run that did it
        skipped = isinstance(manifest, dict) and manifest.get("finished_at", started) < started
        rows.append({"stage": name, "seconds": secs, "skipped": bool(skipped), "tree_pss_gb": s.peak_tree / GB,
                     "largest_rss_gb": s.peak_largest / GB, "largest": s.largest_name,
                     "machine_gb": s.peak_machine / GB, "sampler_cpu_s": s.cpu_s})
    total = time.perf_counter() - t_all

    print("\nstage          wall s   tree PSS GB   largest RSS GB   machine GB   largest process")
    for r in rows:
        wall = "skipped" if r.get("skipped") else f"{r['seconds']:.1f}"
        print(f"{r['stage']:<14}{wall:>7}   {r['tree_pss_gb']:>11.2f}   {r['largest_rss_gb']:>14.2f}   "
              f"{r['machine_gb']:>10.2f}   {r['largest']}")
    ran = [r for r in rows if not r.get("skipped")]
    print(f"{'total':<14}{total:>7.1f}   {max(r['tree_pss_gb'] for r in ran):>11.2f}   "
          f"{max(r['largest_rss_gb'] for r in ran):>14.2f}   {max(r['machine_gb'] for r in ran):>10.2f}   "
          f"({total / 60:.1f} min, {len(ran) - 1} stages run)")
    print(f"the memory sampler itself used {sum(r.get('sampler_cpu_s', 0.0) for r in rows):.0f} CPU-s "
          f"(--interval {args.interval:g} s, PSS every {args.pss_every}); `rank1 run` has no sampler", flush=True)
    out = {"config": args.config, "run": cfg.run.dir, "total_seconds": total, "stages": rows,
           "cpus": psutil.cpu_count(), "memory_gb": vm.total / GB,
           "machine_gb_before": (vm.total - vm.available) / GB}
    from rank1_core.rundir import resolve_filesystem

    fs, root = resolve_filesystem(cfg.run.dir)
    name = f"bench_demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(json.dumps(out, indent=2).encode())
    print(f"figures: {cfg.run.dir}/{name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
