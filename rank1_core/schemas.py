"""Every Parquet table a stage writes with a fixed schema, rendered as docs/schemas.md.

The columns and their types are read from the code that writes them (the ``pa.schema``
constants beside the writers, or the writer itself called on no rows); only a one-line
description per column lives here, and `check()` fails when a description names a column the
schema lacks or misses one it has. `python -m rank1_core.schemas --markdown > docs/schemas.md`
regenerates the page; `tests/test_docs.py` fails when the page and this module disagree.

Tables written without a fixed schema (from pandas, or with one column per component) are
listed in `NOT_COVERED` and documented by hand on their stage's page.

No `ray` here.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa


@dataclass(frozen=True)
class Table:
    stage: str
    path: str
    """Relative to `<run>/<stage>/`."""
    source: str
    """Where the schema is defined: `module:NAME` (a constant) or `module:function` (called)."""
    what: str
    columns: dict[str, str]
    """Column -> one-line description, in any order; must name exactly the schema's columns."""
    build: Callable[[object], pa.Schema] | None = None
    """How to get the schema from the object `source` names (None: it is the schema)."""

    def schema(self) -> pa.Schema:
        module, name = self.source.split(":")
        obj = getattr(importlib.import_module(module), name)
        return self.build(obj) if self.build else obj


def _metrics(columns) -> pa.Schema:
    from rank1_core.harness import metrics_table

    return metrics_table([], columns).schema


def _explanations_derived(fn) -> pa.Schema:
    from rank1_core.autointerp.pipeline import EXPLANATIONS_SCHEMA
    from rank1_core.topk import STATS_SCHEMA

    empty = EXPLANATIONS_SCHEMA.empty_table()
    if fn.__name__ == "category_shares":
        return fn(empty, STATS_SCHEMA.empty_table(), {}).schema
    return fn(empty).schema


_FEATURE_ROWS = {
    "doc_id": "document (trace) id, as in `prepare/tokens`",
    "pos": "token position in the document",
    "feature": "latent index (named `F{idx:05d}` elsewhere)",
    "value": "the latent's activation at that token; only non-zero values are stored",
}
_SOURCE = "'adapter' | 'neuron' | 'sae' | 'transcoder' | 'random' (concepts' control directions)"

