"""Each SQL file of queries/ against a small Parquet fixture whose answers are worked out by hand,
and the view registry of rank1_core/sql.py.

The fixture (3 documents, 12 tokens), dense features A and B, sparse SAE features 3 and 7:

    doc 0  pos 0..4  tokens 10..14   A = 1, 5, -2, 3, 0.5     B = -1, -1, -1, -1, -1
    doc 1  pos 0..3  tokens 20..23   A = 4, -6, 2, -1         B = -3, 2, -0.5, -4
    doc 2  pos 0..2  tokens 30..32   A = 0.1, 0.2, 0.3        B = 0, 0, 0
    SAE (doc, pos, feature, value): (0,1,3,2) (0,3,3,1) (1,0,3,5) (1,2,7,0.5) (2,1,3,0.25)
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core import sql as S
from rank1_core import topk as T
from rank1_core.rundir import RunDir

DOCS = {0: 5, 1: 4, 2: 3}
A_VALS = {0: [1, 5, -2, 3, 0.5], 1: [4, -6, 2, -1], 2: [0.1, 0.2, 0.3]}
B_VALS = {0: [-1] * 5, 1: [-3, 2, -0.5, -4], 2: [0, 0, 0]}
SAE = [(0, 1, 3, 2.0), (0, 3, 3, 1.0), (1, 0, 3, 5.0), (1, 2, 7, 0.5), (2, 1, 3, 0.25)]


def write_fixture(run_dir, names=("A", "B")) -> RunDir:
    """extract/{activations,tokens}, components.parquet and sae/features as the stages write them
    (`names`: the column names of the dense features A and B)."""
    run = RunDir(str(run_dir))
    ex, sae = run.stage("extract"), run.stage("sae")
    for d in (ex.path("activations"), ex.path("tokens"), sae.path("features")):
        ex.fs.create_dir(d, recursive=True)
    for doc, n in DOCS.items():  # one file per document, as batches would be
        base = {"doc_id": pa.array([doc] * n, pa.int64()), "pos": pa.array(range(n), pa.int32())}
        tok = pa.array([10 * (doc + 1) + i for i in range(n)], pa.int32())
        pq.write_table(pa.table({**base, "token_id": tok, names[0]: pa.array(A_VALS[doc], pa.float32()),
                                 names[1]: pa.array(B_VALS[doc], pa.float32())}), ex.path("activations", f"part-{doc}.parquet"))
        pq.write_table(pa.table({**base, "token_id": tok, "token": [f"t{t}" for t in tok.to_pylist()],
                                 "split": ["train"] * n}), ex.path("tokens", f"part-{doc}.parquet"))
    pq.write_table(pa.table({"component_id": pa.array([0, 1], pa.int32()), "column": list(names),
                             "layer": pa.array([0, 0], pa.int32()), "module": ["q_proj", "k_proj"],
                             "kind": ["attn", "attn"], "a_norm": [1.0, 2.0], "b_norm": [0.5, 0.25]}),
                   ex.path("components.parquet"))
    pq.write_table(pa.table({"doc_id": pa.array([r[0] for r in SAE], pa.int64()),
                             "pos": pa.array([r[1] for r in SAE], pa.int32()),
                             "feature": pa.array([r[2] for r in SAE], pa.int32()),
                             "value": pa.array([r[3] for r in SAE], pa.float32())}),
                   sae.path("features", "part-00000.parquet"))
    return run


@pytest.fixture
def con(tmp_path):
    run = write_fixture(tmp_path / "run")
    c = S.connect(run)
    yield c
    c.close()


def use_source(con, source: T.Source, features=None, threshold=0.0):
    con.execute(f"CREATE OR REPLACE TEMP VIEW feature_values AS {T.feature_values_sql(source, features)}")
    S.insert_query(con, "doc_summary", "doc_summary", {"threshold": threshold}, create=True)


DENSE = T.Source("adapter", "activations", "wide", ["A", "B"])
SPARSE = T.Source("sae", "sae_features", "sparse")


def rows(rel):
    return rel.to_arrow_table().to_pylist()


# --------------------------------------------------------------------------- views


def test_views_registered_only_when_present(tmp_path):
    run = write_fixture(tmp_path / "run")
    con = S.connect(None)
    got = S.register_views(con, run)
    assert got == {"activations": 3, "tokens": 3, "components": 1, "sae_features": 1}
    assert con.execute("SELECT count(*) FROM activations").fetchone() == (12,)
    for name in ("neurons", "contexts", "explanations", "kl_layers", "eval_samples"):
        assert name in S.VIEWS and name not in got
    with pytest.raises(Exception, match="contexts"):
        con.execute("SELECT * FROM contexts")


def test_views_through_pyarrow_filesystem(tmp_path):
    """Non-local run directories are read through pyarrow datasets (here: a local path
    reached through a SubTreeFileSystem, which is not LocalFileSystem)."""
    import pyarrow.fs as pafs

    write_fixture(tmp_path / "run")
    run = RunDir(str(tmp_path))
    run.fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    run.root = "run"
    con = S.connect(None)
    assert "activations" in S.register_views(con, run)
    assert con.execute("SELECT sum(A)::DOUBLE FROM activations").fetchone()[0] == pytest.approx(7.1, abs=1e-5)


def test_query_params():
    sql = "-- uses $nothing here\nSELECT '$not_a_param', $k + $k, $before FROM t"
    assert S.query_params(sql) == ["k", "before"]
    assert S.bind(sql, {"k": 1, "before": 2, "extra": 3}) == {"k": 1, "before": 2}
    with pytest.raises(S.QueryError, match=r"missing parameter\(s\) \$before"):
        S.bind(sql, {"k": 1})
    with pytest.raises(S.QueryError, match="no query 'nope'"):
        S.load_query("nope")


def test_every_query_file_has_its_header():
    for p in sorted(S.QUERIES_DIR.glob("*.sql")):
        text = p.read_text()
        assert text.startswith(f"-- {p.stem}:"), p.name
        for word in ("-- views:", "-- params:", "-- output:"):
            assert word in text, f"{p.name} lacks '{word}'"
        assert "final AS (" in text and text.rstrip().splitlines()[-1].startswith("SELECT * FROM final"), p.name
        assert len(duckdb.connect().extract_statements(text)) == 1, f"{p.name}: one statement"


# --------------------------------------------------------------------------- doc_summary


def test_doc_summary(con):
    use_source(con, DENSE, ["A"])
    got = {r["doc_id"]: r for r in rows(con.sql("SELECT * FROM doc_summary"))}
    assert got[0] == {"feature": "A", "doc_id": 0, "n": 5, "sum": 7.5, "sumsq": 39.25, "hi": 5.0, "lo": -2.0,
                      "n_active": 4}
    assert got[1]["sum"] == -1.0 and got[1]["sumsq"] == 57.0 and got[1]["n_active"] == 2
    assert got[2]["n"] == 3 and got[2]["hi"] == pytest.approx(0.3) and got[2]["n_active"] == 3
    use_source(con, DENSE, ["A"], threshold=2.5)  # active = above 2.5
    assert {r["doc_id"]: r["n_active"] for r in rows(con.sql("SELECT * FROM doc_summary"))} == {0: 2, 1: 1, 2: 0}


# --------------------------------------------------------------------------- feature_stats


def test_feature_stats_dense(con):
    use_source(con, DENSE)  # both columns in one pass (the UNPIVOT view)
    got = {r["feature"]: r for r in rows(S.run_query(con, "feature_stats", {"source": "adapter"}))}
    a = np.array([1, 5, -2, 3, 0.5, 4, -6, 2, -1, 0.1, 0.2, 0.3])
    assert got["A"]["source"] == "adapter" and got["A"]["n_tokens"] == 12
    assert got["A"]["mean"] == pytest.approx(7.1 / 12)
    assert got["A"]["std"] == pytest.approx(a.std(), rel=1e-6)
    assert (got["A"]["min"], got["A"]["max"]) == (-6.0, 5.0)
    assert got["A"]["frac_active"] == pytest.approx(9 / 12)
    assert got["B"]["mean"] == pytest.approx(-10.5 / 12) and got["B"]["max"] == 2.0
    assert got["B"]["frac_active"] == pytest.approx(1 / 12)


def test_feature_stats_sparse_counts_zeros(con):
    use_source(con, SPARSE)
    got = {r["feature"]: r for r in rows(S.run_query(con, "feature_stats", {"source": "sae"}))}
    assert sorted(got) == ["F00003", "F00007"]
    f3 = got["F00003"]
    full = np.zeros(12)
    full[:4] = [2, 1, 5, 0.25]  # the other 8 tokens are zeros
    assert f3["n_tokens"] == 12 and f3["mean"] == pytest.approx(8.25 / 12)
    assert f3["std"] == pytest.approx(full.std(), rel=1e-6)
    assert (f3["min"], f3["max"]) == (0.0, 5.0)
    assert f3["frac_active"] == pytest.approx(4 / 12)
    assert got["F00007"]["frac_active"] == pytest.approx(1 / 12)


# --------------------------------------------------------------------------- topk_hits


def hits(con, k, cap, before=1, after=1):
    p = {"k": k, "max_per_doc": cap, "before": before, "after": after}
    return [(r["feature"], r["sign"], r["rank"], r["doc_id"], r["pos"], r["value"], r["window_pos"], r["window_values"])
            for r in rows(S.run_query(con, "topk_hits", p))]


def test_topk_hits_k2_one_per_doc(con):
    use_source(con, DENSE)
    assert hits(con, k=2, cap=1) == [
        ("A", "neg", 1, 1, 1, -6.0, [0, 1, 2], [4.0, -6.0, 2.0]),
        ("A", "neg", 2, 0, 2, -2.0, [1, 2, 3], [5.0, -2.0, 3.0]),
        ("A", "pos", 1, 0, 1, 5.0, [0, 1, 2], [1.0, 5.0, -2.0]),
        ("A", "pos", 2, 1, 0, 4.0, [0, 1], [4.0, -6.0]),          # window cut at the document start
        ("B", "neg", 1, 1, 3, -4.0, [2, 3], [-0.5, -4.0]),         # ...and at its end
        ("B", "neg", 2, 0, 0, -1.0, [0, 1], [-1.0, -1.0]),         # ties: the earliest position
        ("B", "pos", 1, 1, 1, 2.0, [0, 1, 2], [-3.0, 2.0, -0.5]),  # only one positive value exists
    ]


def test_topk_hits_cap_two_per_doc(con):
    use_source(con, DENSE, ["A"])
    got = [(s, r, d, p, v) for _, s, r, d, p, v, _, _ in hits(con, k=3, cap=2, before=0, after=0)]
    assert got == [("neg", 1, 1, 1, -6.0), ("neg", 2, 0, 2, -2.0), ("neg", 3, 1, 3, -1.0),
                   ("pos", 1, 0, 1, 5.0), ("pos", 2, 1, 0, 4.0), ("pos", 3, 0, 3, 3.0)]
    # with one per document the third positive hit comes from doc 2, the only one left
    got = [(s, r, d, p) for _, s, r, d, p, _, _, _ in hits(con, k=3, cap=1, before=0, after=0) if s == "pos"]
    assert got == [("pos", 1, 0, 1), ("pos", 2, 1, 0), ("pos", 3, 2, 2)]


def test_topk_hits_sparse(con):
    use_source(con, SPARSE)
    assert hits(con, k=2, cap=1) == [
        ("F00003", "pos", 1, 1, 0, 5.0, [0], [5.0]),       # sparse: only stored values in the window
        ("F00003", "pos", 2, 0, 1, 2.0, [1], [2.0]),
        ("F00007", "pos", 1, 1, 2, 0.5, [2], [0.5]),
    ]
    got = hits(con, k=2, cap=2, before=2, after=2)
    assert got[1][:6] == ("F00003", "pos", 2, 0, 1, 2.0) and got[1][6:] == ([1, 3], [2.0, 1.0])


def reference_hits(doc: np.ndarray, pos: np.ndarray, val: np.ndarray, k: int, cap: int) -> dict[str, list]:
    """The definition, in NumPy, for one feature's stored values: per sign, order by strength
    (ties: lower doc_id, then lower pos), keep a value unless its document already gave `cap`,
    stop at `k`. Returns {sign: [(doc_id, pos, value), ...]}."""
    out = {}
    for sign, s in (("pos", 1.0), ("neg", -1.0)):
        strength = s * val
        keep = strength > 0
        d, p, v, st = doc[keep], pos[keep], val[keep], strength[keep]
        order = np.lexsort((p, d, -st))  # last key first: strength desc, then doc, then pos
        d, p, v = d[order], p[order], v[order]
        # rank of each value within its document along that order: 0, 1, 2... per doc
        first = {}
        nth = np.empty(len(d), dtype=np.int64)
        for i, x in enumerate(d):
            nth[i] = first.get(x, 0)
            first[x] = nth[i] + 1
        sel = np.flatnonzero(nth < cap)[:k]
        out[sign] = [(int(d[i]), int(p[i]), float(v[i])) for i in sel]
    return out


def check_against_reference(con, table: pa.Table, features: dict, k: int, cap: int) -> int:
    """topk_hits over `feature_values` against reference_hits for every feature in `features`
    (name -> boolean mask of its rows in `table`); returns the number of hits compared."""
    got = {}
    for f, s, _, d, p, v, _, _ in hits(con, k=k, cap=cap, before=0, after=0):
        got.setdefault((f, s), []).append((d, p, v))
    doc = table.column("doc_id").to_numpy()
    pos = table.column("pos").to_numpy()
    val = table.column("value").to_numpy()
    n = 0
    for name, mask in features.items():
        expect = reference_hits(doc[mask], pos[mask], val[mask], k, cap)
        for sign in ("pos", "neg"):
            assert got.get((name, sign), []) == expect[sign], (name, sign, k, cap)
            n += len(expect[sign])
    return n


def test_topk_hits_match_reference_on_random_dense_data():
    """Random documents of random lengths: the threshold pruning never loses a hit (also with
    fewer documents than k, and with ties from values on a coarse grid)."""
    rng = np.random.default_rng(7)
    for n_docs, grid in ((25, False), (6, False), (25, True)):
        lengths = rng.integers(1, 40, size=n_docs)
        x = np.concatenate([rng.standard_normal(n) * rng.uniform(0.1, 3) for n in lengths]).astype(np.float32)
        if grid:
            x = np.round(x).astype(np.float32)  # many exact ties, and zeros (no hit)
        t = pa.table({"doc_id": pa.array(np.repeat(np.arange(n_docs), lengths), pa.int64()),
                      "pos": pa.array(np.concatenate([np.arange(n) for n in lengths]), pa.int32()),
                      "X": pa.array(x, pa.float32())})
        con = S.connect(None)
        con.register("vals", t)
        use_source(con, T.Source("adapter", "vals", "wide", ["X"]))
        long = pa.table({"doc_id": t["doc_id"], "pos": t["pos"], "value": t["X"]})
        for k, cap in ((8, 1), (8, 3), (20, 2), (200, 50)):
            assert check_against_reference(con, long, {"X": np.ones(len(x), bool)}, k, cap) > 0
        con.close()


def test_topk_hits_match_reference_on_very_sparse_data():
    """SAE-like features: most fire in a handful of documents (fewer than k), some a few times
    in one document, values tied; both signs. The list of a rare feature holds every hit the
    cap allows, not only the documents' maxima."""
    rng = np.random.default_rng(11)
    n_feat, n_docs, doc_len = 40, 30, 50
    stored = []
    for f in range(n_feat):
        n_hits = int(rng.choice([1, 2, 3, 5, 12, 40, 400]))  # most features far below k = 8 documents
        docs = rng.choice(rng.integers(1, n_docs + 1), size=n_hits) if f % 3 else rng.integers(0, n_docs, n_hits)
        for d in docs:
            v = float(rng.choice([-2.0, -1.0, -0.5, 0.25, 0.5, 1.0, 2.0])) if f % 2 else float(rng.standard_normal())
            stored.append((int(d), int(rng.integers(0, doc_len)), f, v))
    doc, pos, feat, val = (np.array(c) for c in zip(*stored))
    # one stored value per (doc, pos, feature), as the sae stage writes them
    _, first = np.unique(np.stack([doc, pos, feat]), axis=1, return_index=True)
    doc, pos, feat, val = doc[first], pos[first], feat[first], val[first].astype(np.float32)
    t = pa.table({"doc_id": pa.array(doc, pa.int64()), "pos": pa.array(pos, pa.int32()),
                  "feature": pa.array(feat, pa.int32()), "value": pa.array(val, pa.float32())})
    con = S.connect(None)
    con.register("sparse_vals", t)
    use_source(con, T.Source("sae", "sparse_vals", "sparse"))
    features = {f"F{f:05d}": feat == f for f in np.unique(feat)}
    for k, cap in ((8, 2), (8, 1), (3, 4), (64, 4)):
        assert check_against_reference(con, t, features, k, cap) > 0
    con.close()


