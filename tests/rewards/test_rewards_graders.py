"""OpenAI-form graders and the safe expression evaluator: hand-computed cases and bad input."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from rftlab.rewards import (
    ExpressionError,
    RewardSet,
    SafeExpression,
    Sandbox,
    evaluate_arithmetic,
    from_openai_grader,
    render_template,
)

OUT, ANSWER = "{{sample.output_text}}", "{{item.answer}}"


@pytest.mark.parametrize(
    "operation, expected",
    [("eq", [1.0, 0.0, 0.0]), ("ne", [0.0, 1.0, 1.0]), ("like", [1.0, 1.0, 0.0]), ("ilike", [1.0, 1.0, 1.0])],
)
def test_string_check_operations(operation, expected):
    grader = from_openai_grader({"type": "string_check", "name": "s", "input": OUT, "reference": ANSWER,
                                 "operation": operation})
    # "Paris" == "Paris"; "Paris, France" contains "Paris"; "PARIS" contains it only ignoring case.
    assert grader(["Paris", "Paris, France", "PARIS"], answer=["Paris"] * 3) == expected


def test_templates_reach_nested_fields_and_output_json():
    sample, item = {"output_text": '{"city": "Oslo"}', "output_json": {"city": "Oslo"}}, {"meta": {"k": [5, 6]}}
    assert render_template("{{ sample.output_json.city }}/{{item.meta.k.1}}", sample, item) == "Oslo/6"
    with pytest.raises(KeyError, match="item.meta has no 'x'"):
        render_template("{{item.meta.x}}", sample, item)
    with pytest.raises(ValueError, match="must start with 'sample.' or 'item.'"):
        from_openai_grader({"type": "string_check", "input": "{{output}}", "reference": ANSWER, "operation": "eq"})


def test_text_similarity_metrics():
    def grade(metric, out, ref, **extra):
        config = {"type": "text_similarity", "input": OUT, "reference": ANSWER, "evaluation_metric": metric, **extra}
        return from_openai_grader(config)([out], answer=[ref])[0]

    assert grade("fuzzy_match", "kitten", "sitting") == pytest.approx(8 / 13)
    assert grade("rouge_1", "The cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert grade("rouge_l", "a b c d", "a c d b") == pytest.approx(0.75)
    assert grade("bleu", "the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert grade("fuzzy_match", "kitten", "sitting", pass_threshold=0.6) == 1.0  # 0.615 >= 0.6
    assert grade("fuzzy_match", "kitten", "sitting", pass_threshold=0.7) == 0.0
    with pytest.raises(ValueError, match="embedder"):
        grade("cosine", "a", "b")
    with pytest.raises(ValueError, match="evaluation_metric='meteor'"):
        grade("meteor", "a", "b")


def test_python_grader_runs_in_the_sandbox():
    source = "def grade(sample, item):\n    return float(sample['output_text'].strip() == str(item['answer']))\n"
    grader = from_openai_grader({"type": "python", "name": "py", "source": source}, sandbox=Sandbox(timeout=3))
    assert grader(["42", " 41 "], answer=[42, 42]) == [1.0, 0.0]
    hostile = "def grade(sample, item):\n    return float(len(open('/etc/passwd').read()) > 0)\n"
    assert from_openai_grader({"type": "python", "source": hostile})(["x"], answer=[1]) == [0.0]
    with pytest.raises(ValueError, match="grade"):
        from_openai_grader({"type": "python", "source": "x = 1"})


def test_score_model_with_a_judge_callable():
    seen = []

    def judge(conversations):
        seen.extend(conversations)
        return ["Score: 7", "I give it 12/10", "no idea"]

    config = {"type": "score_model", "name": "judge", "range": [0, 10],
              "input": [{"role": "system", "content": "Rate 0-10."},
                        {"role": "user", "content": "Q: {{item.question}} A: {{sample.output_text}}"}]}
    grader = from_openai_grader(config, judge=judge)
    # first number of each reply, clipped to [0, 10]; no number -> the range's low end
    assert grader(["a1", "a2", "a3"], question=["q1", "q2", "q3"]) == [7.0, 10.0, 0.0]
    assert seen[0][1] == {"role": "user", "content": "Q: q1 A: a1"}


def test_score_model_with_a_local_model_folder(tmp_path, tokenizer):
    from rftlab.models.loading import tiny_llama

    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = {"type": "score_model", "model": str(tmp_path), "range": [0, 5],
              "input": [{"role": "user", "content": "Rate: {{sample.output_text}}"}]}
    grader = from_openai_grader(config)
    grader.judge.max_new_tokens = 4
    scores = grader(["one", "two"])
    assert len(scores) == 2 and all(0.0 <= s <= 5.0 for s in scores)
    assert grader.judge._model is not None  # the local model really generated the replies


def test_multi_grader_formula():
    config = {
        "type": "multi", "name": "combined", "calculate_output": "0.7 * exact + 0.3 * min(fuzzy, 1)",
        "graders": {
            "exact": {"type": "string_check", "input": OUT, "reference": ANSWER, "operation": "eq"},
            "fuzzy": {"type": "text_similarity", "input": OUT, "reference": ANSWER, "evaluation_metric": "fuzzy_match"},
        },
    }
    grader = from_openai_grader(config)
    # "sitting": exact 1, fuzzy 1 -> 1.0; "kitten": exact 0, fuzzy 8/13 -> 0.3 * 8/13
    assert grader(["sitting", "kitten"], answer=["sitting"] * 2) == pytest.approx([1.0, 0.3 * 8 / 13])
    result = RewardSet({"combined": grader}).score(["sitting"], ["p"], [{"answer": "sitting"}])
    assert result.total.tolist() == pytest.approx([1.0])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "label_model"}, "grader type='label_model'"),
        ({"type": "string_check", "input": OUT, "reference": ANSWER, "operation": "regex"}, "operation='regex'"),
        ({"type": "string_check", "input": OUT, "operation": "eq"}, "needs 'reference'"),
        ({"type": "score_model", "input": [{"content": "x"}], "range": [1, 0], "model": "m"}, "low < high"),
        ({"type": "score_model", "input": [{"content": "x"}]}, "model="),
        ({"type": "multi", "graders": {"a": {"type": "string_check", "input": OUT, "reference": ANSWER,
                                             "operation": "eq"}}, "calculate_output": "a + b"}, "unknown name 'b'"),
        ({"type": "multi", "graders": {}, "calculate_output": "1"}, "at least one"),
    ],
)
def test_bad_grader_configs(config, message):
    with pytest.raises(ValueError, match=message):
        from_openai_grader(config)


# ---- the safe expression evaluator ------------------------------------------------------------------
def test_expression_hand_computed():
    expr = SafeExpression("0.5 * a + b ** 2 - max(a, 3) / 2", names=["a", "b"])
    assert expr.evaluate({"a": 1, "b": 3}) == pytest.approx(0.5 + 9 - 1.5)
    assert evaluate_arithmetic("(6 - 2) * 25 / 5") == (Fraction(20), [6, 2, 25, 5])
    assert evaluate_arithmetic("7 / 2")[0] == Fraction(7, 2)  # exact, no float rounding


@pytest.mark.parametrize(
    "source",
    [
        "__import__('os').system('echo pwned')",
        "a.__class__",
        "(lambda: 1)()",
        "[x for x in range(10)]",
        "'text'",
        "a[0]",
        "open('/etc/passwd')",
        "a if a else 1",
        "True + 1",
    ],
)
def test_expression_rejects_everything_but_arithmetic(source):
    with pytest.raises(ExpressionError):
        SafeExpression(source, names=["a"])


def test_expression_runtime_errors_are_clear():
    with pytest.raises(ExpressionError, match="cannot evaluate"):
        SafeExpression("1 / a", names=["a"]).evaluate({"a": 0})
    with pytest.raises(ExpressionError, match="power"):
        SafeExpression("2 ** 100000").evaluate()
    with pytest.raises(ExpressionError, match="no value"):
        SafeExpression("a + 1", names=["a"]).evaluate({})
    with pytest.raises(ExpressionError, match="operator \\*\\* not allowed"):
        evaluate_arithmetic("2 ** 3")
    with pytest.raises(ExpressionError, match="only integers"):
        evaluate_arithmetic("1.5 + 2")


def test_grader_results_are_json_clean():
    grader = from_openai_grader({"type": "string_check", "input": OUT, "reference": ANSWER, "operation": "eq"})
    assert json.dumps(grader(["a"], answer=["a"])) == "[1.0]"
