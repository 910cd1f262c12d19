"""`rank1 export neuronpedia`: every explained feature in Neuronpedia's batch layout, checked
against the field names and types of their exporter's dataclasses."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rank1_core.export import ExportError
from rank1_core.export.neuronpedia import FIELDS, export_neuronpedia, locate, validate
from ray_jobs.export import main as export_main
from tests.llm_server import FakeLLMServer
from tests.test_autointerp_stage import SIGNATURE, _cfg, keys, write_topk  # noqa: F401  (keys: fixture)


def _rows(p: Path) -> list[dict]:
    return [json.loads(x) for x in gzip.decompress(p.read_bytes()).decode().splitlines()]


def test_locate_maps_rank1_features_to_sources():
    assert locate("adapter", "L03_gate_proj", "pos") == (3, "rank1-adapter", 4)
    assert locate("neuron", "N12_0007", "neg") == (12, "rank1-mlp-neurons-neg", 7)
    assert locate("sae", "F00042", "pos") == (0, "rank1-sae", 42)
    with pytest.raises(ExportError, match="L<layer>_<module>"):
        locate("adapter", "L03_mystery", "pos")


def test_export_of_an_explained_run_validates(tiny_cfg, tmp_path, keys, capsys):  # noqa: F811
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv, "autointerp.scorers=[detection, fuzzing, simulation]")
        run = Path(cfg.run.dir)
        write_topk(run)
        srv.rules.append(["Hmm 10.00", "malformed", 99])  # L00_gate_proj stays unexplained
        autointerp.run(cfg)
    capsys.readouterr()
    out = tmp_path / "np"
    assert export_main(["neuronpedia", "--run", str(run), "--model-id", "tiny-qwen", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["features"] == 8 and res["by_source_set"] == {"rank1-adapter": 2, "rank1-mlp-neurons": 3, "rank1-sae": 3}
    assert validate(out) > 8
    srcs = sorted(p.name for p in (out / "tiny-qwen").iterdir())
    assert srcs == ["0-rank1-adapter", "0-rank1-mlp-neurons", "0-rank1-sae", "1-rank1-adapter", "1-rank1-mlp-neurons"]
    d = out / "tiny-qwen" / "0-rank1-sae"
    assert sorted(p.name for p in d.iterdir()) == ["activations", "explanation_scores", "explanations", "features",
                                                   "model.jsonl", "release.jsonl", "source.jsonl", "sourceset.jsonl"]
    feats = _rows(d / "features" / "batch-0.jsonl.gz")
    assert [f["index"] for f in feats] == ["1", "2", "3"] and all(f["layer"] == "0-rank1-sae" for f in feats)
    assert feats[0]["frac_nonzero"] == pytest.approx(0.08) and feats[0]["maxActApprox"] == pytest.approx(5.0 - 0.3 * 7 - 0.1)
    acts = _rows(d / "activations" / "batch-0.jsonl.gz")
    a = next(x for x in acts if x["index"] == "1")
    assert a["tokens"][a["maxValueTokenIndex"]] == " But" and a["values"][4] == a["maxValue"]
    assert len(acts) == 3 * 8  # every stored top context of the three features
    ex = {e["index"]: e for e in _rows(d / "explanations" / "batch-0.jsonl.gz")}
    assert ex["1"]["description"] == "the token 'But'" and "detection 1.000, fuzzing 1.000, simulation" in ex["1"]["notes"]
    sc = _rows(d / "explanation_scores" / "batch-0.jsonl.gz")
    assert {s["explanationScoreTypeName"] for s in sc} == {"rank1_detection", "rank1_fuzz", "rank1_simulation"}
    assert {s["explanationId"] for s in sc} == {e["id"] for e in ex.values()}
    assert json.loads((d / "source.jsonl").read_text())["setName"] == "rank1-sae"
    index = [json.loads(x) for x in (out / "rank1_index.jsonl").read_text().splitlines()]
    assert {(r["source"], r["feature"]) for r in index} == set(SIGNATURE) - {("adapter", "L00_gate_proj"),
                                                                            ("adapter", "L01_o_proj")}
    # the validator catches a wrong type and names file, row and field
    bad = _rows(d / "features" / "batch-0.jsonl.gz")
    bad[1]["frac_nonzero"] = "often"
    (d / "features" / "batch-0.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in bad).encode()))
    with pytest.raises(ExportError, match=r"batch-0.jsonl.gz row 2: field 'frac_nonzero' = 'often'"):
        validate(out)
    assert set(FIELDS["activations"]) >= {"tokens", "values", "maxValue", "maxValueTokenIndex", "minValue"}


def test_export_without_explanations_names_what_is_missing(tiny_cfg, tmp_path, keys, capsys):  # noqa: F811
    from ray_jobs import autointerp

    with FakeLLMServer() as srv:
        cfg = _cfg(tiny_cfg, tmp_path, srv)
        run = Path(cfg.run.dir)
        write_topk(run)
        # no autointerp stage yet
        with pytest.raises(ExportError, match=r"'autointerp' stage .* has not finished"):
            export_neuronpedia(str(run), tmp_path / "np")
        srv.rules.append(["<neuron_activations>", "malformed", 99])  # no explanation parses
        autointerp.run(cfg)
    assert pq.read_table(run / "autointerp" / "explanations.parquet").column("explanation").null_count == 9
    assert export_main(["neuronpedia", "--run", str(run), str(tmp_path / "np")]) == 2
    assert "no explained feature" in capsys.readouterr().err
    assert not (tmp_path / "np").exists() and not list(tmp_path.glob(".np.tmp-*"))