def test_topk_hits_rare_feature_keeps_second_hit_in_a_listed_document():
    """The issue's case: k=8, at most 2 per document, a feature firing in 2 documents. The
    third-best hit (a second hit of an already listed document) was dropped because the
    threshold was the weaker document's maximum."""
    t = pa.table({"doc_id": pa.array([12, 12, 47, 47, 47], pa.int64()), "pos": pa.array([3, 9, 86, 90, 91], pa.int32()),
                  "feature": pa.array([83] * 5, pa.int32()),
                  "value": pa.array([0.9, 0.1, 0.7263, 0.8, 0.75], pa.float32())})
    con = S.connect(None)
    con.register("sparse_vals", t)
    use_source(con, T.Source("sae", "sparse_vals", "sparse"))
    got = [(d, p) for _, s, _, d, p, _, _, _ in hits(con, k=8, cap=2, before=0, after=0) if s == "pos"]
    assert got == [(12, 3), (47, 90), (47, 91), (12, 9)]
    con.close()


# --------------------------------------------------------------------------- topk_contexts


def contexts(con, source="adapter", k=2, cap=1, before=1, after=1):
    p = {"k": k, "max_per_doc": cap, "before": before, "after": after, "source": source}
    S.insert_query(con, "hits", "topk_hits", p, create=True)
    return rows(S.run_query(con, "topk_contexts", p))


