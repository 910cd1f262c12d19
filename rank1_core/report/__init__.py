"""The report stage's library: tables, figures and HTML feature dashboards of a run.

`build_report(run, cfg, out_dir)` renders whatever the run's finished stages allow and
lists what is missing; see `build.py` for the folder layout. No ray here.
"""

from rank1_core.report.build import ReportResult, build_report, count_features
from rank1_core.report.loaders import Missing, RunInputs

__all__ = ["Missing", "ReportResult", "RunInputs", "build_report", "count_features"]
