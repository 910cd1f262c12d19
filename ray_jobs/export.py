"""`rank1 export`: a finished run in the formats other interpretability tools read. No Ray.

    rank1 export sae --run runs/demo --format saelens out/saelens     # SAELens: SAE.load_from_disk(out)
    rank1 export neuronpedia --run runs/demo out/neuronpedia          # Neuronpedia's import layout

OUT is a local folder, written under a temporary name and renamed when complete (an existing,
non-empty OUT is refused unless --force). See docs/exports.md for what each contains and the
Neuronpedia upload steps.
"""

from __future__ import annotations

import argparse
import json
import sys

from rank1_core.export import ExportError

KINDS = ("sae", "neuronpedia")
SAE_FORMATS = ("saelens",)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rank1 export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("kind", help=f"what to export: {', '.join(KINDS)}")
    p.add_argument("out", help="output folder (local)")
    p.add_argument("--run", required=True, help="run directory (path or URI)")
    p.add_argument("--format", default=None, help=f"for `sae`: {', '.join(SAE_FORMATS)} (default saelens)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--model-id", default=None, help="neuronpedia: model id (default: the run's model name)")
    p.add_argument("--release", default=None, help="neuronpedia: release id (default: rank1-<run folder name>)")
    p.add_argument("--creator", default="rank1", help="neuronpedia: creator name")
    p.add_argument("--creator-id", default="rank1-creator",
                   help="neuronpedia: creatorId/authorId of every row (your Neuronpedia user id)")
    p.add_argument("--url", default=None, help="neuronpedia: a URL for the release (paper, repository)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.kind == "sae":
            fmt = args.format or "saelens"
            if fmt not in SAE_FORMATS:
                raise ExportError(f"unknown SAE export format {fmt!r}; formats: {', '.join(SAE_FORMATS)}")
            from rank1_core.export.saelens import export_saelens

            res = export_saelens(args.run, args.out, force=args.force)
        elif args.kind == "neuronpedia":
            if args.format not in (None, "neuronpedia"):
                raise ExportError(f"`rank1 export neuronpedia` has one format; got --format {args.format!r}")
            from rank1_core.export.neuronpedia import export_neuronpedia

            res = export_neuronpedia(args.run, args.out, force=args.force, model_id=args.model_id,
                                     release=args.release, creator=args.creator,
                                     creator_id=args.creator_id, url=args.url)
        else:
            raise ExportError(f"unknown export {args.kind!r}; exports: {', '.join(KINDS)}")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
