"""Every explained feature of a run in Neuronpedia's export/import batch layout.

Neuronpedia's own exporter (``utils/neuronpedia-utils``: ``export-data.py``,
``convert-saedashboard-to-neuronpedia-export.py``) writes, per model and source, and its
``/api/admin/import`` route reads::

    OUT/<modelId>/<sourceId>/release.jsonl       one SourceRelease
                            model.jsonl         one Model
                            sourceset.jsonl     one SourceSet
                            source.jsonl        one Source
                            features/batch-N.jsonl.gz      Feature ("Neuron" table) rows
                            activations/batch-N.jsonl.gz   Activation rows (top contexts)
                            explanations/batch-N.jsonl.gz  Explanation rows

with ``sourceId`` = ``<layer>-<sourceSetName>``. Field names and types follow their
``neuronpedia_utils/db_models`` dataclasses (``FIELDS`` below; `validate` checks a folder
against them). rank1's sources map onto Neuronpedia sources as:

- adapter components: source set ``rank1-adapter``, one source per layer, index = the
  module's position in (q, k, v, o, gate, up, down);
- baseline MLP neurons: ``rank1-mlp-neurons``, per layer, index = the neuron's index;
- SAE latents: ``rank1-sae``; the SAE is cross-layer (it reads every layer at once), so it is
  one source on layer 0, index = the latent;
- transcoder latents: ``rank1-transcoder`` on layer 0, index = rank1's global latent id
  (layer x latents per layer + latent).

A feature explained on its negative side goes to the source set with ``-neg`` appended, its
activations negated (Neuronpedia shows a feature's positive side). The explanation's scores
(detection, fuzzing, simulation) are in each Explanation's ``notes`` and, as rows shaped
like Neuronpedia's ``ExplanationScore`` table, in ``explanation_scores/batch-N.jsonl.gz``
(the stock importer does not read that folder). ``OUT/rank1_index.jsonl`` maps every
(modelId, sourceId, index) back to rank1's (source, feature, sign).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rank1_core import __version__
from rank1_core.export.atomic import ExportError, check_destination
from rank1_core.export.saelens import open_run, require_stage, run_config
from rank1_core.rundir import atomic_dir

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BATCH = 1024
"""Rows per batch file (their exporter's FEATURES_EXPLANATIONS_BATCH_SIZE)."""
SOURCE_SETS = {"adapter": ("rank1-adapter", "rank-1 LoRA adapter components (lora_A . x)"),
               "neuron": ("rank1-mlp-neurons", "baseline MLP neurons"),
               "sae": ("rank1-sae", "cross-layer BatchTopK SAE over the whole adapter state (all layers)"),
               "transcoder": ("rank1-transcoder", "transcoder adapter latents (global id = layer x width + latent)")}

S, I, F, B = str, int, float, bool
N = type(None)
L = list
# Field -> allowed JSON types, from neuronpedia_utils/db_models (dataclass defaults included).
FIELDS: dict[str, dict[str, tuple]] = {
    "release": {"name": (S,), "description": (S,), "creatorName": (S,), "creatorId": (S,), "visibility": (S,),
                "isNewUi": (B,), "featured": (B,), "descriptionShort": (S, N), "urls": (L,), "creatorEmail": (S, N),
                "creatorNameShort": (S, N), "defaultSourceSetName": (S, N), "defaultSourceId": (S, N),
                "defaultUmapSourceIds": (L,), "createdAt": (S,)},
    "model": {"id": (S,), "instruct": (B,), "creatorId": (S,), "displayNameShort": (S,), "displayName": (S,),
              "tlensId": (S, N), "dimension": (I, N), "visibility": (S,), "defaultSourceSetName": (S, N),
              "defaultSourceId": (S, N), "inferenceEnabled": (B,), "layers": (I,), "neuronsPerLayer": (I,),
              "createdAt": (S,), "owner": (S,), "updatedAt": (S,), "website": (S, N)},
    "sourceset": {"modelId": (S,), "name": (S,), "creatorId": (S,), "hasDashboards": (B,), "visibility": (S,),
                  "description": (S,), "type": (S,), "creatorName": (S,), "urls": (L,), "creatorEmail": (S, N),
                  "releaseName": (S, N), "defaultOfModelId": (S, N), "defaultRange": (I,),
                  "defaultShowBreaks": (B,), "showDfa": (B,), "showCorrelated": (B,), "showHeadAttribution": (B,),
                  "showUmap": (B,), "createdAt": (S,)},
    "source": {"id": (S,), "modelId": (S,), "setName": (S,), "creatorId": (S,), "hasDashboards": (B,),
               "inferenceEnabled": (B,), "inferenceHosts": (L,), "saelensConfig": (S, N), "saelensRelease": (S, N),
               "saelensSaeId": (S, N), "hfRepoId": (S, N), "hfFolderId": (S, N), "visibility": (S,),
               "defaultOfModelId": (S, N), "hasUmap": (B,), "hasUmapLogSparsity": (B,), "hasUmapClusters": (B,),
               "num_prompts": (I, N), "num_tokens_in_prompt": (I, N), "dataset": (S, N), "notes": (S, N),
               "createdAt": (S,)},
    "features": {"modelId": (S,), "layer": (S,), "index": (S,), "creatorId": (S, N), "createdAt": (S,),
                 "maxActApprox": (F, I, N), "hasVector": (B,), "vector": (L,), "vectorLabel": (S, N),
                 "vectorDefaultSteerStrength": (F, I, N), "hookName": (S, N), "topkCosSimIndices": (L,),
                 "topkCosSimValues": (L,), "neuron_alignment_indices": (L,), "neuron_alignment_values": (L,),
                 "neuron_alignment_l1": (L,), "correlated_neurons_indices": (L,), "correlated_neurons_pearson": (L,),
                 "correlated_neurons_l1": (L,), "correlated_features_indices": (L,),
                 "correlated_features_pearson": (L,), "correlated_features_l1": (L,), "neg_str": (L,),
                 "neg_values": (L,), "pos_str": (L,), "pos_values": (L,), "frac_nonzero": (F, I),
                 "freq_hist_data_bar_heights": (L,), "freq_hist_data_bar_values": (L,),
                 "logits_hist_data_bar_heights": (L,), "logits_hist_data_bar_values": (L,),
                 "decoder_weights_dist": (L,), "sourceSetName": (S, N)},
    "activations": {"id": (S,), "tokens": (L,), "index": (S,), "layer": (S,), "modelId": (S,), "maxValue": (F, I),
                    "maxValueTokenIndex": (I,), "minValue": (F, I), "values": (L,), "creatorId": (S,),
                    "dataSource": (S, N), "dataIndex": (S, N), "dfaValues": (L,), "dfaTargetIndex": (I, N),
                    "dfaMaxValue": (F, N), "createdAt": (S,), "lossValues": (L,), "logitContributions": (S, N),
                    "binMin": (F, N), "binMax": (F, N), "binContains": (F, N), "qualifyingTokenIndex": (I, N),
                    "zIndices": (L, N), "zValues": (L, N)},
    "explanations": {"id": (S,), "modelId": (S,), "layer": (S,), "index": (S,), "description": (S,),
                     "authorId": (S,), "embedding": (L, N), "triggeredById": (S, N), "typeName": (S, N),
                     "explanationModelName": (S, N), "notes": (S, N), "createdAt": (S,)},
    "explanation_scores": {"id": (S,), "initiatedByUserId": (S,), "value": (F, I), "explanationId": (S,),
                           "explanationScoreTypeName": (S,), "explanationScoreModelName": (S,),
                           "jsonDetails": (S,), "createdAt": (S,)},
}
ONE_ROW = ("release", "model", "sourceset", "source")
BATCHED = ("features", "activations", "explanations", "explanation_scores")
SCORE_TYPES = {"score": "rank1_detection", "fuzz_score": "rank1_fuzz", "simulation_score": "rank1_simulation"}


def _cuid(*parts: Any) -> str:
    """A stable 25-character id (Neuronpedia uses cuids; any unique string is accepted)."""
    return "r1" + hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:23]


