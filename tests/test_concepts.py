"""Ground truth, fast tier (no Ray, no model): planted spans, lexical labels, AUROC by hand and
against the exact rank formula, the histogram error bound, top-k with a per-document cap,
sparse == dense, the controls, explanation keywords, and the one hesitation rule."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core import concepts as K
from rank1_core.config import ConceptsConfig, ConfigError, DataConfig, TaskMix, load_config
from rank1_core.data.synthetic import PLANTED_CONCEPTS, plant, synthetic_traces
from rank1_core.lexicon import HESITATION_WORDS, count_words
from rank1_core.rundir import RunDir, run_stage

# --------------------------------------------------------------------------- planted spans


def test_plant_strips_nested_marks():
    text, spans = plant("⟦hesitation|Wait⟧, ⟦verification|check 2 ⟦operator|+⟧ 3. Yes.⟧")
    assert text == "Wait, check 2 + 3. Yes."
    assert spans == [("hesitation", 0, 4), ("verification", 6, 23), ("operator", 14, 15)]


def test_synthetic_traces_record_their_planted_spans():
    cfg = DataConfig(num_traces=40, heldout_traces=4, hesitation_share=1.0,
                     tasks=[TaskMix(task="chain_sum", config={"min_terms": 3, "max_terms": 3, "min_digits": 1,
                                                              "max_digits": 1})])
    rows = synthetic_traces(cfg, seed=3)
    seen = set()
    for r in rows:
        meta = json.loads(r["metadata"])
        texts = {"thinking": r["deepseek_thinking_trajectory"], "attempt": r["deepseek_attempt"]}
        for s in meta["spans"]:
            piece = texts[s["field"]][s["start"]:s["end"]]
            seen.add(s["concept"])
            if s["concept"] == "hesitation":
                assert piece in HESITATION_WORDS
            elif s["concept"] == "correction":
                assert piece == "that's not right."
            elif s["concept"] == "verification":
                assert piece.startswith("let me double-check")
            elif s["concept"] == "operator":
                assert piece in "+-*/"
            elif s["concept"] in ("slip_value", "step_result", "final_answer"):
                assert piece.lstrip("-").isdigit()
        # the planted hesitations are exactly the lexicon's words in the thinking text
        hes = [s for s in meta["spans"] if s["concept"] == "hesitation"]
        assert len(hes) == count_words(texts["thinking"])
        assert texts["attempt"][[s for s in meta["spans"] if s["field"] == "attempt"][0]["start"]:] == \
            r["solution"] + "."
    assert seen == set(PLANTED_CONCEPTS)


# --------------------------------------------------------------------------- AUROC


def _hist_auroc(x, y, bits=16):
    b = K.value_bins(np.asarray(x, np.float32), bits)
    u, inv = np.unique(b, return_inverse=True)
    zero = int(np.searchsorted(u, K.zero_bin(bits)))
    zero = zero if zero < len(u) and u[zero] == K.zero_bin(bits) else -1
    auc, bound = K.auroc_from_counts(np.bincount(inv), np.bincount(inv[np.asarray(y, bool)], minlength=len(u)), zero)
    return float(auc[0]), float(bound[0])


def test_auroc_by_hand():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 1 + 0 + 1 + 1 = 3 of 4
    assert _hist_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == (0.75, 0.0)
    assert K.exact_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == 0.75
    # a tie counts one half: positives {1, 2} vs negatives {1, 0}: 0.5 + 1 + 1 + 1 = 3.5 of 4
    # (the bound, 0.5 x 1 pair sharing a bin / 4 pairs, cannot tell a tie from two close values)
    assert _hist_auroc([1, 1, 2, 0], [1, 0, 1, 0]) == (0.875, 0.125)
    # -0.0 and 0.0 are one value
    assert _hist_auroc([-0.0, 0.0, 1.0], [1, 0, 1])[0] == 0.75


def test_value_bins_preserve_order():
    x = np.array([-np.inf, -1e30, -2.5, -1.0, -1e-30, 0.0, 1e-30, 1.0, 2.5, 1e30, np.inf], np.float32)
    b = K.value_bins(x, 24)
    assert (np.diff(b) > 0).all()


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_histogram_auroc_within_its_bound_of_the_exact_one(bits):
    rng = np.random.default_rng(bits)
    n = 5000
    x = np.where(rng.random(n) < 0.4, 0.0, rng.normal(size=n)).astype(np.float32)  # zeros: real ties
    y = (rng.random(n) < 0.1) | (x > 1.0)
    auc, bound = _hist_auroc(x, y, bits)
    exact = K.exact_auroc(x, y)
    assert abs(auc - exact) <= bound + 1e-12
    if bits == 16:
        assert bound < 2e-3


def test_value_bins_table_matches_the_arithmetic_keys():
    # up to 16 bits a table look-up on the raw high bits; above, arithmetic on the key: one order
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_t(3, 20000) * 10.0 ** rng.integers(-30, 30, 20000), [0.0, -0.0, np.inf, -np.inf]])
    x = x.astype(np.float32)
    k24 = K.value_bins(x, 24)
    for bits in (8, 12, 16):
        kb = K.value_bins(x, bits)
        assert kb.dtype == np.uint16
        np.testing.assert_array_equal(kb.astype(np.int64), k24 >> (24 - bits))
    assert K.value_bins(np.array([-0.0, 0.0], np.float32), 16).tolist() == [K.zero_bin(16)] * 2


def test_top_contexts_from_the_histogram_equal_the_full_sort():
    labels, rng = _labels(n_docs=30, doc_len=100)
    sc = K.Scorer(labels, ConceptsConfig(bootstrap=0, k=16, max_per_doc=2))
    n = labels.index.n
    columns = (rng.normal(size=n),
               np.where(rng.random(n) < 0.97, 0.0, rng.exponential(size=n)),  # mostly zeros: ties everywhere
               np.repeat(rng.normal(size=30), 100))  # one value per document: the cap decides
    for x in columns:
        x = x.astype(np.float32)
        keys = K.value_bins(x, 16)
        hist = np.bincount(keys, minlength=1 << 16)
        codes, shift, key_of = sc._codes(x)  # the scorer's own input: codes in place, the code -> bin table
        d = sc._counts_dense(x)
        cmap = rng.integers(0, K.BLOCK_STRIDE, len(d.nz))
        for signs in (("pos", "neg"), ("neg",)):
            by_bin, no_hists = sc._top_dense(x, keys, hist, signs, depth=4)
            # with the bootstrap's block histograms counted in the same pass: the same contexts,
            # and the histograms of the pass that counts them alone
            by_code, hists = sc._top_dense(x, codes, hist, signs, depth=4, key_of=key_of, shift=shift,
                                           block=sc._block_args(d, cmap, "true", 1))
            assert list(by_bin) == list(signs) and no_hists is None
            for got, alone in zip(hists, sc._block_hists_dense(d, cmap, "true", 1)):
                np.testing.assert_array_equal(got, alone)
            for sign in signs:
                want = K.top_contexts(x if sign == "pos" else -x, sc.doc, 16, 2, depth=4, n_docs=30)
                assert len(want) == 60
                assert by_bin[sign].tolist() == want.tolist() and by_code[sign].tolist() == want.tolist()


def test_top_contexts_caps_per_document():
    values = np.array([9, 8, 7, 6, 5, 4, 3], np.float32)
    docs = np.array([0, 0, 0, 1, 1, 2, 2])
    assert K.top_contexts(values, docs, k=4, cap=2).tolist() == [0, 1, 3, 4]
    assert K.top_contexts(values, docs, k=10, cap=1).tolist() == [0, 3, 5]


# --------------------------------------------------------------------------- scoring


def _labels(n_docs=100, doc_len=100, seed=0):
    rng = np.random.default_rng(seed)
    ix = K.TokenIndex(np.arange(n_docs, dtype=np.int64) * 10, np.arange(0, n_docs * doc_len + 1, doc_len))
    rare = np.sort(rng.choice(ix.n, ix.n // 50, replace=False))
    common = np.sort(rng.choice(ix.n, ix.n // 5, replace=False))
    section = np.flatnonzero(np.arange(ix.n) % doc_len >= 20)
    return K.Labels(ix, [K.Concept("think", "section", "", section), K.Concept("rare", "lexical", "", rare),
                         K.Concept("common", "lexical", "", common)]), rng


def test_a_planted_detector_is_clean_and_its_controls_are_chance():
    labels, rng = _labels()
    cfg = ConceptsConfig(bootstrap=50)
    sc = K.Scorer(labels, cfg)
    rare = labels.concepts[1].tokens
    x = rng.normal(size=labels.index.n).astype(np.float32)
    x[rare] -= 6.0  # fires *negatively* on the concept: found through the negative sign
    fs = sc.score("adapter", "A", x, None, signed=True)
    c = sc.names.index("rare")
    assert fs.best["true"] == (c, "neg")
    assert fs.auroc[("true", "neg")][c] > 0.99 and fs.precision[("true", "neg")][c] == 1.0
    # shuffled labels: the same feature against labels moved inside their documents
    assert abs(fs.auroc[("shuffled", "neg")][c] - 0.5) < 0.1
    table = K.features_table([fs], sc.names, cfg).to_pylist()
    assert [(r["labels"], r["class"]) for r in table] == [("true", "clean"), ("shuffled", "unmatched")]
    auc_reps, prec_reps = fs.reps["true"]
    assert len(auc_reps) == 50 and (auc_reps > 0.98).all() and (prec_reps == 1.0).all()
    # a whole section is scored but never the best concept (concepts.best_excludes)
    y = rng.normal(size=labels.index.n).astype(np.float32)
    y[labels.concepts[0].tokens] += 5
    fs2 = sc.score("neuron", "N", y, None, signed=False)
    assert fs2.auroc[("true", "pos")][0] > 0.99 and fs2.best["true"][0] != 0


def test_sparse_and_dense_scores_agree():
    labels, rng = _labels(seed=1)
    sc = K.Scorer(labels, ConceptsConfig(bootstrap=20))
    x = np.where(rng.random(labels.index.n) < 0.1, rng.exponential(size=labels.index.n), 0).astype(np.float32)
    x[labels.concepts[2].tokens] += 0.5
    t = np.flatnonzero(x)
    dense, sparse = sc.score("sae", "F", x, None, False), sc.score("sae", "F", x[t], t, False)
    for key in dense.auroc:
        np.testing.assert_allclose(dense.auroc[key], sparse.auroc[key])
        np.testing.assert_allclose(dense.precision[key], sparse.precision[key])
    np.testing.assert_allclose(dense.reps["true"][0], sparse.reps["true"][0])
    truth = np.isin(np.arange(labels.index.n), labels.concepts[2].tokens)
    assert abs(dense.auroc[("true", "pos")][2] - K.exact_auroc(x, truth)) <= dense.bound[("true", "pos")][2] + 1e-9


def _reference_counts(x, member, bits=16):
    """Independent per-bin counts: every token's bin from its float32 bit pattern by plain
    arithmetic (sign flip for negatives, -0.0 as +0.0), then np.unique; member [n, C] bool."""
    u = np.asarray(x, np.float32).copy()
    u[u == 0] = 0.0  # -0.0 -> +0.0 (the denormals of its bin do not occur below)
    raw = u.view(np.uint32).astype(np.int64)
    key = np.where(raw >= 1 << 31, (1 << 32) - 1 - raw, raw + (1 << 31)) >> (32 - bits)
    bins, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv)
    pos = np.stack([np.bincount(inv[member[:, j]], minlength=len(bins)) for j in range(member.shape[1])], 1)
    z = np.flatnonzero(bins == (1 << (bits - 1)))
    return total, pos, int(z[0]) if len(z) else -1


def test_bitmask_labels_and_kernel_counts_match_an_independent_reference():
    # 20 concepts: the per-token mask is uint32 (uint16 up to 16); the scores equal per-bin
    # counts computed from scratch here
    rng = np.random.default_rng(7)
    n_docs, doc_len = 40, 150
    ix = K.TokenIndex(np.arange(n_docs, dtype=np.int64), np.arange(0, n_docs * doc_len + 1, doc_len))
    n = ix.n
    concepts = [K.Concept(f"c{j}", "lexical", "", np.sort(rng.choice(n, int(n * s), replace=False)))
                for j, s in enumerate(np.geomspace(0.003, 0.8, 20))]
    labels = K.Labels(ix, concepts)
    assert labels.mask(concepts).dtype == np.uint32 and labels.mask(concepts[:16]).dtype == np.uint16
    x = np.where(rng.random(n) < 0.2, 0.0, rng.standard_t(3, n)).astype(np.float32)
    x[::11] = -0.0
    x[concepts[3].tokens] += 2.0
    cfg = ConceptsConfig(bootstrap=30, k=16)
    sc = K.Scorer(labels, cfg)
    fs = sc.score("adapter", "A", x, None, True)
    member = np.zeros((n, 20), bool)
    for j, c in enumerate(concepts):
        member[c.tokens, j] = True
    total, pos, zero = _reference_counts(x, member)
    auc, bound = K.auroc_from_counts(total, pos, zero)
    np.testing.assert_array_equal(fs.auroc[("true", "pos")], auc)
    np.testing.assert_array_equal(fs.bound[("true", "pos")], bound)
    np.testing.assert_array_equal(fs.auroc[("true", "neg")], 1.0 - auc)
    # shuffled labels: each document's labels moved inside it (same counts per document)
    shuf = K.mask_bits(sc.mask["shuffled"], 20).astype(bool)
    np.testing.assert_array_equal(shuf.reshape(n_docs, doc_len, 20).sum(1), member.reshape(n_docs, doc_len, 20).sum(1))
    auc_s, _ = K.auroc_from_counts(*_reference_counts(x, shuf)[:2], zero)
    np.testing.assert_array_equal(fs.auroc[("shuffled", "pos")], auc_s)
    # precision from the top contexts: the first k of the full sort (at most 4 per document)
    top = K.top_contexts(x, ix.doc_of_token(), 16, 4)
    np.testing.assert_array_equal(fs.precision[("true", "pos")], member[top].mean(0))
    assert len(fs.reps["true"][0]) == 30
    with pytest.raises(K.ConceptError, match="at most 64"):
        K.mask_dtype(65)


def _numpy_dense_counts(sc, x):
    """The NumPy counting the kernel replaced: a bincount over the codes of each concept's
    tokens (of its complement's when it covers more than half), per labels kind; then summed
    per bin. Returns (bins, all tokens per bin, {labels: concept tokens per bin})."""
    raw, shift, key_of = sc._codes(x)
    codes = raw >> shift
    present, inv = np.unique(codes, return_inverse=True)
    hc = np.bincount(inv)
    bins, binv = np.unique(key_of[present], return_inverse=True)
    per_bin = lambda h: np.bincount(binv, weights=h, minlength=len(bins))  # noqa: E731
    out = {}
    for lab in K.LABEL_KINDS:
        bits = K.mask_bits(sc.mask[lab], sc.C).astype(bool)
        cols = []
        for j in range(sc.C):
            if 2 * bits[:, j].sum() > sc.n:
                cols.append(per_bin(hc - np.bincount(inv[~bits[:, j]], minlength=len(present))))
            else:
                cols.append(per_bin(np.bincount(inv[bits[:, j]], minlength=len(present))))
        out[lab] = np.stack(cols, 1) if cols else np.zeros((len(bins), 0))
    return codes, bins, per_bin(hc), out


@pytest.mark.parametrize("n_concepts", [1, 16, 17, 33])
@pytest.mark.parametrize("bits", [12, 16, 20])
def test_counting_kernel_equals_numpy_bincounts(n_concepts, bits):
    # ties, -0.0, NaN (a bin of its own above +inf), an all-zero stretch, concepts from 0.1% to
    # 90% of the tokens (the largest counted through their complement in the NumPy reference);
    # mask uint16 / uint32 / uint64; codes uint16 / int64
    rng = np.random.default_rng(n_concepts * 100 + bits)
    n_docs, doc_len = 30, 120
    ix = K.TokenIndex(np.arange(n_docs, dtype=np.int64), np.arange(0, n_docs * doc_len + 1, doc_len))
    n = ix.n
    concepts = [K.Concept(f"c{j}", "lexical", "", np.sort(rng.choice(n, max(1, int(n * s)), replace=False)))
                for j, s in enumerate(np.geomspace(0.001, 0.9, n_concepts))]
    sc = K.Scorer(K.Labels(ix, concepts), ConceptsConfig(bootstrap=20, k=16, hist_bits=bits))
    assert sc.mask["true"].dtype == K.mask_dtype(n_concepts)
    for x in (np.round(rng.standard_t(3, n), 1).astype(np.float32), np.zeros(n, np.float32)):
        x[::7] = -0.0
        x[5::97] = np.nan
        x[: n // 5] = 0.0
        d = sc._counts_dense(x)
        codes, bins, total, ref = _numpy_dense_counts(sc, x)
        np.testing.assert_array_equal(d.nz, bins)
        np.testing.assert_array_equal(d.total, total)
        for lab in K.LABEL_KINDS:
            np.testing.assert_array_equal(d.pos[lab], ref[lab])
        # the bootstrap's per-block histograms against one bincount over (block, coarse bin) cells
        cmap = rng.integers(0, K.BLOCK_STRIDE, len(d.nz))
        for c in (0, n_concepts - 1):
            Tg, Pg = sc._block_hists_dense(d, cmap, "true", c)
            cell = sc.block[sc.doc] * K.BLOCK_STRIDE + cmap[d.compact][np.searchsorted(d.code_nz, codes)]
            G = sc.G * K.BLOCK_STRIDE
            np.testing.assert_array_equal(Tg.ravel(), np.bincount(cell, minlength=G))
            np.testing.assert_array_equal(Pg.ravel(), np.bincount(cell[K.mask_bit(sc.mask["true"], c)], minlength=G))


def test_label_lists_hold_at_most_half_the_tokens():
    # a concept over more than half the tokens is listed by its complement (and counted as
    # all tokens minus it); the empty concept and one of every token included
    from rank1_core import concept_kernels as CK

    n = 1000
    rng = np.random.default_rng(3)
    lists = [np.sort(rng.choice(n, m, replace=False)) for m in (0, 10, 500, 501, 990)] + [np.arange(n)]
    flat, offs, comp = CK.label_lists(n, lists)
    assert flat.dtype == np.int32 and comp.tolist() == [False, False, False, True, True, True]
    for j, toks in enumerate(lists):
        got = flat[offs[j]:offs[j + 1]]
        assert len(got) <= n // 2
        np.testing.assert_array_equal(got, np.setdiff1d(np.arange(n), toks) if comp[j] else toks)


def _numpy_auroc(total, pos, zero):
    """auroc_from_counts as NumPy arrays once computed it (the reference of its kernel)."""
    total = np.asarray(total, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64).reshape(len(total), -1)
    neg = total[:, None] - pos
    P, Nn = pos.sum(0), neg.sum(0)
    below = np.cumsum(neg, 0) - neg
    pairs = P * Nn
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(0) / pairs
        tie = pos * neg
        if 0 <= zero < len(total):
            tie[zero] = 0
        bound = 0.5 * tie.sum(0) / pairs
    auc[pairs == 0] = np.nan
    bound[pairs == 0] = np.nan
    return auc, bound


def test_auroc_kernel_equals_the_numpy_formula_bit_for_bit():
    # counts up to ~10M tokens: every sum is of exact half-integers, so the loop's order cannot
    # change a bit; a concept with no token and one with every token give NaN
    rng = np.random.default_rng(11)
    for K_bins, scale in ((1, 5), (7, 3), (3000, 4000)):
        total = rng.integers(0, scale, K_bins)
        pos = np.stack([rng.integers(0, total + 1) for _ in range(5)] + [np.zeros(K_bins, np.int64), total], 1)
        for zero in (-1, 0, K_bins // 2, K_bins):
            got, want = K.auroc_from_counts(total, pos, zero), _numpy_auroc(total, pos, zero)
            for g, w in zip(got, want):
                assert g.tobytes() == w.tobytes()
            assert np.isnan(got[0][-2:]).all()


def test_threads_and_reused_buffers_change_no_score():
    # each thread counts into its own buffers, handed back zeroed: columns scored on 2 threads,
    # one after another, or each by a fresh scorer, give the same scores
    labels, rng = _labels(seed=4)
    cfg = ConceptsConfig(bootstrap=20)
    n = labels.index.n
    X = np.stack([rng.normal(size=n), np.where(rng.random(n) < 0.9, 0.0, rng.exponential(size=n)),
                  rng.standard_t(2, n) * 1e3, -np.abs(rng.normal(size=n))] * 2).astype(np.float32)
    X[0, labels.concepts[1].tokens] += 3
    names = [f"A{j}" for j in range(len(X))]
    sc = K.Scorer(labels, cfg)
    runs = [K.score_columns(sc, "adapter", names, X, True, threads=2),
            K.score_columns(sc, "adapter", names, X, True, threads=1),
            [K.Scorer(labels, cfg).score("adapter", names[j], X[j], None, True) for j in range(len(X))]]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            for field in ("auroc", "bound", "precision", "n_top", "best"):
                ga, gb = getattr(a, field), getattr(b, field)
                assert ga.keys() == gb.keys()
                for k in ga:
                    np.testing.assert_array_equal(ga[k], gb[k])
            np.testing.assert_array_equal(a.reps["true"], b.reps["true"])


def test_summary_shares_and_intervals():
    labels, rng = _labels(seed=2)
    cfg = ConceptsConfig(bootstrap=100)
    sc = K.Scorer(labels, cfg)
    scores = []
    for j in range(6):
        x = rng.normal(size=labels.index.n).astype(np.float32)
        if j < 2:
            x[labels.concepts[1].tokens] += 8  # two clean detectors of "rare"
        scores.append(sc.score("adapter", f"A{j}", x, None, True))
    feats = K.features_table(scores, sc.names, cfg)
    s = {(r["source"], r["labels"]): r for r in K.summary_table(scores, feats, ["adapter"], cfg).to_pylist()}
    t = s[("adapter", "true")]
    assert t["n_features"] == 6 and t["clean"] == pytest.approx(2 / 6)
    assert t["clean_lo"] <= t["clean"] <= t["clean_hi"]
    assert s[("adapter", "shuffled")]["clean"] == 0.0
    best = K.best_table(scores, sc.names, ["adapter"]).to_pylist()
    rare = [b for b in best if b["concept"] == "rare"][0]
    assert rare["feature"] in ("A0", "A1") and rare["auroc"] > 0.99 and rare["shuffled_auroc"] < 0.7
    text = K.format_summary(K.summary_table(scores, feats, ["adapter"], cfg), K.best_table(scores, sc.names, ["adapter"]),
                            cfg)
    assert "AUROC >= 0.9" in text and "precision >= 0.8" in text and "rare" in text


def test_random_directions_have_unit_norm():
    u = K.random_directions(210, 16, seed=0)
    assert u.shape == (210, 16)
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0)


def test_projection_threads_change_no_bit():
    # score_wide projects on one BLAS thread: the products must equal the threaded ones bit for
    # bit (BLAS threads split the output, never a sum), else the random directions' AUROCs would
    # depend on the thread count. Large enough for OpenBLAS to use every thread.
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(3)
    A = K.random_directions(48, 16, 0).astype(np.float32).T
    X = rng.standard_t(3, (48, K.PROJECT_CHUNK)).astype(np.float32)
    threads = max([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"], default=1)
    with threadpool_limits(max(2, threads), user_api="blas"):
        many = A @ X
    with threadpool_limits(1, user_api="blas"):
        one = A @ X
    np.testing.assert_array_equal(one, many)


# --------------------------------------------------------------------------- lexical labels on a hand-made run


def _token_run(tmp_path, docs: dict[int, list[str]]) -> RunDir:
    run = RunDir(str(tmp_path / "run"))

    def body(sr):
        sr.stage.fs.create_dir(sr.stage.path("tokens"), recursive=True)
        rows = [(d, p, t) for d, toks in docs.items() for p, t in enumerate(toks)]
        pq.write_table(pa.table({"doc_id": pa.array([r[0] for r in rows], pa.int64()),
                                 "pos": pa.array([r[1] for r in rows], pa.int32()),
                                 "token_id": pa.array([0] * len(rows), pa.int32()),
                                 "token": [r[2] for r in rows], "split": ["train"] * len(rows)}),
                       sr.stage.path("tokens", "part-0.parquet"))

    run_stage(run.stage("extract"), "hand", "", body, log=lambda m: None)
    return run


def test_lexical_labels_exact_token_positions(tmp_path):
    run = _token_run(tmp_path, {7: ["Wait", ",", " wait", "ing", " 3", "4", "\n", "HMM", "."],
                                9: ["x", " =", " 5", " hmm"]})
    cfg = ConceptsConfig(sql=[])
    labels = K.build_labels(run, cfg, log=lambda m: None)
    ix = labels.index
    got = {c.name: [(int(ix.doc_ids[np.searchsorted(ix.starts, t, side="right") - 1]),
                     int(t - ix.starts[np.searchsorted(ix.starts, t, side="right") - 1])) for t in c.tokens]
           for c in labels.concepts}
    assert got["hesitation_word"] == [(7, 0), (7, 7), (9, 3)]  # "waiting" is not a whole word
    assert got["number"] == [(7, 4), (7, 5), (9, 2)]  # "34" spans two tokens
    assert got["newline"] == [(7, 6)]


def test_sql_concept_and_its_bad_positions(tmp_path):
    from rank1_core.config import SQLConcept

    run = _token_run(tmp_path, {1: ["a", " =", " 5", "."], 2: ["b", " =", " 6"]})
    labels = K.build_labels(run, ConceptsConfig(lexical=[]), log=lambda m: None)
    assert [c.name for c in labels.concepts] == ["after_equals"]
    assert labels.concepts[0].tokens.tolist() == [2, 6]
    bad = tmp_path / "concept_outside.sql"
    bad.write_text("SELECT doc_id, pos + 1 AS pos FROM tokens WHERE token = ' 6'\n")
    with pytest.raises(K.ConceptError, match=r"concept_outside\.sql: SQL concept 'outside'.*doc_id 2 pos 3"):
        K.build_labels(run, ConceptsConfig(lexical=[], sql=[SQLConcept(name="outside", query=str(bad))]),
                       log=lambda m: None)
    cols = tmp_path / "concept_cols.sql"
    cols.write_text("SELECT doc_id FROM tokens")
    with pytest.raises(K.ConceptError, match="must return columns doc_id, pos"):
        K.build_labels(run, ConceptsConfig(lexical=[], sql=[SQLConcept(name="cols", query=str(cols))]),
                       log=lambda m: None)


def test_empty_concept_warns_and_is_marked(tmp_path):
    from rank1_core.config import LexicalConcept

    run = _token_run(tmp_path, {1: ["a", " b"]})
    cfg = ConceptsConfig(sql=[], lexical=[LexicalConcept(name="never", words=["zebra"])])
    with pytest.warns(UserWarning, match="concept 'never'.*matches no token"):
        labels = K.build_labels(run, cfg, log=lambda m: None)
    cat = K.catalogue_table(labels).to_pylist()
    assert cat == [{"concept": "never", "kind": "lexical", "definition": "words: zebra", "n_tokens": 0, "n_docs": 0,
                    "share": 0.0, "empty": True}]
    assert labels.scored == []


def test_bad_regex_names_the_concept_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("concepts:\n  lexical:\n    - {name: broken, regex: '(unclosed'}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: concepts\.lexical: concept 'broken': regex .* does not compile"):
        load_config(p)


# --------------------------------------------------------------------------- explanations


def test_explanations_checked_against_the_truth():
    import pandas as pd

    feats = pa.Table.from_pylist([
        {"source": "adapter", "feature": "A", "labels": "true", "concept": "hesitation", "sign": "pos", "auroc": 0.97,
         "auroc_bound": 0.0, "precision": 0.9, "n_top": 64, "class": "clean"},
        {"source": "adapter", "feature": "B", "labels": "true", "concept": "operator", "sign": "pos", "auroc": 0.95,
         "auroc_bound": 0.0, "precision": 0.9, "n_top": 64, "class": "clean"},
        {"source": "adapter", "feature": "C", "labels": "true", "concept": "number", "sign": "pos", "auroc": 0.6,
         "auroc_bound": 0.0, "precision": 0.1, "n_top": 64, "class": "unmatched"},
    ], schema=K.FEATURES_SCHEMA)
    expl = pd.DataFrame({"source": ["adapter"] * 4, "feature": ["A", "B", "C", "A"], "sign": ["pos"] * 4,
                         "explanation": ["the word 'Wait' before a re-check", "Your concise explanation in just a few words",
                                         "digits", "plus signs between numbers"],
                         "model": ["m1", "m1", "m1", "m2"]})
    check = K.explanation_check(expl, feats, ConceptsConfig()).to_pylist()
    assert [(r["feature"], r["model"], r["copied"], r["names_concept"]) for r in check] == [
        ("A", "m1", False, True), ("B", "m1", True, False), ("A", "m2", False, False)]
    acc = {a["model"]: a for a in K.explanation_accuracy(pa.Table.from_pylist(check, schema=K.EXPLAIN_SCHEMA))}
    assert acc["m1"]["accuracy"] == 0.5 and acc["m1"]["copied"] == 1 and acc["m2"]["accuracy"] == 0.0


# --------------------------------------------------------------------------- one hesitation rule


def test_steer_and_transcoder_eval_count_hesitations_with_one_rule():
    from rank1_core.steering import count_hesitations, hesitation_pattern
    from rank1_core.transcoder import count_words as transcoder_count

    cfg = load_config(K.S.QUERIES_DIR.parent / "configs" / "demo.yaml")
    assert cfg.steer.hesitation_tokens == cfg.transcoder_extract.hesitation.words == list(HESITATION_WORDS)
    texts = ["Wait, 2 + 2 = 5. Hmm... wait! Waiting, await, WAIT. HmmWait", "", "x\nWait\nhmm", "no pause here"]
    for text in texts:
        n = count_words(text, HESITATION_WORDS)
        assert count_hesitations(text, HESITATION_WORDS) == n
        assert count_hesitations(text, hesitation_pattern(HESITATION_WORDS)) == n
        assert transcoder_count(text, HESITATION_WORDS) == n
    assert [count_words(t) for t in texts] == [4, 0, 2, 0]
