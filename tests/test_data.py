"""Loaders (published schemas, bad input), synthetic traces, tokenization and loss masks."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core.config import BenchmarkConfig, DataConfig, ModelConfig, TaskMix
from rank1_core.data.format import prompt_text, tokenize_trace
from rank1_core.data.io import DataError, Skipped
from rank1_core.data.sources import load_benchmark, load_s1k
from rank1_core.data.synthetic import S1K_COLUMNS, expression_steps, question_key, synthetic_traces


def s1k_row(i=0, **kw):
    row = {c: f"{c} {i}" for c in S1K_COLUMNS}
    row["metadata"] = "{}"
    row.update(kw)
    return row


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- synthetic


def test_expression_steps_follow_precedence():
    steps, value = expression_steps("2 + 3 * 4 - -1")
    assert [(a, op, b, str(r)) for a, op, b, r in steps] == [("3", "*", "4", "12"), ("2", "+", "12", "14"),
                                                             ("14", "-", "-1", "15")]
    assert value == 15


def test_synthetic_traces_are_correct_and_marked():
    cfg = DataConfig(num_traces=60, heldout_traces=4, hesitation_share=0.5,
                     tasks=[TaskMix("chain_sum", 1.0, {"min_terms": 3, "max_terms": 3}),
                            TaskMix("basic_arithmetic", 1.0, {})])
    rows = synthetic_traces(cfg, seed=3)
    assert len(rows) == 60
    assert set(rows[0]) == set(S1K_COLUMNS)
    for r in rows:
        assert r["deepseek_attempt"] == f"The answer is {r['solution']}."
    markers = [json.loads(r["metadata"])["markers"] for r in rows]
    marked = sum(bool(m) for m in markers)
    assert 15 <= marked <= 45  # ~half, by design
    text = "\n".join(r["deepseek_thinking_trajectory"] for r in rows)
    assert "Wait," in text and "Hmm," in text
    assert {json.loads(r["metadata"])["task"] for r in rows} == {"chain_sum", "basic_arithmetic"}
    assert synthetic_traces(cfg, seed=3) == rows  # seeded


def test_gsm_symbolic_traces_use_worked_solutions():
    cfg = DataConfig(num_traces=3, heldout_traces=1, hesitation_share=0.0, tasks=[TaskMix("gsm_symbolic", 1.0, {})])
    rows = synthetic_traces(cfg, seed=1)
    assert all(r["solution"] in r["deepseek_thinking_trajectory"] for r in rows)
    assert all("####" not in r["deepseek_thinking_trajectory"] for r in rows)


def test_synthetic_excludes_given_questions():
    cfg = DataConfig(num_traces=40, heldout_traces=4, tasks=[TaskMix("chain_sum", 1.0, {"min_terms": 2, "max_terms": 2,
                                                                                         "min_digits": 1, "max_digits": 1})])
    first = synthetic_traces(cfg, seed=0)
    banned = {question_key(r["question"]) for r in first[:20]}
    again = synthetic_traces(cfg, seed=0, exclude=banned)
    assert not banned & {question_key(r["question"]) for r in again}


def test_unsupported_task_is_named():
    cfg = DataConfig(num_traces=5, heldout_traces=1, tasks=[TaskMix("leg_counting", 1.0, {})])
    with pytest.raises(ValueError, match="'leg_counting' is not supported"):
        synthetic_traces(cfg, seed=0)


# ----------------------------------------------------------------------------- s1K loader


def test_s1k_jsonl_and_parquet(tmp_path):
    rows = [s1k_row(i) for i in range(3)]
    cfg = DataConfig(source="s1k", path=write_jsonl(tmp_path / "s1k.jsonl", rows))
    assert [r["question"] for r in load_s1k(cfg, Skipped())] == ["question 0", "question 1", "question 2"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s1k.parquet")
    cfg = DataConfig(source="s1k", path=str(tmp_path / "s1k.parquet"), num_traces=2)
    assert len(load_s1k(cfg, Skipped())) == 2


@pytest.mark.parametrize("bad,match", [
    ({"deepseek_thinking_trajectory": None}, r"row 2: missing field 'deepseek_thinking_trajectory'"),
    ({"question": 7}, r"row 2: field 'question' should be str, got int"),
    ({"deepseek_attempt": "   "}, r"row 2: field 'deepseek_attempt' is empty"),
])
def test_s1k_bad_rows_error_names_file_and_row(tmp_path, bad, match):
    path = write_jsonl(tmp_path / "s1k.jsonl", [s1k_row(0), s1k_row(1, **bad), s1k_row(2)])
    with pytest.raises(DataError, match=r"s1k\.jsonl: " + match):
        load_s1k(DataConfig(source="s1k", path=path), Skipped())


def test_s1k_missing_schema_column(tmp_path):
    row = s1k_row(0)
    del row["cot_type"]
    path = write_jsonl(tmp_path / "s.jsonl", [row])
    with pytest.raises(DataError, match=r"row 1: missing field\(s\) \['cot_type'\]"):
        load_s1k(DataConfig(source="s1k", path=path), Skipped())


def test_s1k_skip_policy_counts(tmp_path):
    path = write_jsonl(tmp_path / "s1k.jsonl", [s1k_row(0), s1k_row(1, question=""), s1k_row(2)])
    skipped = Skipped()
    rows = load_s1k(DataConfig(source="s1k", path=path, bad_rows="skip"), skipped)
    assert len(rows) == 2 and skipped.total == 1
    assert "row 2" in skipped.examples[0]


def test_bad_utf8_empty_file_and_bad_json(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(json.dumps(s1k_row(0)).encode() + b"\n" + b'{"question": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: not valid UTF-8 \(byte 14 of the row\)"):
        load_s1k(DataConfig(source="s1k", path=str(f)), Skipped())
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        load_s1k(DataConfig(source="s1k", path=str(e)), Skipped())
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps(s1k_row(0)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"j\.jsonl: row 2: not valid JSON"):
        load_s1k(DataConfig(source="s1k", path=str(j)), Skipped())


def jsonl_with_bad_rows(path):
    """3 good rows, then bad UTF-8 (line 4), a blank line, bad JSON (line 6), a list (line 7)."""
    good = [json.dumps(s1k_row(i)).encode() for i in range(3)]
    bad = json.dumps(s1k_row(3)).encode().replace(b"question 3", b"question \xe9\xff")
    path.write_bytes(b"\n".join([*good, bad, b"", b'{"question": ', b"[1, 2]"]) + b"\n")
    return str(path)


def test_skip_policy_skips_rows_that_cannot_be_read(tmp_path):
    """bad_rows: skip applies to a row with invalid UTF-8, invalid JSON or no object, each
    counted; the other rows are read (each line decoded on its own)."""
    path = jsonl_with_bad_rows(tmp_path / "s1k.jsonl")
    skipped = Skipped()
    rows = load_s1k(DataConfig(source="s1k", path=path, bad_rows="skip"), skipped)
    assert [r["question"] for r in rows] == ["question 0", "question 1", "question 2"]
    assert skipped.counts == {"not valid UTF-8": 1, "not valid JSON": 1, "not a JSON object": 1}
    assert [e.split(".jsonl: ")[1] for e in skipped.examples] == [
        "row 4: not valid UTF-8", "row 6: not valid JSON", "row 7: not a JSON object"]
    with pytest.raises(DataError, match=r"s1k\.jsonl: row 4: not valid UTF-8 \(byte 23 of the row\)"):
        load_s1k(DataConfig(source="s1k", path=path), Skipped())


def test_skip_policy_on_json_csv_and_parquet_with_bad_utf8(tmp_path):
    """A JSON list, a CSV file and a Parquet string cell holding bytes that are not UTF-8: the
    row is skipped and counted, or named in the error."""
    rows = [s1k_row(i) for i in range(3)]
    text = json.dumps(rows).encode()
    (tmp_path / "s.json").write_bytes(text.replace(b"question 1", b"question \xff"))
    header = ",".join(S1K_COLUMNS).encode()
    lines = [",".join(json.dumps(r[c]) for c in S1K_COLUMNS).encode() for r in rows]
    lines[2] = lines[2].replace(b"question 2", b"question \xc3(")
    (tmp_path / "s.csv").write_bytes(b"\n".join([header, *lines]) + b"\n")
    table = pa.Table.from_pylist(rows)
    raw = pa.array([r["question"].encode() for r in rows[:2]] + [b"\xff"], pa.binary())
    table = table.set_column(table.column_names.index("question"), "question", raw.view(pa.string()))
    pq.write_table(table, tmp_path / "s.parquet")
    for name, bad_row, match in (("s.json", 2, r"s\.json: row 2: field 'question' is not valid UTF-8"),
                                 ("s.csv", 3, r"s\.csv: row 3: field 'question' is not valid UTF-8"),
                                 ("s.parquet", 3, r"s\.parquet: row 3: column 'question' is not valid UTF-8")):
        path = str(tmp_path / name)
        skipped = Skipped()
        got = load_s1k(DataConfig(source="s1k", path=path, bad_rows="skip"), skipped)
        assert [r["question"] for r in got] == [f"question {i}" for i in range(3) if i != bad_row - 1], name
        assert skipped.counts == {"not valid UTF-8": 1} and f"row {bad_row}" in skipped.examples[0], name
        with pytest.raises(DataError, match=match):
            load_s1k(DataConfig(source="s1k", path=path), Skipped())
    # a file that cannot be split into rows stops under either policy, naming the file
    (tmp_path / "x.json").write_bytes(b'[{"question": 1}, \xff]')
    with pytest.raises(DataError, match=r"x\.json: not valid JSON"):
        load_s1k(DataConfig(source="s1k", path=str(tmp_path / "x.json"), bad_rows="skip"), Skipped())


def test_prepare_manifest_counts_a_skipped_bad_utf8_row(tiny_cfg, tmp_path):
    import json as _json

    from ray_jobs import prepare

    path = jsonl_with_bad_rows(tmp_path / "s1k.jsonl")
    cfg = tiny_cfg("data.source=s1k", f"data.path={path}", "data.bad_rows=skip", "data.heldout_traces=1")
    prepare.run(cfg)
    m = _json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())
    assert m["extra"]["skipped_rows"] == {"not valid UTF-8": 1, "not valid JSON": 1, "not a JSON object": 1}
    assert m["rows"]["traces"] == 3


def test_missing_file_and_unknown_hub_id_offline(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        load_s1k(DataConfig(source="s1k", path=str(tmp_path / "nope.jsonl")), Skipped())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="huggingface-cli download --repo-type dataset someone/s1K-x"):
        load_s1k(DataConfig(source="s1k", path="someone/s1K-x"), Skipped())


# ----------------------------------------------------------------------------- benchmarks


def test_math500_aime_gpqa_schemas(tmp_path):
    m = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "1+1?", "solution": "2", "answer": "2", "subject": "Algebra", "level": 1, "unique_id": "a/1"}])
    rows = load_benchmark(BenchmarkConfig("MATH500", "math500", m), 0, Skipped())
    assert rows == [{"problem_id": "a/1", "question": "1+1?", "answer": "2", "kind": "math", "choices": [],
                     "source": "math500"}]
    a = write_jsonl(tmp_path / "aime.jsonl", [{"id": 60, "problem": "p", "solution": "s", "answer": 204, "url": "u"}])
    assert load_benchmark(BenchmarkConfig("AIME", "aime24", a), 0, Skipped())[0]["answer"] == "204"
    g = tmp_path / "gpqa.csv"
    g.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3,Record ID\n"
                 "What?,right,w1,w2,w3,rec1\nWhy?,yes,n1,n2,n3,rec2\n")
    r1 = load_benchmark(BenchmarkConfig("GPQA", "gpqa_diamond", str(g)), 0, Skipped())
    r2 = load_benchmark(BenchmarkConfig("GPQA", "gpqa_diamond", str(g)), 0, Skipped())
    assert r1 == r2  # fixed seed
    for r in r1:
        assert r["kind"] == "mc" and len(r["choices"]) == 4
        correct = r["choices"]["ABCD".index(r["answer"])]
        assert correct in ("right", "yes")
        assert f"{r['answer']}) {correct}" in r["question"]


def test_gpqa_missing_column(tmp_path):
    g = tmp_path / "gpqa.csv"
    g.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2\nWhat?,right,w1,w2\n")
    with pytest.raises(DataError, match=r"gpqa\.csv: row 1: missing field 'Incorrect Answer 3'"):
        load_benchmark(BenchmarkConfig("GPQA", "gpqa_diamond", str(g)), 0, Skipped())


def test_synthetic_benchmark_exact_size_and_seeded():
    b = BenchmarkConfig("h", "synthetic", task="chain_sum", size=50,
                        task_config={"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1})
    rows = load_benchmark(b, 0, Skipped())
    assert len(rows) == 50 == len({r["question"] for r in rows})
    assert rows == load_benchmark(b, 0, Skipped())


# ----------------------------------------------------------------------------- tokenization


def test_loss_mask_covers_exactly_the_assistant_turn(tiny_model_dir):
    from rank1_core.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    m = ModelConfig(name="tiny-qwen2")
    t = tokenize_trace(tok, "What is 2+2?", "2 + 2 = 4.", "The answer is 4.", m, max_len=512)
    prompt = tok.decode(t.input_ids[: t.prompt_len])
    assistant = tok.decode([i for i, k in zip(t.input_ids, t.loss_mask) if k])
    assert prompt.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert "You are Qwen, created by Alibaba Cloud." in prompt
    assert assistant == "<|im_start|>think\n2 + 2 = 4.\n<|im_start|>answer\nThe answer is 4.<|im_end|>"
    assert t.loss_mask == [0] * t.prompt_len + [1] * (len(t.input_ids) - t.prompt_len)
    # the generation prompt is the trace's prefix up to the think sentinel
    p = prompt_text(tok, "What is 2+2?", m)
    assert tok.decode(t.input_ids).startswith(p)


def test_overlong_policies(tiny_model_dir):
    from rank1_core.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    m = ModelConfig(name="tiny-qwen2")
    long_thinking = " ".join(["step"] * 200)
    t = tokenize_trace(tok, "q", long_thinking, "a", m, max_len=64, overlong="truncate")
    assert len(t.input_ids) == 64 and t.truncated and len(t.loss_mask) == 64
    assert tokenize_trace(tok, "q", long_thinking, "a", m, max_len=64, overlong="drop") is None