TABLES: list[Table] = [
    Table("prepare", "tokens/part-*.parquet", "rank1_core.data.prepare:TOKENS_SCHEMA",
          "every trace, tokenized, with its loss mask", {
              "doc_id": "trace id",
              "split": "'train' | 'heldout' (the last `data.heldout_traces` traces)",
              "input_ids": "token ids of the whole formatted trace",
              "loss_mask": "1 on the assistant turn (the tokens trained on), 0 elsewhere",
              "num_tokens": "length of `input_ids`",
              "prompt_len": "tokens before the assistant turn",
              "truncated": "cut at `data.max_seq_len` (`data.overlong: truncate`)",
          }),
    Table("prepare", "spans.parquet", "rank1_core.data.prepare:SPANS_SCHEMA",
          "each document's think / answer sections and the spans its metadata lists", {
              "doc_id": "trace id",
              "concept": "the section (`think`, `answer`) or planted concept the span marks",
              "field": "'thinking' | 'attempt': the trace field the characters index",
              "char_start": "first character of the span in that field",
              "char_end": "character after the span",
              "start": "first token position of the span",
              "end": "token position after the span (exclusive)",
          }),
    Table("prepare", "benchmarks/<name>.parquet", "rank1_core.data.prepare:BENCH_SCHEMA",
          "one prepared benchmark set", {
              "problem_id": "id of the problem within its benchmark",
              "question": "the question as prompted",
              "answer": "the reference answer (a letter for multiple choice)",
              "kind": "'math' | 'mc'",
              "choices": "the shuffled choices of a multiple-choice question (empty for math)",
              "source": "the benchmark: math500, aime24, gpqa_diamond or reasoning_gym/<task>",
          }),
    Table("train", "metrics.parquet", "rank1_core.train:METRIC_COLUMNS",
          "per optimizer step (also `train_full/metrics.parquet`)", {
              "step": "optimizer step; 0 = before training",
              "epoch": "fractional epoch",
              "loss": "training loss of the step",
              "lr": "learning rate",
              "tokens": "tokens trained on in this step (no padding)",
              "tokens_per_s": "throughput of the step",
              "grad_norm": "gradient norm of the step (null at step 0)",
              "heldout_loss": ("held-out loss at step 0, each epoch end, every `eval_every` steps and the last "
                                "step; null elsewhere"),
              "wall": "unix time",
          }, build=_metrics),
    Table("sae", "features/part-r<rank>-<n>.parquet", "rank1_core.sae:FEATURE_SCHEMA",
          "sparse SAE activations, live features only (view `sae_features`)", _FEATURE_ROWS),
    Table("sae", "metrics.parquet", "rank1_core.sae:METRIC_COLUMNS", "per training step", {
        "step": "training step",
        "tokens": "tokens trained on so far",
        "loss": "MSE + aux_coef x AuxK",
        "mse": "reconstruction MSE in normalised space",
        "aux_loss": "AuxK loss (dead latents reconstructing the residual)",
        "fvu": "fraction of variance unexplained (normalised space)",
        "l0": "active latents per token",
        "dead_fraction": "share of latents that have not fired for `dead_tokens` tokens",
        "lr": "learning rate",
        "threshold": "the running inference threshold",
    }, build=_metrics),
    Table("topk", "contexts.parquet", "rank1_core.topk:CONTEXTS_SCHEMA",
          "top-k contexts per feature and sign (view `contexts`)", {
              "source": "'adapter' | 'neuron' | 'sae' | 'transcoder'",
              "feature": "column name (`L05_q_proj`, `N03_0012`) or `F{idx:05d}`",
              "sign": "'pos' (largest positive values) | 'neg' (most negative)",
              "rank": "1..k",
              "doc_id": "document of the hit",
              "pos": "token position of the hit",
              "value": "the feature's value at the hit",
              "context_token_ids": ("token ids of the window `[pos-window_before, pos+window_after]`, cut at "
                                     "document ends"),
              "context_tokens": "decoded text of each window token",
              "context_values": "this feature's value on each window token (0 where a sparse source stored none)",
              "hit_index": "index of the hit in the window",
          }),
    Table("topk", "stats.parquet", "rank1_core.topk:STATS_SCHEMA", "per-feature statistics (view `stats`)", {
        "source": "as in contexts",
        "feature": "as in contexts",
        "n_tokens": "tokens the statistics cover (unstored sparse values count as zeros)",
        "mean": "mean value",
        "std": "population standard deviation",
        "min": "smallest value",
        "max": "largest value",
        "frac_active": "share of tokens with value > `topk.active_threshold`",
    }),
    Table("autointerp", "explanations.parquet", "rank1_core.autointerp.pipeline:EXPLANATIONS_SCHEMA",
          "one row per explained feature and sign (view `explanations`)", {
              "source": "feature source",
              "feature": "feature name",
              "sign": "'pos' | 'neg' (the side explained)",
              "explanation": "the LLM's explanation",
              "classification": "0 clear and monosemantic / 1 broad but consistent / 2 polysemantic, or null",
              "classification_reasoning": "the LLM's reasoning for the class",
              "category": "category `string_id`, or null",
              "category_group": "the category group the feature belongs to",
              "score": "detection score: balanced accuracy (0.5 = chance), or null",
              "score_accuracy": "detection: plain accuracy",
              "score_n": "detection: contexts labelled",
              "fuzz_score": "fuzzing: balanced accuracy",
              "fuzz_accuracy": "fuzzing: plain accuracy",
              "fuzz_n": "fuzzing: contexts judged",
              "simulation_score": "simulation: correlation of predicted and true activations",
              "simulation_n": "simulation: tokens compared",
              "simulation_method": "'logprobs' | 'parsed'",
              "n_contexts": "contexts shown in the explanation prompt",
              "model": "the model that explained",
              "error": "null or `task: reason; ...`",
          }),
    Table("autointerp", "calls.parquet", "rank1_core.autointerp.pipeline:CALLS_SCHEMA",
          "every LLM call of every attempt of the stage, crashed ones included (view `llm_calls`)", {
              "time": "when the row was logged (UTC)",
              "attempt_run": "id of the stage attempt that made it",
              "task": "explain, categories, categorize, score, fuzz, simulate",
              "model": "model asked",
              "source": "feature source",
              "feature": "feature name",
              "sign": "side of the feature",
              "group": "category group (category-generation calls)",
              "tag": "the request's tag: `source/feature/sign`, or the group of a category call",
              "cached": "answered from the cache",
              "status": "ok / cached / error / budget",
              "tokens_in": "prompt tokens",
              "tokens_out": "completion tokens",
              "cost_usd": "dollars, from the price table",
              "latency_s": "seconds to the answer",
              "attempts": "tries made",
              "retries": "retries among them",
              "retry_errors": "errors that were retried",
              "error": "the error (also notes a paid but unparsable answer)",
              "finish_reason": "the provider's finish reason",
              "key": "cache key",
              "timeouts": "tries abandoned at `timeout_s`",
              "recovered": "row rebuilt from the cache after a crash",
          }),
    Table("autointerp", "classification_shares.parquet", "rank1_core.autointerp.pipeline:classification_shares",
          "Figure 2 (left) (view `classification_shares`)", {
              "source": "feature source",
              "classification": "0 / 1 / 2",
              "n_features": "features of the source in that class",
              "share": "their share of the source's classified features",
          }, build=_explanations_derived),
    Table("autointerp", "category_shares.parquet", "rank1_core.autointerp.pipeline:category_shares",
          "Figure 2 (right) and Figure 3 (view `category_shares`)", {
              "source": "feature source",
              "category_group": "category group",
              "category": "category `string_id`",
              "category_name": "its name",
              "n_features": "features in the category",
              "feature_share": "their share of the source's categorized features",
              "activation_density": ("normalised sum over the category's features of mean activation x n_tokens "
                                      "(`topk/stats.parquet`)"),
              "firing_density": "the same with frac_active",
          }, build=_explanations_derived),
    Table("autointerp", "score_summary.parquet", "rank1_core.autointerp.pipeline:score_summary",
          "per source: features scored, mean, and mean weighted by firing rate (view `score_summary`)", {
              "source": "feature source",
              "n_features": "features of the source",
              "n_scored": "detection: features scored",
              "mean_score": "detection: mean",
              "weighted_score": "detection: mean weighted by `frac_active`",
              "n_fuzz": "fuzzing: features scored",
              "mean_fuzz": "fuzzing: mean",
              "weighted_fuzz": "fuzzing: mean weighted by `frac_active`",
              "n_simulation": "simulation: features scored",
              "mean_simulation": "simulation: mean",
              "weighted_simulation": "simulation: mean weighted by `frac_active`",
              "mean_accuracy": "detection: mean plain accuracy",
          }, build=_explanations_derived),
    Table("concepts", "labels.parquet", "rank1_core.concepts:LABELS_SCHEMA",
          "one row per labelled token (view `concept_labels`)", {
              "doc_id": "document", "pos": "token position", "concept": "concept name",
          }),
    Table("concepts", "catalogue.parquet", "rank1_core.concepts:CATALOGUE_SCHEMA",
          "every concept (view `concept_catalogue`)", {
              "concept": "concept name",
              "kind": "planted | section | lexical | sql",
              "definition": "how it is labelled",
              "n_tokens": "tokens labelled",
              "n_docs": "documents with a labelled token",
              "share": "share of all tokens",
              "empty": "matched no token: kept, marked, not scored",
          }),
    Table("concepts", "scores.parquet", "rank1_core.concepts:SCORES_SCHEMA",
          "every feature x concept (view `concept_scores`)", {
              "source": _SOURCE,
              "feature": "feature name",
              "sign": "'pos' | 'neg'",
              "labels": "'true' | 'shuffled' (the control)",
              "concept": "concept name",
              "auroc": "AUROC of the activation over all tokens (histogram estimate)",
              "auroc_bound": "the exact AUROC lies within this of `auroc`",
              "precision": "top-64 precision",
              "n_top": "top contexts the precision counts",
          }),
    Table("concepts", "features.parquet", "rank1_core.concepts:FEATURES_SCHEMA",
          "per source, feature and labels: the best concept (view `concept_features`)", {
              "source": _SOURCE,
              "feature": "feature name",
              "labels": "'true' | 'shuffled'",
              "concept": "the best concept (sections excluded: `concepts.best_excludes`)",
              "sign": "the sign that scored it",
              "auroc": "its AUROC",
              "auroc_bound": "its AUROC bound",
              "precision": "its top-64 precision",
              "n_top": "top contexts counted",
              "class": "clean | broad | unmatched",
          }),
    Table("concepts", "summary.parquet", "rank1_core.concepts:SUMMARY_SCHEMA",
          "per source and labels: the shares of each class with 95% bootstrap intervals (view `concept_summary`)", {
              "source": _SOURCE,
              "labels": "'true' | 'shuffled'",
              "n_features": "features scored",
              "clean": "share of clean features", "clean_lo": "its interval, low", "clean_hi": "its interval, high",
              "broad": "share of broad features", "broad_lo": "its interval, low", "broad_hi": "its interval, high",
              "unmatched": "share of unmatched features", "unmatched_lo": "its interval, low",
              "unmatched_hi": "its interval, high",
              "clean_auroc": "threshold: AUROC for clean",
              "clean_precision": "threshold: precision for clean",
              "broad_auroc": "threshold: AUROC for broad",
              "max_auroc_bound": "largest AUROC error bound of the source",
              "bootstrap": "bootstrap replicates",
          }),
    Table("concepts", "best.parquet", "rank1_core.concepts:BEST_SCHEMA",
          "per concept and source: the best feature against the controls (view `concept_best`)", {
              "concept": "concept name",
              "source": _SOURCE,
              "feature": "the best feature",
              "sign": "its sign",
              "auroc": "its AUROC",
              "auroc_bound": "its AUROC bound",
              "precision": "its top-64 precision",
              "random_auroc": "the best random direction's AUROC",
              "shuffled_auroc": "the best AUROC under shuffled labels (chance)",
          }),
    Table("concepts", "explanations.parquet", "rank1_core.concepts:EXPLAIN_SCHEMA",
          "explained features whose best concept is clean: does the explanation name it? "
          "(view `concept_explanations`)", {
              "source": "feature source",
              "feature": "feature name",
              "sign": "side explained",
              "model": "the model that explained",
              "concept": "the feature's best concept",
              "auroc": "its AUROC",
              "explanation": "the explanation",
              "copied": "the explanation copies the prompt (`copied_from`): counted wrong",
              "names_concept": "it contains one of the concept's keywords",
          }),
    Table("transcoder", "metrics.parquet", "rank1_core.transcoder:METRIC_COLUMNS",
          "per optimizer step (view `transcoder_metrics`)", {
              "step": "optimizer step",
              "epoch": "fractional epoch",
              "loss": "total loss",
              "kl": "KL(target || base + adapters)",
              "recon": "mean per-layer FVU of the MLP difference",
              "sparsity": "sum z_i ||W_dec,i||",
              "l0": "active latents per token",
              "fve": "explained variance of the MLP difference",
              "lr": "learning rate",
              "grad_norm": "gradient norm",
              "tokens": "tokens trained on in this step",
              "tokens_per_s": "throughput",
              "wall": "unix time",
          }, build=_metrics),
    Table("transcoder_extract", "features/*.parquet", "rank1_core.transcoder:FEATURE_SCHEMA",
          "sparse transcoder activations, the SAE layout (view `transcoder_features`)", {
              **_FEATURE_ROWS, "feature": "global feature id `layer * d_latent + latent`"}),
    Table("transcoder_extract", "tokens/*.parquet", "rank1_core.transcoder:TOKEN_SCHEMA",
          "the tokens encoded, extract's layout (view `transcoder_tokens`)", {
              "doc_id": "document", "pos": "token position", "token_id": "token id",
              "token": "decoded text of that single token", "split": "'train' | 'heldout'",
          }),
]