def locate(source: str, feature: str, sign: str) -> tuple[int, str, int]:
    """(layer, source set name, index) of a rank1 feature on Neuronpedia."""
    set_name = SOURCE_SETS[source][0] + ("-neg" if sign == "neg" else "")
    if source == "adapter":
        m = re.fullmatch(r"L(\d+)_(\w+)", feature)
        if m is None or m.group(2) not in MODULES:
            raise ExportError(f"adapter component {feature!r} is not named L<layer>_<module> with a module of {MODULES}")
        return int(m.group(1)), set_name, MODULES.index(m.group(2))
    if source == "neuron":
        m = re.fullmatch(r"N(\d+)_(\d+)", feature)
        if m is None:
            raise ExportError(f"neuron {feature!r} is not named N<layer>_<index>")
        return int(m.group(1)), set_name, int(m.group(2))
    m = re.fullmatch(r"F(\d+)", feature)
    if m is None:
        raise ExportError(f"{source} feature {feature!r} is not named F<index>")
    return 0, set_name, int(m.group(1))


def _gz_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, compresslevel=5))


def _jsonl(path: Path, row: dict) -> None:
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n")


def _notes(r: dict) -> str:
    parts = []
    for col, name in (("score", "detection"), ("fuzz_score", "fuzzing"), ("simulation_score", "simulation")):
        if r.get(col) is not None:
            parts.append(f"{name} {r[col]:.3f}")
    cls = {0: "clear", 1: "broad but consistent", 2: "polysemantic"}.get(r.get("classification"))
    text = "rank1 " + ("scores: " + ", ".join(parts) if parts else "(not scored)")
    if cls:
        text += f"; classification {r['classification']} ({cls})"
    if r.get("category"):
        text += f"; category {r['category']}"
    return text


