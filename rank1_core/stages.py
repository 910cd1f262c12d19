"""The stage graph, declared once: each stage's config sections, inputs, outputs and purpose.

Every reader takes it from here: the config hash (`rank1_core.config.section_hash` covers a
stage's `sections`; the run directory chains the hashes of its inputs), the stages a config
may name, `ray_jobs.common.execute` (which inputs must be done, in which order their hashes
fold in), the precision lines of a stage's manifest, `rank1 status` (stage order) and the
README's stage table (`python -m rank1_core.stages --markdown`; tests/test_docs.py fails when
the README's copy differs).

A stage whose inputs depend on the config (or on which optional stages have finished) names
every stage it may read in `inputs` and picks among them with `pick(cfg, done)`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from rank1_core.config import Config

Done = Callable[[str], bool]
"""done(stage) -> whether that stage of the run has finished."""


@dataclass(frozen=True)
class Stage:
    name: str
    about: str
    """One line: what it does (the README's stage table)."""
    sections: tuple[str, ...]
    """Config sections its own output depends on: its config hash covers these and run.seed."""
    inputs: tuple[str, ...]
    """Every stage whose outputs it may read, in the order their hashes fold into its own."""
    outputs: tuple[str, ...]
    """What it leaves in `run.dir/<stage>/`."""
    ray: str
    """How it uses Ray (the README's stage table)."""
    doc: str
    """Its page under docs/stages/."""
    pick: Optional[Callable[["Config", Done], tuple[str, ...]]] = None
    """The inputs a given config reads (None: all of `inputs`)."""

    def upstream(self, cfg: "Config", done: Done) -> tuple[str, ...]:
        """The inputs this config reads, in `inputs` order."""
        chosen = set(self.inputs if self.pick is None else self.pick(cfg, done))
        stray = chosen - set(self.inputs)
        if stray:  # a pick naming a stage not declared as an input is a bug here
            raise RuntimeError(f"stage {self.name!r} picked undeclared inputs {sorted(stray)}")
        return tuple(s for s in self.inputs if s in chosen)


def _train(cfg, done):
    return () if cfg.train.adapter_path else ("prepare",)


def _evaluate(cfg, done):
    v = cfg.evaluate.variants
    return ("prepare",) + (("train",) if "lora" in v else ()) + (("train_full",) if "full" in v else ())


def _ablate(cfg, done):
    bench_groups = cfg.ablate.benchmark_groups and bool(cfg.ablate.groups)
    return ("prepare", "train") + (("evaluate",) if bench_groups else ())


def _optional_sources(sources, done) -> tuple[str, ...]:
    """SAE and transcoder features are a source when `sources` names them, or (sources null)
    when their stage has finished."""
    use_sae = ("sae" in sources) if sources is not None else done("sae")
    use_tc = ("transcoder" in sources) if sources is not None else done("transcoder_extract")
    return (("sae",) if use_sae else ()) + (("transcoder_extract",) if use_tc else ())


def _topk(cfg, done):
    return ("extract",) + _optional_sources(cfg.topk.sources, done)


def _concepts(cfg, done):
    return (("prepare", "extract") + _optional_sources(cfg.concepts.sources, done)
            + (("autointerp",) if done("autointerp") else ()))


def _steer(cfg, done):
    sc = cfg.steer
    return ("prepare", "train", "topk") + (("sae",) if sc.sae_features or sc.auto_sae_features else ())


def _transcoder(cfg, done):
    return ("prepare",) + (("train_full",) if cfg.transcoder.target == "train_full" else ())


def _transcoder_eval(cfg, done):
    ups = ("prepare", "transcoder", "transcoder_extract")
    if cfg.transcoder_eval.reference == "evaluate":
        return ups + ("evaluate",)
    return ups + (("train_full",) if cfg.transcoder.target == "train_full" else ())


def _report(cfg, done):
    return tuple(s for s in REPORT_INPUTS if done(s))


REPORT_INPUTS = ("prepare", "train", "train_full", "evaluate", "ablate", "extract", "topk", "sae", "autointerp",
                 "steer", "transcoder", "transcoder_extract", "transcoder_eval", "concepts")
"""Every stage the report may draw on, in its status table's order (the transcoder stages were
appended, so the report's hash on a run without them stayed what it was); those finished when
it runs are its inputs."""

_STAGES = (
    Stage("prepare", "traces (offline synthetic set, or s1K-1.1) formatted as s1 trains, tokenized, loss masked "
          "to the assistant turn; benchmark sets",
          ("model", "data"), (), ("tokens/", "traces.parquet", "spans.parquet", "benchmarks/*.parquet"),
          "driver", "prepare.md"),
    Stage("train", "rank-1 LoRA on q,k,v,o,gate,up,down of every layer (or `train.adapter_path`: an adapter made "
          "elsewhere)",
          ("model", "data", "train"), ("prepare",), ("adapter/", "metrics.parquet", "checkpoints/"),
          "Ray Train (DDP / DeepSpeed ZeRO-2/3)", "train.md", _train),
    Stage("train_full", "the full fine-tune baseline, same data, loss and loop",
          ("model", "data", "train"), ("prepare",), ("model/", "metrics.parquet", "checkpoints/"),
          "Ray Train", "train.md"),
    Stage("evaluate", "base / LoRA / full on the benchmarks (vLLM, or transformers), graded with math-verify; "
          "Table 1 with % recovery",
          ("model", "evaluate"), ("prepare", "train", "train_full"),
          ("samples.parquet", "summary.parquet", "table1.md", "table1.csv"), "Ray Data actors", "evaluate.md", _evaluate),
    Stage("ablate", "KL of every component and every layer ablated (Figure 1); attention-only / MLP-only adapters "
          "re-benchmarked (Table 2)",
          ("model", "ablate"), ("prepare", "train", "evaluate"),
          ("kl_components.parquet", "kl_layers.parquet", "table2.md", "table2.csv"), "Ray Data actors", "ablate.md",
          _ablate),
    Stage("extract", "every token's adapter scalars (`lora_A·x`, layers x 7) and the first N neurons of every "
          "base MLP",
          ("model", "extract"), ("prepare", "train"), ("activations/", "neurons/", "tokens/", "components.parquet"),
          "Ray Data actor pool", "extract.md"),
    Stage("sae", "cross-layer BatchTopK SAE over the whole adapter state; every token encoded",
          ("sae",), ("extract",), ("cfg.json", "sae.safetensors", "latents.parquet", "features/"),
          "Ray Train (+ Ray Data)", "sae.md"),
    Stage("topk", "top-64 contexts per component / neuron / SAE / transcoder feature, both signs; per-feature stats",
          ("topk",), ("extract", "sae", "transcoder_extract"), ("contexts.parquet", "stats.parquet"),
          "DuckDB (`queries/`)", "topk.md", _topk),
    Stage("autointerp", "explanation + 0/1/2 classification (the paper's prompts), categories, categorisation, "
          "detection, fuzzing and simulation scores",
          ("autointerp",), ("topk",), ("explanations.parquet", "categories.json", "calls.parquet"),
          "async actors, one shared rate limit", "autointerp.md"),
    Stage("concepts", "ground truth: token labels (planted, lexical, SQL concepts); AUROC and top-64 precision of "
          "every feature x concept, against random directions and shuffled labels; explanations checked against "
          "the truth",
          ("concepts",), ("prepare", "extract", "sae", "transcoder_extract", "autointerp"),
          ("labels.parquet", "catalogue.parquet", "scores.parquet", "features.parquet", "summary.parquet",
           "best.parquet"),
          "driver (NumPy, streamed by column)", "concepts.md", _concepts),
    Stage("steer", "scale / set / ablate one direction during generation; hesitation rate, length, accuracy, KL "
          "vs alpha, with random controls",
          ("model", "steer"), ("prepare", "train", "topk", "sae"), ("results.parquet", "figures/"),
          "Ray actors (ActorPool)", "steer.md", _steer),
    Stage("transcoder", "transcoder adapters: a sparse per-MLP approximation of base -> fine-tune; faithfulness on "
          "held-out traces",
          ("model", "transcoder"), ("prepare", "train_full"),
          ("adapter/", "metrics.parquet", "faithfulness.json", "faithfulness_layers.parquet", "checkpoints/"),
          "Ray Train", "transcoder.md", _transcoder),
    Stage("transcoder_extract", "every token's transcoder features (the SAE's sparse layout); hesitation features",
          ("model", "transcoder_extract"), ("prepare", "transcoder"),
          ("features/", "tokens/", "latents.parquet", "hesitation_features.parquet", "summary.json"),
          "Ray Data actors", "transcoder.md"),
    Stage("transcoder_eval", "the benchmarks with the adapters on, with hesitation features ablated, and a random "
          "control; recovered gain",
          ("model", "evaluate", "transcoder_eval"),
          ("prepare", "transcoder", "transcoder_extract", "evaluate", "train_full"),
          ("samples.parquet", "summary.parquet", "recovery.md", "recovery.csv", "hesitation.md", "hesitation.csv",
           "faithfulness.md"),
          "Ray Data actors", "transcoder.md", _transcoder_eval),
    Stage("report", "Tables 1-2, Figures 1-3, SAE curves, HTML feature dashboards of whatever has finished",
          ("report",), REPORT_INPUTS, ("index.html", "features.html", "figures/", "tables/"), "driver", "report.md",
          _report),
)

STAGES: dict[str, Stage] = {s.name: s for s in _STAGES}
"""Every stage, by name, in pipeline order."""


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (known: {', '.join(STAGES)})") from None


def upstream(cfg: "Config", name: str, run=None) -> tuple[str, ...]:
    """The stages `name` reads under `cfg`; `run` (a RunDir; default cfg.run.dir) says which
    optional stages have finished."""
    if run is None:
        from rank1_core.rundir import RunDir

        run = RunDir(cfg.run.dir)
    return stage(name).upstream(cfg, lambda s: run.stage(s).is_done())


def markdown() -> str:
    """The README's stage table (between its `<!-- stages -->` markers)."""
    out = ["| stage | does | Ray | reads | leaves in `run.dir/<stage>/` |", "|---|---|---|---|---|"]
    for s in _STAGES:
        reads = ", ".join(s.inputs) if s.pick is None else ", ".join(s.inputs) + " (as the config needs)"
        if s.name == "report":
            reads = "whatever has finished"
        leaves = ", ".join(f"`{o}`" for o in s.outputs)
        out.append(f"| [{s.name}](docs/stages/{s.doc}) | {s.about} | {s.ray} | {reads or '-'} | {leaves} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rank1_core.stages", description=__doc__.split("\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the README's stage table")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        for s in _STAGES:
            print(f"{s.name:20s} sections={','.join(s.sections)}  inputs={','.join(s.inputs) or '-'}")


if __name__ == "__main__":
    main()
