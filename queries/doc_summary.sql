-- doc_summary: per feature and document, the sums that topk_hits and feature_stats start from.
-- One scan of the feature's values, grouped by document (a small result: features x documents).
--
-- views:  feature_values(feature VARCHAR, doc_id BIGINT, pos INTEGER, value FLOAT)
--           dense (one row per token: adapter components, neurons) or sparse (only the
--           non-zero values are stored: SAE features)
-- params: $threshold  a value above it counts as active
-- output: feature VARCHAR, doc_id BIGINT,
--         n BIGINT (stored values), sum DOUBLE, sumsq DOUBLE (sum of squares),
--         hi FLOAT (largest stored value), lo FLOAT (smallest stored value),
--         n_active BIGINT (stored values above $threshold)
WITH per_doc AS (
    SELECT
        feature,
        doc_id,
        count(*) AS n,
        sum(value::DOUBLE) AS sum,
        sum(value::DOUBLE * value::DOUBLE) AS sumsq,
        max(value) AS hi,
        min(value) AS lo,
        count_if(value > $threshold)::BIGINT AS n_active
    FROM feature_values
    GROUP BY feature, doc_id
),
final AS (
    SELECT feature, doc_id, n, sum, sumsq, hi, lo, n_active FROM per_doc
)
SELECT * FROM final