def export_neuronpedia(run_uri: str, out: str | Path, force: bool = False, model_id: str | None = None,
                       release: str | None = None, creator: str = "rank1", creator_id: str = "rank1-creator",
                       url: str | None = None) -> dict:
    """Write every explained feature of the run in Neuronpedia's layout into ``out`` (local,
    created whole or not at all); returns counts per source. Validates what it wrote."""
    run = open_run(run_uri)
    ai = require_stage(run, "autointerp", "a Neuronpedia export (its explanations)")
    topk = require_stage(run, "topk", "a Neuronpedia export (its top contexts)")
    if not ai.exists("explanations.parquet"):
        raise ExportError(f"{ai.uri_of('explanations.parquet')} is missing: rerun `rank1 autointerp`")
    expl = [r for r in pq.read_table(ai.path("explanations.parquet"), filesystem=ai.fs).to_pylist()
            if r.get("explanation")]
    if not expl:
        raise ExportError(f"run {run.uri} has no explained feature in {ai.uri_of('explanations.parquet')} "
                          "(every explanation failed or none was asked for): nothing to export to Neuronpedia")
    keys = {(r["source"], r["feature"], r["sign"]) for r in expl}
    ctx = pq.read_table(topk.path("contexts.parquet"), filesystem=topk.fs,
                        columns=["source", "feature", "sign", "rank", "context_tokens", "context_values", "hit_index"],
                        filters=[("source", "in", sorted({k[0] for k in keys}))]).to_pylist()
    stats = {(r["source"], r["feature"]): r for r in pq.read_table(
        topk.path("stats.parquet"), filesystem=topk.fs).to_pylist()}
    cfg = run_config(ai)
    model = model_id or re.sub(r"[^A-Za-z0-9._-]+", "-", str((cfg.get("model") or {}).get("name") or "model")).strip("-")
    release = release or f"rank1-{Path(run.root).name}"
    now = datetime.now(timezone.utc).isoformat()
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for c in ctx:
        k = (c["source"], c["feature"], c["sign"])
        if k in keys:
            by_key[k].append(c)

    groups: dict[tuple[int, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    index_rows = []
    for r in sorted(expl, key=lambda r: (r["source"], r["feature"], r["sign"])):
        layer, set_name, idx = locate(r["source"], r["feature"], r["sign"])
        sid = f"{layer}-{set_name}"
        g = groups[(layer, set_name)]
        sgn = -1.0 if r["sign"] == "neg" else 1.0
        acts = []
        for c in sorted(by_key[(r["source"], r["feature"], r["sign"])], key=lambda c: c["rank"]):
            vals = [sgn * float(v) for v in c["context_values"]]
            top = max(range(len(vals)), key=lambda i: vals[i])
            acts.append({"id": _cuid(model, sid, idx, "act", c["rank"]), "tokens": list(c["context_tokens"]),
                         "index": str(idx), "layer": sid, "modelId": model, "maxValue": vals[top],
                         "maxValueTokenIndex": top, "minValue": min(vals), "values": vals, "creatorId": creator_id,
                         "dataSource": None, "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None,
                         "dfaMaxValue": None, "createdAt": now, "lossValues": [], "logitContributions": None,
                         "binMin": None, "binMax": None, "binContains": None,
                         "qualifyingTokenIndex": int(c["hit_index"]), "zIndices": None, "zValues": None})
        st = stats.get((r["source"], r["feature"]), {})
        g["activations"].extend(acts)
        g["features"].append({
            "modelId": model, "layer": sid, "index": str(idx), "creatorId": creator_id, "createdAt": now,
            "maxActApprox": max((a["maxValue"] for a in acts), default=0.0), "hasVector": False, "vector": [],
            "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None, "topkCosSimIndices": [],
            "topkCosSimValues": [], "neuron_alignment_indices": [], "neuron_alignment_values": [],
            "neuron_alignment_l1": [], "correlated_neurons_indices": [], "correlated_neurons_pearson": [],
            "correlated_neurons_l1": [], "correlated_features_indices": [], "correlated_features_pearson": [],
            "correlated_features_l1": [], "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
            "frac_nonzero": float(st.get("frac_active") or 0.0), "freq_hist_data_bar_heights": [],
            "freq_hist_data_bar_values": [], "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "decoder_weights_dist": [], "sourceSetName": set_name})
        eid = _cuid(model, sid, idx, "explanation")
        g["explanations"].append({
            "id": eid, "modelId": model, "layer": sid, "index": str(idx), "description": r["explanation"],
            "authorId": creator_id, "embedding": None, "triggeredById": None, "typeName": "rank1-b1",
            "explanationModelName": r.get("model"), "notes": _notes(r), "createdAt": now})
        for col, tname in SCORE_TYPES.items():
            if r.get(col) is not None:
                details = {"detection": {"accuracy": r.get("score_accuracy"), "n": r.get("score_n")},
                           "fuzz_score": {"accuracy": r.get("fuzz_accuracy"), "n": r.get("fuzz_n")},
                           "simulation_score": {"tokens": r.get("simulation_n"), "method": r.get("simulation_method")}}
                g["explanation_scores"].append({
                    "id": _cuid(eid, tname), "initiatedByUserId": creator_id, "value": float(r[col]),
                    "explanationId": eid, "explanationScoreTypeName": tname,
                    "explanationScoreModelName": r.get("model") or "unknown",
                    "jsonDetails": json.dumps(details.get(col, details["detection"])), "createdAt": now})
        index_rows.append({"modelId": model, "layer": sid, "index": str(idx), "source": r["source"],
                           "feature": r["feature"], "sign": r["sign"]})

    n_layers = (cfg.get("model") or {}).get("num_layers")
    counts: dict[str, int] = defaultdict(int)
    with atomic_dir(check_destination(out, force)) as tmp:
        for (layer, set_name), g in sorted(groups.items()):
            sid = f"{layer}-{set_name}"
            d = tmp / model / sid
            d.mkdir(parents=True)
            desc = SOURCE_SETS[next(s for s, v in SOURCE_SETS.items() if set_name.startswith(v[0]))][1]
            desc += " (negative side)" if set_name.endswith("-neg") else ""
            _jsonl(d / "release.jsonl", {
                "name": release, "description": f"rank1 run {run.uri}", "creatorName": creator, "creatorId": creator_id,
                "visibility": "PUBLIC", "isNewUi": False, "featured": False,
                "descriptionShort": f"rank1 features of {model}", "urls": [url] if url else [], "creatorEmail": None,
                "creatorNameShort": creator, "defaultSourceSetName": None, "defaultSourceId": None,
                "defaultUmapSourceIds": [], "createdAt": now})
            _jsonl(d / "model.jsonl", {
                "id": model, "instruct": True, "creatorId": creator_id, "displayNameShort": model, "displayName": model,
                "tlensId": None, "dimension": None, "visibility": "PUBLIC", "defaultSourceSetName": None,
                "defaultSourceId": None, "inferenceEnabled": False,
                "layers": int(n_layers) if isinstance(n_layers, int) else 0, "neuronsPerLayer": 0,
                "createdAt": now, "owner": creator, "updatedAt": now, "website": url})
            _jsonl(d / "sourceset.jsonl", {
                "modelId": model, "name": set_name, "creatorId": creator_id, "hasDashboards": True,
                "visibility": "PUBLIC", "description": desc, "type": "", "creatorName": creator,
                "urls": [url] if url else [], "creatorEmail": None, "releaseName": release, "defaultOfModelId": None,
                "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                "showHeadAttribution": False, "showUmap": False, "createdAt": now})
            _jsonl(d / "source.jsonl", {
                "id": sid, "modelId": model, "setName": set_name, "creatorId": creator_id, "hasDashboards": True,
                "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
                "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC",
                "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
                "num_prompts": None, "num_tokens_in_prompt": None, "dataset": None,
                "notes": f"exported by rank1 {__version__}", "createdAt": now})
            for kind in BATCHED:
                rows = g.get(kind, [])
                for b in range(0, len(rows), BATCH):
                    _gz_jsonl(d / kind / f"batch-{b // BATCH}.jsonl.gz", rows[b:b + BATCH])
            counts[set_name] += len(g["features"])
        (tmp / "rank1_index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index_rows))
        validate(tmp)
    return {"out": str(Path(out).expanduser().resolve()), "format": "neuronpedia", "model_id": model,
            "release": release, "features": sum(counts.values()), "by_source_set": dict(sorted(counts.items()))}


def validate(root: str | Path) -> int:
    """Check every file of an export against `FIELDS` (names and JSON types, no field missing
    or unknown); return the number of rows checked; raise ExportError naming file, row, field."""
    root = Path(root)
    n = 0
    sources = [p.parent for p in root.glob("*/*/source.jsonl")]
    if not sources:
        raise ExportError(f"{root}: no <modelId>/<sourceId>/source.jsonl")
    for d in sources:
        for kind in ONE_ROW:
            p = d / f"{kind}.jsonl"
            if not p.exists():
                raise ExportError(f"{p} is missing")
            lines = p.read_text().splitlines()
            if len(lines) != 1:
                raise ExportError(f"{p}: {len(lines)} rows, expected 1")
            n += _check(p, 1, json.loads(lines[0]), FIELDS[kind])
        if not list((d / "features").glob("batch-*.jsonl.gz")):
            raise ExportError(f"{d}/features has no batch-*.jsonl.gz")
        for kind in BATCHED:
            for p in sorted((d / kind).glob("*")):
                if not re.fullmatch(r"batch-\d+\.jsonl\.gz", p.name):
                    raise ExportError(f"{p}: not named batch-<n>.jsonl.gz")
                for i, line in enumerate(gzip.decompress(p.read_bytes()).decode().splitlines(), 1):
                    row = json.loads(line)
                    n += _check(p, i, row, FIELDS[kind])
                    if kind in ("features", "activations", "explanations") and row["layer"] != d.name:
                        raise ExportError(f"{p} row {i}: layer {row['layer']!r} is not its source {d.name!r}")
    return n


def _check(path: Path, i: int, row: dict, fields: dict[str, tuple]) -> int:
    missing = sorted(set(fields) - set(row))
    extra = sorted(set(row) - set(fields))
    if missing or extra:
        raise ExportError(f"{path} row {i}: missing fields {missing}, unknown fields {extra}")
    for k, types in fields.items():
        v = row[k]
        ok = any((t is F and isinstance(v, (int, float)) and not isinstance(v, bool)) or
                 (t is I and isinstance(v, int) and not isinstance(v, bool)) or
                 (t not in (F, I) and isinstance(v, t)) for t in types)
        if not ok:
            raise ExportError(f"{path} row {i}: field {k!r} = {v!r} is {type(v).__name__}, "
                              f"expected {' or '.join(t.__name__ for t in types)}")
    return 1
