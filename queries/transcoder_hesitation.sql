-- transcoder_hesitation: how many of each feature's top positive contexts are hesitation tokens.
-- A context matches at the hit's token ('token'), at the token after it ('next': the feature
-- fires where the model is about to write the word), or at either. A token's letters,
-- lower-cased, are compared with $words ("  Wait," -> 'wait').
--
-- views:  hits(feature VARCHAR, sign VARCHAR, rank INTEGER, doc_id BIGINT, pos INTEGER, value FLOAT, ...)
--           (topk_hits.sql over the features)
--         tokens(doc_id BIGINT, pos INTEGER, token VARCHAR, ...)
-- params: $contexts  top positive contexts per feature inspected
--         $words     hesitation words, lower-case letters only (VARCHAR[])
--         $match     'token' | 'next' | 'either'
-- output: feature VARCHAR, contexts BIGINT, matches BIGINT, share DOUBLE (matches / contexts),
--         top_tokens VARCHAR[], next_tokens VARCHAR[] (the first five contexts' tokens at the
--         hit and after it, strongest first)
WITH top AS (
    SELECT feature, rank, doc_id, pos
    FROM hits
    WHERE sign = 'pos' AND rank <= $contexts AND value > 0
),
marked AS (
    SELECT
        t.feature,
        t.rank,
        cur.token AS token,
        nxt.token AS next_token,
        list_contains($words::VARCHAR[], regexp_replace(lower(coalesce(cur.token, '')), '[^a-z]', '', 'g')) AS at_token,
        list_contains($words::VARCHAR[], regexp_replace(lower(coalesce(nxt.token, '')), '[^a-z]', '', 'g')) AS at_next
    FROM top AS t
    LEFT JOIN tokens AS cur ON cur.doc_id = t.doc_id AND cur.pos = t.pos
    LEFT JOIN tokens AS nxt ON nxt.doc_id = t.doc_id AND nxt.pos = t.pos + 1
),
counted AS (
    SELECT
        feature,
        count(*) AS contexts,
        count(*) FILTER (WHERE CASE $match WHEN 'token' THEN at_token WHEN 'next' THEN at_next
                                ELSE at_token OR at_next END) AS matches,
        list(token ORDER BY rank)[1:5] AS top_tokens,
        list(coalesce(next_token, '') ORDER BY rank)[1:5] AS next_tokens
    FROM marked
    GROUP BY feature
),
final AS (
    SELECT feature, contexts, matches, matches / contexts AS share, top_tokens, next_tokens
    FROM counted
)
SELECT * FROM final ORDER BY share DESC, matches DESC, feature