NOT_COVERED: list[tuple[str, str, str]] = [
    ("prepare", "traces.parquet (its columns: the `rank1_core/data/prepare.py` docstring)", "stages/prepare.md"),
    ("extract", "activations/, neurons/ (one column per component / neuron), tokens/, components.parquet, "
     "neuron_catalogue.parquet", "stages/extract.md"),
    ("evaluate", "samples.parquet, summary.parquet", "stages/evaluate.md"),
    ("ablate", "kl_components, kl_layers, kl_rows, groups, samples (.parquet)", "stages/ablate.md"),
    ("sae", "latents.parquet", "stages/sae.md"),
    ("steer", "results.parquet, samples.parquet, targets.parquet", "stages/steer.md"),
    ("transcoder, transcoder_extract, transcoder_eval",
     "faithfulness_layers.parquet, latents.parquet, hesitation_features.parquet, samples.parquet, summary.parquet",
     "stages/transcoder.md"),
]
"""(stage, tables, page): written from pandas or with one column per component, so there is no
schema constant to render; their columns are listed by hand on the stage's page."""


def check() -> None:
    """Every description names exactly the columns of its schema."""
    for t in TABLES:
        names = t.schema().names
        missing = [n for n in names if n not in t.columns]
        extra = [n for n in t.columns if n not in names]
        if missing or extra or len(set(names)) != len(names):
            raise ValueError(f"rank1_core/schemas.py: {t.stage}/{t.path} ({t.source}): "
                             f"undescribed columns {missing}, described but absent {extra}")


