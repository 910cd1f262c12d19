"""report: Table 1, Table 2, Figures 1-3, curves and HTML feature dashboards of a run.

    rank1 report --run runs/demo                  # any run, finished or partial
    rank1 report --config configs/demo.yaml       # the run of a config
    python -m ray_jobs.report --run runs/demo report.max_features=200

Renders whatever the run's finished stages allow into `<run>/report/` (`index.html` is the
entry point; it opens from disk) and lists what is missing and why. The stage's config hash
folds in the hashes of the stages that were done when it ran, so running it again after
another stage finishes redraws the report, and running it twice in a row does nothing.
Without `--config`, the config is the one stored in the run (`<stage>/config.yaml`).
Needs no Ray; with Ray initialised, pages written show on the dashboard's metrics.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from rank1_core.config import Config, ConfigError, config_from_dict, load_config
from rank1_core.rundir import RunDir
from ray_jobs.common import execute, guarded

STAGE = "report"


def run(cfg: Config, force: bool = False) -> dict:
    from rank1_core.report import build_report, count_features
    from ray_jobs.progress import Progress

    run_dir = RunDir(cfg.run.dir)
    result_box = {}

    def body(sr):
        stage = sr.stage
        total = count_features(run_dir, cfg.report)
        with Progress(STAGE, total=total, main="features", unit="page", desc="[report] feature pages") as p:
            log = lambda m: print(m, flush=True)  # noqa: E731
            if stage.is_local:
                res = build_report(run_dir, cfg.report, stage.local_path(), log, on_page=p.update)
            else:
                import pyarrow.fs as pafs

                with tempfile.TemporaryDirectory(prefix="rank1-report-") as tmp:
                    res = build_report(run_dir, cfg.report, Path(tmp), log, on_page=p.update)
                    pafs.copy_files(tmp, stage.root, source_filesystem=pafs.LocalFileSystem(),
                                    destination_filesystem=stage.fs)
        sr.rows.update({f"pages_{k}": v for k, v in res.pages.items()})
        sr.rows["files"] = res.files
        sr.extra.update({"bytes": res.bytes, "rendered": res.rendered,
                         "missing": [f"{m.what}: {m.why}" for m in res.missing]})
        result_box["res"] = res

    manifest = execute(cfg, STAGE, body, force=force)
    _summary(run_dir, manifest)
    return manifest


def _summary(run_dir: RunDir, manifest: dict) -> None:
    extra = manifest.get("extra", {})
    print(f"[report] {run_dir.stage(STAGE).uri_of('index.html')}  "
          f"({manifest.get('rows', {}).get('files', 0)} files, {extra.get('bytes', 0) / 1e6:.1f} MB)", flush=True)
    if extra.get("rendered"):
        print(f"[report] rendered: {', '.join(extra['rendered'])}", flush=True)
    missing = extra.get("missing", [])
    if missing:
        print(f"[report] not rendered ({len(missing)}):", flush=True)
        for m in missing:
            print(f"  - {m}", flush=True)


def config_of_run(run: str, overrides: list[str]) -> Config:
    """The config stored in a run (report's own, else the latest finished stage's), with
    `overrides`; the defaults when the run holds none that still loads."""
    from rank1_core.stages import REPORT_INPUTS

    rd = RunDir(run)
    overrides = [*overrides, f"run.dir={run}"]
    for name in (STAGE, *reversed(REPORT_INPUTS)):
        st = rd.stage(name)
        if st.exists("config.yaml"):
            try:
                data = yaml.safe_load(st.read_text("config.yaml")) or {}
                return config_from_dict(data, overrides, where=st.uri_of("config.yaml"))
            except (ConfigError, yaml.YAMLError) as e:
                print(f"[report] ignoring {st.uri_of('config.yaml')}: {e}", file=sys.stderr)
    return config_from_dict({}, overrides, where="defaults")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rank1 report", description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="run directory (path or URI); default: run.dir of --config")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the config stored in the run)")
    p.add_argument("--force", action="store_true", help="redraw even if nothing changed")
    p.add_argument("--screenshots", default=None, metavar="DIR",
                   help="also save PNG screenshots of the report, the feature index and a feature page "
                        "(needs chromium, chromium-driver and selenium)")
    p.add_argument("--feature-page", default=None, help="with --screenshots: which page, e.g. features/sae/F00012.html")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. report.max_features=100")
    args = p.parse_args(argv)
    if not args.run and not args.config:
        p.error("give --run DIR (a run directory) or --config FILE")
    return guarded(lambda: _main(args))  # the one error path of every door (ray_jobs.common)


def _main(args: argparse.Namespace) -> int:
    if args.config:
        extra = [f"run.dir={args.run}"] if args.run else []
        cfg = load_config(args.config, [*args.overrides, *extra])
    else:
        if not RunDir(args.run).status():
            print(f"error: {args.run} holds no stage output (is it a run directory?)", file=sys.stderr)
            return 2
        cfg = config_of_run(args.run, list(args.overrides))
    run(cfg, args.force)
    if args.screenshots:
        from rank1_core.report.screenshot import report_screenshots

        st = RunDir(cfg.run.dir).stage(STAGE)
        with st.local_copy(".") as local:
            for path in report_screenshots(Path(local), Path(args.screenshots), args.feature_page):
                print(f"[report] screenshot {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
