-- feature_stats: per-feature statistics over every token of the run.
-- Values a sparse source does not store count as zeros: n_tokens comes from `tokens`.
--
-- views:  doc_summary(feature, doc_id, n, sum, sumsq, hi, lo, n_active)  (doc_summary.sql)
--         tokens(doc_id, pos, ...)  every token the features were measured on
-- params: $source  the features' source ('adapter', 'neuron' or 'sae')
-- output: source VARCHAR, feature VARCHAR, n_tokens BIGINT, mean DOUBLE, std DOUBLE (population),
--         min DOUBLE, max DOUBLE, frac_active DOUBLE (share of tokens above the threshold
--         doc_summary was computed with, which is >= 0, so unstored zeros are inactive)
WITH total AS (
    SELECT count(*) AS n_tokens FROM tokens
),
per_feature AS (
    SELECT
        feature,
        sum(n) AS n_stored,
        sum(sum) AS s,
        sum(sumsq) AS ss,
        max(hi) AS hi,
        min(lo) AS lo,
        sum(n_active) AS n_active
    FROM doc_summary
    GROUP BY feature
),
final AS (
    SELECT
        $source::VARCHAR AS source,
        p.feature,
        t.n_tokens,
        p.s / t.n_tokens AS mean,
        sqrt(greatest(p.ss / t.n_tokens - (p.s / t.n_tokens) ** 2, 0.0)) AS std,
        CASE WHEN p.n_stored < t.n_tokens THEN least(p.lo, 0.0) ELSE p.lo END::DOUBLE AS min,
        CASE WHEN p.n_stored < t.n_tokens THEN greatest(p.hi, 0.0) ELSE p.hi END::DOUBLE AS max,
        p.n_active / t.n_tokens AS frac_active
    FROM per_feature AS p CROSS JOIN total AS t
)
SELECT * FROM final ORDER BY feature
