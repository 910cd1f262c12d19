"""Grading units: math-verify equivalences, multiple-choice letters, thinking stripping,
pass@1 and its standard error by hand, Table 1 recovery and Table 2 relative gains (the
paper's own numbers), and malformed benchmark files."""

from __future__ import annotations

import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rank1_core.grading import (BenchmarkError, extract_choice, grade, grade_math, grade_samples, pass_at_1,
                                read_benchmark, recovery, relative_gain, split_answer, summarize, table1,
                                table1_markdown, table2, table2_markdown)

MARK = "<|im_start|>answer"


@pytest.mark.parametrize("answer,reference,correct", [
    ("The answer is 7.", "7", True),
    ("The answer is 12.", "7", False),
    ("so the result is $\\boxed{\\frac{1}{2}}$", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("$\\frac{28}{6}$", "\\frac{14}{3}", True),
    ("The answer is 4/6", "2/3", True),
    ("The answer is -5.", "-5", True),
    ("The answer is 5.", "-5", False),
    ("first 3, then 4, so \\boxed{10}", "10", True),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
])
def test_math_answers_through_math_verify(answer, reference, correct):
    extracted, ok = grade_math(answer, reference)
    assert ok is correct
    assert extracted is not None


def test_math_without_any_answer_is_wrong_and_extracts_nothing():
    assert grade_math("I do not know.", "7") == (None, False)
    assert grade_math("", "7") == (None, False)


@pytest.mark.parametrize("text,letter", [
    ("Answer: (B)", "B"),
    ("The answer is C.", "C"),
    ("**Answer:** D", "D"),
    ("\\boxed{A}", "A"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("B", "B"),
    ("(D)", "D"),
    ("Between (A) and (C) the right one is (C)", "C"),
    ("A careful look shows B)", "B"),
    ("A quick check, nothing certain", None),
    ("", None),
])
def test_multiple_choice_letters(text, letter):
    assert extract_choice(text, 4) == letter


def test_multiple_choice_letters_outside_the_choices_are_ignored():
    assert extract_choice("Answer: E", 4) is None
    assert extract_choice("Answer: E", 5) == "E"


def test_thinking_is_stripped_up_to_the_last_answer_marker():
    resp = f"Let me think. 3+4=8? Wait, 3+4=7.\n{MARK}\nThe answer is 7.<|im_end|>"
    text, found = split_answer(resp.removesuffix("<|im_end|>"), MARK)
    assert (text, found) == ("The answer is 7.", True)
    # A number in the thinking is not graded once the marker is there.
    g = grade(f"The answer is 8, no...\n{MARK}\nThe answer is 7.", "8", "math", MARK)
    assert g.marker_found and not g.correct and g.extracted == "7"
    resp2 = f"x {MARK} The answer is 1. Hmm {MARK} The answer is 2."
    assert split_answer(resp2, MARK) == ("The answer is 2.", True)


def test_response_without_marker_grades_its_tail_when_asked_and_says_so():
    resp = "The answer is 3. " + "blah " * 100 + "so it is 9"
    text, found = split_answer(resp, MARK, tail_chars=20)
    assert not found and len(text) <= 20 and text.endswith("so it is 9")
    g = grade(resp, "9", "math", MARK, tail_chars=20, missing_marker="grade_tail")
    assert g.correct and not g.marker_found
    g = grade(resp, "3", "math", MARK, tail_chars=20, missing_marker="grade_tail")
    assert not g.correct


def test_unfinished_think_response_is_wrong_by_default():
    """Cut off mid-thought (no answer marker): a number in the thinking is not an answer."""
    resp = "<|im_start|>think\nThe answer is \\boxed{24}"
    g = grade(resp, "24", "math", MARK)
    assert (g.correct, g.marker_found, g.extracted) == (False, False, None)
    assert not grade("hmm, (B) looks right", "B", "mc", MARK).correct
    # the old behaviour, on request
    assert grade(resp, "24", "math", MARK, missing_marker="grade_tail").correct
    # once the answer section is reached it is graded as before
    assert grade(resp + f"\n{MARK}\n\\boxed{{24}}", "24", "math", MARK).correct
    with pytest.raises(ValueError, match="missing_marker must be one of wrong, grade_tail, got 'tail'"):
        grade(resp, "24", "math", MARK, missing_marker="tail")
    with pytest.raises(ValueError, match="prompt must be one of think, plain, got 'chat'"):
        grade(resp, "24", "math", MARK, prompt="chat")


def test_plain_prompt_is_graded_on_the_whole_response():
    """The base model in its own chat format writes no marker: its whole answer is graded
    (not only the last tail_chars characters)."""
    resp = "So the result is \\boxed{24}. " + "Let me double-check each step once more. " * 20
    g = grade(resp, "24", "math", MARK, tail_chars=300, prompt="plain")
    assert g.correct and not g.marker_found and g.extracted == "24"
    assert not grade(resp, "24", "math", MARK, tail_chars=300, missing_marker="grade_tail").correct
    assert grade("After some thought: (C).", "C", "mc", MARK, prompt="plain").correct


def test_grade_samples_follows_each_rows_prompt():
    resp = "thinking... \\boxed{5}"
    gen = pd.DataFrame({"variant": ["base", "lora", "lora"], "benchmark": "b", "problem_id": ["1", "1", "2"],
                        "sample": 0, "response": [resp, resp, f"hm {MARK} \\boxed{{5}}"], "n_tokens": 5,
                        "finished": [True, False, True], "backend": "transformers", "lora_mode": None,
                        "answer": "5", "kind": "math", "n_choices": 0, "prompt": ["plain", "think", "think"]})
    out = grade_samples(gen, MARK)
    assert out["correct"].tolist() == [True, False, True]
    assert out["marker_found"].tolist() == [False, False, True]
    assert grade_samples(gen, MARK, missing_marker="grade_tail")["correct"].tolist() == [True, True, True]
    # without a prompt column every row is a think prompt
    assert grade_samples(gen.drop(columns="prompt"), MARK)["correct"].tolist() == [False, False, True]


def test_grade_multiple_choice_by_letter():
    assert grade(f"hmm\n{MARK}\nAnswer: (b)", "B", "mc", MARK).correct is False  # lower-case is not a choice
    g = grade(f"hmm (A)?\n{MARK}\nThe answer is (B).", "B", "mc", MARK)
    assert g.correct and g.extracted == "B"
    assert not grade(f"{MARK} The answer is (C).", "B", "mc", MARK).correct
    with pytest.raises(ValueError, match="unknown benchmark kind"):
        grade("x", "1", "essay", MARK)


def test_pass_at_1_and_standard_error_by_hand():
    # Per-problem shares 0.5, 1, 0: mean 0.5; sample sd = sqrt((0 + .25 + .25) / 2) = 0.5;
    # stderr = 0.5 / sqrt(3).
    p, se = pass_at_1([[True, False], [True, True], [False, False]])
    assert p == pytest.approx(0.5)
    assert se == pytest.approx(0.5 / math.sqrt(3))
    # Greedy (one sample), 1 of 4 correct: sample variance (0.75^2 + 3 * 0.25^2) / 3 = 0.25,
    # stderr sqrt(0.25 / 4) = 0.25.
    p, se = pass_at_1([[True], [False], [False], [False]])
    assert p == 0.25 and se == pytest.approx(0.25)
    p, se = pass_at_1([[True, False, True]])
    assert p == pytest.approx(2 / 3) and math.isnan(se)
    with pytest.raises(ValueError):
        pass_at_1([[True], []])


def test_summarize_groups_by_variant_and_benchmark():
    rows = []
    for pid, outcomes in {"p0": [1, 0], "p1": [1, 1], "p2": [0, 0]}.items():
        for k, c in enumerate(outcomes):
            rows.append({"variant": "lora", "benchmark": "b", "problem_id": pid, "sample": k, "correct": bool(c)})
    rows.append({"variant": "base", "benchmark": "b", "problem_id": "p0", "sample": 0, "correct": True})
    s = summarize(pd.DataFrame(rows)).set_index("variant")
    assert s.loc["lora", "n_problems"] == 3 and s.loc["lora", "n_samples"] == 6
    assert s.loc["lora", "pass1"] == pytest.approx(0.5)
    assert s.loc["lora", "stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert s.loc["base", "pass1"] == 1.0


def test_recovery_reproduces_the_papers_table_1():
    assert recovery(0.2333, 0.5000, 0.6000) == pytest.approx(0.7273, abs=1e-4)
    assert recovery(0.8340, 0.9100, 0.9220) == pytest.approx(0.8636, abs=1e-4)
    # GPQA-Diamond: 97, 115 and 117 of 198 correct give 90.00% (the paper prints 89.90%).
    assert recovery(97 / 198, 115 / 198, 117 / 198) == pytest.approx(0.9)
    assert recovery(0.2, 0.1, 0.6) == pytest.approx(-0.25)     # a LoRA worse than base: negative
    assert recovery(0.5, 0.7, 0.5) is None                     # full does not beat base
    assert recovery(0.5, 0.7, 0.4) is None
    assert recovery(float("nan"), 0.7, 0.9) is None


def test_relative_gain_reproduces_the_papers_table_2():
    assert relative_gain(0.3667, 0.2333, 0.5000) == pytest.approx(0.5002, abs=1e-4)
    assert relative_gain(0.1333, 0.2333, 0.5000) == pytest.approx(-0.3750, abs=1e-4)
    assert relative_gain(0.9000, 0.8340, 0.9100) == pytest.approx(0.8684, abs=1e-4)
    assert relative_gain(0.5, 0.5, 0.5) is None


def _summary(scores: dict) -> pd.DataFrame:
    return pd.DataFrame([{"variant": v, "benchmark": b, "n_problems": 10, "n_samples": 10, "pass1": p,
                          "stderr": 0.01} for (v, b), p in scores.items()])


def test_table1_for_any_benchmarks_with_undefined_recovery():
    s = _summary({("base", "aime"): 0.2333, ("lora", "aime"): 0.5, ("full", "aime"): 0.6,
                  ("base", "easy"): 0.9, ("lora", "easy"): 0.95, ("full", "easy"): 0.85})
    t = table1(s).set_index("benchmark")
    assert t.loc["aime", "recovery_text"] == "72.73%"
    assert t.loc["easy", "recovery_text"] == "undefined" and math.isnan(t.loc["easy", "recovery"])
    md = table1_markdown(table1(s))
    assert "| aime | 0.2333 ± 0.0100 | 0.5000 ± 0.0100 | 0.6000 ± 0.0100 | 72.73% |" in md
    assert "undefined" in md
    # A variant that was not evaluated shows as n/a and leaves recovery undefined.
    t = table1(_summary({("base", "x"): 0.1, ("lora", "x"): 0.3}))
    assert t.loc[0, "recovery_text"] == "undefined"
    assert "n/a" in table1_markdown(t)


def test_table1_shows_the_marker_rate_of_think_prompted_variants():
    s = _summary({("base", "aime"): 0.2333, ("lora", "aime"): 0.5, ("full", "aime"): 0.6})
    s["marker_rate"] = [0.0, 0.875, 1.0]
    s["prompt"] = ["plain", "think", "think"]
    t = table1(s)
    assert math.isnan(t.loc[0, "base_marker_rate"])  # plain prompt: no marker expected
    assert (t.loc[0, "lora_marker_rate"], t.loc[0, "full_marker_rate"]) == (0.875, 1.0)
    md = table1_markdown(t)
    assert "| % Recovery | Answer marker reached (LoRA / full) |" in md
    assert "| 72.73% | 87.5% / 100.0% |" in md
    s["prompt"] = "think"  # evaluate.base_prompt: think
    assert "| 72.73% | 0.0% / 87.5% / 100.0% |" in table1_markdown(table1(s))


def test_table2_like_the_paper():
    s = _summary({("base", "aime"): 0.2333, ("lora", "aime"): 0.5, ("attn_ablated", "aime"): 0.3667,
                  ("mlp_ablated", "aime"): 0.1333})
    t = table2(s, ["attn", "mlp"])
    assert t.loc[0, "attn_text"] == "0.3667 (50.02%)"
    assert t.loc[0, "mlp_text"] == "0.1333 (-37.50%)"
    assert t.loc[0, "lora_text"] == "0.5000 (100.00%)"
    md = table2_markdown(t, ["attn", "mlp"])
    assert "| aime | 0.2333 | 0.5000 (100.00%) | 0.3667 (50.02%) | 0.1333 (-37.50%) |" in md


def _bench(tmp_path, **cols):
    base = {"problem_id": ["a", "b"], "question": ["1+1?", "2+2?"], "answer": ["2", "4"], "kind": ["math", "math"],
            "choices": [[], []], "source": ["t", "t"]}
    base.update(cols)
    base = {k: v for k, v in base.items() if v is not None}
    path = tmp_path / "bench.parquet"
    pq.write_table(pa.table(base), path)
    return str(path)


def test_benchmark_file_missing_its_answer_column_is_a_clear_error(tmp_path):
    path = _bench(tmp_path, answer=None)
    with pytest.raises(BenchmarkError, match=r"bench\.parquet has no column 'answer'"):
        read_benchmark(path)


def test_benchmark_rows_are_checked(tmp_path):
    with pytest.raises(BenchmarkError, match=r"row 1 \(problem_id 'b'\): column 'answer' is empty"):
        read_benchmark(_bench(tmp_path, answer=["2", " "]))
    with pytest.raises(BenchmarkError, match="column 'kind' is 'essay'"):
        read_benchmark(_bench(tmp_path, kind=["math", "essay"]))
    with pytest.raises(BenchmarkError, match="duplicate problem_id"):
        read_benchmark(_bench(tmp_path, problem_id=["a", "a"]))
    with pytest.raises(BenchmarkError, match="multiple-choice answer 'E'"):
        read_benchmark(_bench(tmp_path, kind=["mc", "mc"], answer=["A", "E"],
                              choices=[["x", "y", "z", "w"], ["x", "y", "z", "w"]]))
    df = read_benchmark(_bench(tmp_path), limit=1)
    assert list(df["problem_id"]) == ["a"] and list(df["n_choices"]) == [0]
