-- topk_contexts: each hit of topk_hits with its window of tokens and the feature's value
-- on every token of the window (zero where a sparse source stores nothing).
-- The window is cut at the document's ends.
--
-- views:  hits(feature, sign, rank, doc_id, pos, value, window_pos, window_values)
--           (rows of topk_hits.sql, for one source)
--         tokens(doc_id BIGINT, pos INTEGER, token_id INTEGER, token VARCHAR, ...)
-- params: $source  the hits' source ('adapter', 'neuron' or 'sae')
--         $before  positions of context before a hit (as in topk_hits)
--         $after   positions of context after a hit (as in topk_hits)
-- output: source VARCHAR, feature VARCHAR, sign VARCHAR, rank INTEGER, doc_id BIGINT,
--         pos INTEGER, value FLOAT, context_token_ids INTEGER[], context_tokens VARCHAR[],
--         context_values FLOAT[], hit_index INTEGER (index of the hit in the window)
WITH window_rows AS (
    SELECT
        feature, sign, rank, doc_id, pos, value, window_pos, window_values,
        unnest(range(pos - $before, pos + $after + 1)) AS wpos
    FROM hits
),
valued AS (
    SELECT
        feature, sign, rank, doc_id, pos, value, wpos::INTEGER AS wpos,
        coalesce(window_values[list_position(window_pos, wpos::INTEGER)], 0.0)::FLOAT AS wvalue
    FROM window_rows
),
joined AS (
    SELECT v.*, t.token_id, t.token
    FROM valued AS v
    JOIN tokens AS t ON t.doc_id = v.doc_id AND t.pos = v.wpos
),
grouped AS (
    SELECT
        feature, sign, rank, doc_id, pos, value,
        list(token_id ORDER BY wpos) AS context_token_ids,
        list(token ORDER BY wpos) AS context_tokens,
        list(wvalue ORDER BY wpos) AS context_values,
        (pos - min(wpos))::INTEGER AS hit_index
    FROM joined
    GROUP BY feature, sign, rank, doc_id, pos, value
),
final AS (
    SELECT
        $source::VARCHAR AS source, feature, sign, rank::INTEGER AS rank, doc_id::BIGINT AS doc_id,
        pos::INTEGER AS pos, value::FLOAT AS value,
        context_token_ids::INTEGER[] AS context_token_ids, context_tokens::VARCHAR[] AS context_tokens,
        context_values::FLOAT[] AS context_values, hit_index
    FROM grouped
)
SELECT * FROM final ORDER BY feature, sign, rank
