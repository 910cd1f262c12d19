-- concept_after_equals: a SQL-defined concept (stage `concepts`): the first non-blank token
-- after an "=" token (within two tokens), i.e. where a written equation's result begins.
-- Works on any data.
--
-- views:  tokens(doc_id BIGINT, pos INTEGER, token VARCHAR, ...)   (extract/tokens)
-- params: none
-- output: doc_id BIGINT, pos INTEGER (one row per labelled token)
WITH eq AS (
    SELECT doc_id, pos
    FROM tokens
    WHERE trim(token) = '='
),
nxt AS (
    SELECT t.doc_id, t.pos, row_number() OVER (PARTITION BY eq.doc_id, eq.pos ORDER BY t.pos) AS k
    FROM eq
    JOIN tokens AS t ON t.doc_id = eq.doc_id AND t.pos > eq.pos AND t.pos <= eq.pos + 2
    WHERE trim(t.token) <> ''
),
final AS (
    SELECT DISTINCT doc_id::BIGINT AS doc_id, pos::INTEGER AS pos
    FROM nxt
    WHERE k = 1
)
SELECT * FROM final ORDER BY doc_id, pos
