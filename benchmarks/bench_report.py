"""Size and time of the report for a synthetic ~4,000-feature run (paper scale: 448 adapter
components, ~2,000 live SAE features, 60 neurons per layer).

    python benchmarks/bench_report.py                       # 32 layers: 224 + 1,792 + ~1,985 features
    python benchmarks/bench_report.py --layers 4 --docs 8   # quick

Builds a synthetic run in the stage output schemas (rank1_core.report.synthetic: k=64
contexts per sign, windows of 24 + 8 tokens, whole traces of `--doc-len` tokens), renders
the report and prints its size. Baseline, measured on the same pages: the same contexts and
traces written as one server-side <span style title> per token (the usual static
dashboard), whose size is computed from each page's data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import tempfile
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rank1_core.config import ReportConfig
from rank1_core.report import build_report
from rank1_core.report.dashboards import esc
from rank1_core.report.synthetic import SyntheticSpec, make_synthetic_run


def naive_span_bytes(data: dict, trace_tokens: list[str]) -> int:
    """Bytes of the contexts and trace as one HTML span per token, colour and title inline."""
    def span(tok: str, v: float, maxabs: float) -> str:
        a = min(1.0, abs(v) / maxabs) * 0.88 if maxabs else 0
        rgb = "234,88,12" if v > 0 else "28,126,214"
        return (f'<span class="tok" style="background:rgba({rgb},{a:.3f})" title="{esc(repr(tok))} = {v:.3g}">'
                f"{esc(tok)}</span>")

    m = data["maxabs"] or 1.0
    n = 0
    for c in data["pos"] + data["neg"]:
        n += len('<li><span class="ctx-meta">0.000 · doc 00:000</span></li>')
        n += sum(len(span(data["toks"][i], v, m)) for i, v in zip(c[5], c[6]))
    tr = data.get("trace")
    if tr:
        n += sum(len(span(t, v, m)) for t, v in zip(trace_tokens, tr["vals"]))
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--neurons", type=int, default=56, help="neurons per layer")
    p.add_argument("--sae-latents", type=int, default=2316, help="latents (every 7th dead)")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=1024)
    p.add_argument("--dir", default=None, help="where to build (default: a temp dir, removed)")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="rank1-report-bench-") if args.dir is None else None
    root = Path(args.dir or tmp.name)
    spec = SyntheticSpec(layers=args.layers, neurons=args.neurons, sae_latents=args.sae_latents, docs=args.docs,
                         doc_len=args.doc_len, k=64, before=24, after=8, docs_per_file=8)
    t0 = time.perf_counter()
    run = make_synthetic_run(str(root / "run"), spec)
    t_gen = time.perf_counter() - t0
    out = root / "run" / "report"
    t0, c0 = time.perf_counter(), time.process_time()
    res = build_report(run, ReportConfig(), out, log=lambda m: None)
    t_build, c_build = time.perf_counter() - t0, time.process_time() - c0

    pages = sorted(out.glob("features/*/*.html"))
    page_bytes = sum(p.stat().st_size for p in pages)
    trace_files = sorted(out.glob("traces/*.js"))
    trace_bytes = sum(p.stat().st_size for p in trace_files)
    traces = {}
    for f in trace_files:
        body = f.read_text()
        traces[f.stem[1:]] = json.loads(body.split("] = ", 1)[1].rstrip(";\n"))
    naive = 0
    gz = 0
    for pg in pages:
        text = pg.read_text()
        gz += len(gzip.compress(text.encode(), 6))
        data = json.loads(re.search(r'id="feature-data">(.*?)</script>', text, re.S).group(1))
        tr = data.get("trace")
        toks = []
        if tr:
            st = traces[str(tr["doc"])]
            toks = st["tokens"][tr["start"] - st["start"]: tr["end"] - st["start"]]
        shell = len(text.encode()) - len(re.search(r'id="feature-data">(.*?)</script>', text, re.S).group(1).encode())
        naive += shell + naive_span_bytes(data, toks)
    total = res.bytes
    n = sum(res.pages.values())
    print(f"features: {n:,} ({', '.join(f'{k} {v:,}' for k, v in res.pages.items())}); "
          f"k=64 contexts per sign, {spec.before}+{spec.after}-token windows, traces of {spec.doc_len} tokens")
    print(f"synthetic run: {t_gen:.1f}s; report: {t_build:.1f}s wall, {c_build:.1f}s CPU of this process "
          f"({n / c_build:,.0f} pages per CPU-second)")
    print(f"report total: {total / 1e6:,.1f} MB in {res.files:,} files")
    print(f"  feature pages: {page_bytes / 1e6:,.1f} MB, {page_bytes / n / 1e3:,.1f} KB/page "
          f"(gzip -6: {gz / n / 1e3:,.1f} KB/page)")
    print(f"  shared traces: {trace_bytes / 1e6:,.2f} MB in {len(trace_files)} files; "
          f"index features.html {(out / 'features.html').stat().st_size / 1e6:,.2f} MB")
    print(f"baseline (one <span style title> per token, same pages): {naive / 1e6:,.1f} MB, "
          f"{naive / n / 1e3:,.1f} KB/page -> rank1 pages are {naive / page_bytes:.1f}x smaller")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
