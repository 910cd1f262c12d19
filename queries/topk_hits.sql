-- topk_hits: the $k strongest activations of each feature for both signs, at most
-- $max_per_doc of them from one document, with the feature's values around each hit.
--
-- The hits are exactly: order the feature's values of one sign by strength (value for 'pos',
-- -value for 'neg'; zero is neither), ties by doc_id then pos; go down that order keeping a
-- value unless its document already gave $max_per_doc hits; stop at $k.
--
-- Pruning (exact): when $k or more documents have values, each of $k of them offers its own
-- maximum as a hit candidate, so no hit lies below t_pos, the $k-th largest per-document
-- maximum (likewise above t_neg for the minimum). With fewer than $k documents the list may
-- never fill, so there is no threshold (t_pos -inf, t_neg +inf): every value of the sign
-- is a candidate. The feature is read a second time only for documents that reach the
-- threshold, and only values beyond it are ranked (no window function over whole documents).
--
-- views:  feature_values(feature VARCHAR, doc_id BIGINT, pos INTEGER, value FLOAT)
--           dense, or sparse (unstored values are zero)
--         doc_summary(feature, doc_id, n, sum, sumsq, hi, lo, n_active)
--           (doc_summary.sql over the same feature_values)
-- params: $k            hits per feature and sign
--         $max_per_doc  most hits per feature, sign and document
--         $before       positions of context before a hit
--         $after        positions of context after a hit
-- output: feature VARCHAR, sign VARCHAR ('pos': largest positive values first,
--         'neg': most negative values first), rank INTEGER (1..$k), doc_id BIGINT,
--         pos INTEGER, value FLOAT,
--         window_pos INTEGER[], window_values FLOAT[]  (the feature's stored values at
--         positions pos-$before .. pos+$after of the document, ascending)
WITH thresholds AS (
    SELECT
        feature,
        -- k-th largest per-document maximum, k-th smallest minimum; no bound below k documents
        CASE WHEN count(hi) >= $k THEN list_last(max(hi, $k)) ELSE '-infinity'::FLOAT END AS t_pos,
        CASE WHEN count(lo) >= $k THEN list_last(min(lo, $k)) ELSE 'infinity'::FLOAT END AS t_neg
    FROM doc_summary
    GROUP BY feature
),
candidate_docs AS (
    SELECT
        s.feature,
        s.doc_id,
        t.t_pos,
        t.t_neg,
        s.hi > 0 AND s.hi >= t.t_pos AS for_pos,
        s.lo < 0 AND s.lo <= t.t_neg AS for_neg
    FROM doc_summary AS s JOIN thresholds AS t USING (feature)
    WHERE (s.hi > 0 AND s.hi >= t.t_pos) OR (s.lo < 0 AND s.lo <= t.t_neg)
),
doc_rows AS MATERIALIZED (
    -- the second (and last) read of the feature: only the candidate documents
    SELECT v.feature, v.doc_id, v.pos, v.value, c.for_pos, c.for_neg, c.t_pos, c.t_neg
    FROM feature_values AS v
    JOIN candidate_docs AS c ON v.feature = c.feature AND v.doc_id = c.doc_id
),
strong AS (
    -- by the same argument no hit lies below t_pos (above t_neg): only these rows can be hits
    SELECT * FROM doc_rows
    WHERE (for_pos AND value > 0 AND value >= t_pos) OR (for_neg AND value < 0 AND value <= t_neg)
),
signed AS (
    SELECT 'pos' AS sign, feature, doc_id, pos, value, value AS strength
    FROM strong WHERE for_pos AND value > 0 AND value >= t_pos
    UNION ALL
    SELECT 'neg' AS sign, feature, doc_id, pos, value, -value AS strength
    FROM strong WHERE for_neg AND value < 0 AND value <= t_neg
),
capped AS (
    SELECT * FROM signed
    QUALIFY row_number() OVER (PARTITION BY feature, sign, doc_id ORDER BY strength DESC, pos) <= $max_per_doc
),
hits AS (
    SELECT
        feature, sign, doc_id, pos, value,
        row_number() OVER (PARTITION BY feature, sign ORDER BY strength DESC, doc_id, pos) AS rank
    FROM capped
    QUALIFY rank <= $k
),
windows AS (
    SELECT
        h.feature, h.sign, h.rank, h.doc_id, h.pos, h.value,
        list(v.pos ORDER BY v.pos) AS window_pos,
        list(v.value ORDER BY v.pos) AS window_values
    FROM hits AS h
    JOIN doc_rows AS v
      ON v.feature = h.feature AND v.doc_id = h.doc_id
     AND v.pos BETWEEN h.pos - $before AND h.pos + $after
    GROUP BY h.feature, h.sign, h.rank, h.doc_id, h.pos, h.value
),
final AS (
    SELECT
        feature, sign, rank::INTEGER AS rank, doc_id, pos::INTEGER AS pos, value::FLOAT AS value,
        window_pos::INTEGER[] AS window_pos, window_values::FLOAT[] AS window_values
    FROM windows
)
SELECT * FROM final ORDER BY feature, sign, rank