def test_topk_contexts_dense(con):
    use_source(con, DENSE)
    got = {(r["feature"], r["sign"], r["rank"]): r for r in contexts(con)}
    assert len(got) == 7
    r = got[("A", "pos", 2)]
    assert r == {"source": "adapter", "feature": "A", "sign": "pos", "rank": 2, "doc_id": 1, "pos": 0, "value": 4.0,
                 "context_token_ids": [20, 21], "context_tokens": ["t20", "t21"], "context_values": [4.0, -6.0],
                 "hit_index": 0}
    r = got[("B", "neg", 1)]
    assert (r["context_token_ids"], r["context_values"], r["hit_index"]) == ([22, 23], [-0.5, -4.0], 1)
    r = got[("A", "neg", 1)]
    assert (r["context_tokens"], r["context_values"], r["hit_index"]) == (["t20", "t21", "t22"], [4.0, -6.0, 2.0], 1)


def test_topk_contexts_sparse_fills_zeros(con):
    use_source(con, SPARSE)
    got = {(r["feature"], r["rank"]): r for r in contexts(con, source="sae")}
    assert got[("F00003", 1)]["context_token_ids"] == [20, 21]
    assert got[("F00003", 1)]["context_values"] == [5.0, 0.0]
    assert got[("F00003", 2)]["context_token_ids"] == [10, 11, 12]
    assert got[("F00003", 2)]["context_values"] == [0.0, 2.0, 0.0]
    assert got[("F00003", 2)]["hit_index"] == 1
    assert got[("F00007", 1)]["context_values"] == [0.0, 0.5, 0.0] and got[("F00007", 1)]["source"] == "sae"