def markdown() -> str:
    check()
    out = ["# Parquet schemas", "",
           "Generated by `python -m rank1_core.schemas --markdown > docs/schemas.md` from the schemas in",
           "the code (`tests/test_docs.py` fails when this page is stale). Paths are relative to",
           "`<run>/<stage>/`; `rank1 sql --list --run DIR` shows the views of a run.", ""]
    stage = None
    for t in TABLES:
        if t.stage != stage:
            stage = t.stage
            out += [f"## {stage}", ""]
        out += [f"### `{t.stage}/{t.path}`", "", f"{t.what[0].upper()}{t.what[1:]}. Schema: `{t.source}`.", "",
                "| column | type | |", "|---|---|---|"]
        for f in t.schema():
            desc = t.columns[f.name].replace("|", "\\|")
            typ = str(f.type).replace("item: ", "")
            out.append(f"| `{f.name}` | `{typ}` | {desc} |")
        out.append("")
    out += ["## Not yet covered", "",
            "Written from pandas or with one column per component (no schema constant to render);",
            "their columns are listed by hand on the stage's page.", "",
            "| stage | tables | page |", "|---|---|---|"]
    out += [f"| {s} | {tables} | [{page}]({page}) |" for s, tables, page in NOT_COVERED]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m rank1_core.schemas", description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print docs/schemas.md")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        check()
        print(f"{len(TABLES)} schemas described")


if __name__ == "__main__":
    main()
