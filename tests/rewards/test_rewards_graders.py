"""OpenAI-form graders and the safe expression evaluator: hand-computed cases and bad input."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rftlab.rewards import (
    ExpressionError,
    MultiGrader,
    RewardSet,
    SafeExpression,
    Sandbox,
    ScoreModel,
    StringCheck,
    TextSimilarity,
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
    with pytest.raises(ValueError, match=r"^StringCheck.input: unknown placeholder 'output' \(allowed: "):
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
    infinite = "def grade(sample, item):\n    return float('inf')\n"  # finite scores only, else failure_value
    assert from_openai_grader({"type": "python", "source": infinite}, sandbox=Sandbox(timeout=3))(["x"]) == [0.0]
    with pytest.raises(ValueError, match="grade"):
        from_openai_grader({"type": "python", "source": "x = 1"})


def test_score_model_with_a_judge_callable():
    seen = []

    def judge(conversations):
        seen.extend(conversations)
        return ["Score: 7", "I give it 12", "no idea"]

    config = {"type": "score_model", "name": "judge", "range": [0, 10],
              "input": [{"role": "system", "content": "Rate 0-10."},
                        {"role": "user", "content": "Q: {{item.question}} A: {{sample.output_text}}"}]}
    grader = from_openai_grader(config, judge=judge)
    # first number of each reply; outside [0, 10] or no number -> the range's low end, counted
    assert grader(["a1", "a2", "a3"], question=["q1", "q2", "q3"]) == [7.0, 0.0, 0.0]
    assert grader.unparsed == 2
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
        ({"type": "label_model"}, "^type: unknown grader type 'label_model'"),
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


# ---- failing closed: what a policy hunting for reward can reach ---------------------------------------
JSON_ANSWER = "{{ sample.output_json.answer }}"
ALLOWED = r" \(allowed: sample.output_text, sample.output_json.<key>, item.<column>\)"


def echo_judge(conversations):
    """A judge that replies with the last message it was shown: the completion reaches the parser."""
    return [conversation[-1]["content"] for conversation in conversations]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: StringCheck(OUT, "{{ sample.output_text", "eq"),
         r"^StringCheck.reference: unterminated placeholder '\{\{ sample.output_text'$"),
        (lambda: StringCheck(OUT, "{{ foo.bar }}", "ne"), r"^StringCheck.reference: unknown placeholder 'foo.bar'" + ALLOWED),
        (lambda: StringCheck("{{ sample.output_txt }}", ANSWER, "ne"),
         r"^StringCheck.input: unknown placeholder 'sample.output_txt'" + ALLOWED),
        (lambda: StringCheck("{{ sample.output_json }}", ANSWER, "eq"), "unknown placeholder 'sample.output_json'"),
        (lambda: StringCheck("{{ item }}", ANSWER, "eq"), "unknown placeholder 'item'"),
        (lambda: StringCheck("{{ item..answer }}", ANSWER, "eq"), r"unknown placeholder 'item..answer'"),
        (lambda: StringCheck("{{}}", ANSWER, "eq"), "unknown placeholder ''"),
        (lambda: TextSimilarity(OUT, "x {{item.answer", "bleu"), r"^TextSimilarity.reference: unterminated placeholder"),
        (lambda: ScoreModel([{"role": "user", "content": "ok"}, {"role": "user", "content": "{{ sample.text }}"}],
                            judge=echo_judge),
         r"^ScoreModel.input\[1\].content: unknown placeholder 'sample.text'"),
    ],
)
def test_malformed_templates_are_refused_at_construction(build, message):
    # Before: accepted as literal text, so "ne" against a reference nobody can type scored a silent 1.0.
    with pytest.raises(ValueError, match=message):
        build()


def test_render_template_refuses_malformed_templates_and_never_expands_the_completion():
    with pytest.raises(ValueError, match="unterminated placeholder"):
        render_template("{{ sample.output_text", {"output_text": "x"}, {})
    # The completion is substituted, never parsed as a template itself.
    assert render_template(OUT, {"output_text": "{{item.answer}}"}, {"answer": "42"}) == "{{item.answer}}"


@pytest.mark.parametrize("operation", ["eq", "ne", "like", "ilike"])
def test_a_completion_without_the_json_field_scores_zero_and_is_counted(operation):
    grader = StringCheck(JSON_ANSWER, ANSWER, operation)
    completions = ["not json at all", '{"other": 1}', "[1, 2]", '{"answer": "5"}']
    scores = grader(completions, answer=["5"] * 4)
    assert scores[:3] == [0.0, 0.0, 0.0]  # even "ne": a missing field is never a match nor a mismatch
    assert scores[3] == {"eq": 1.0, "ne": 0.0, "like": 1.0, "ilike": 1.0}[operation]
    assert grader.missing_fields == 3
    # RewardSet sees ordinary scores: no error, no sample-by-sample retry.
    result = RewardSet({"g": grader}).score(completions, ["p"] * 4, [{"answer": "5"}] * 4)
    assert result.errors == {"g": 0}


def test_missing_json_fields_in_similarity_judge_and_multi_graders():
    similarity = TextSimilarity(JSON_ANSWER, ANSWER, "fuzzy_match")
    assert similarity(["plain text", '{"answer": "abc"}'], answer=["abc", "abc"]) == [0.0, 1.0]
    assert similarity.missing_fields == 1

    asked = []

    def judge(conversations):
        asked.extend(conversations)
        return ["0.9"] * len(conversations)

    score_model = ScoreModel([{"role": "user", "content": "Rate " + JSON_ANSWER}], range=[-1, 1], judge=judge)
    assert score_model(["no json", '{"answer": "x"}', "{}"]) == [-1.0, 0.9, -1.0]  # the range's low end
    assert len(asked) == 1 and score_model.missing_fields == 2  # the judge never sees an empty prompt

    multi = MultiGrader({"exact": StringCheck(JSON_ANSWER, ANSWER, "eq"), "judge": score_model}, "exact + judge")
    assert multi(["no json"], answer=["x"]) == [-1.0]
    assert multi.missing_fields == 2 + 2  # its graders' counts: 1 each now, plus the judge's earlier 2


@pytest.mark.parametrize(
    "reply, expected",
    [
        (".5", 0.5), ("1e-3", 0.001), ("0.75", 0.75), ("Score: 0.75.", 0.75), ("**0.2**", 0.2), ("+.25", 0.25),
        ("1", 1.0), ("0", 0.0), ("Qwen2.5 rates it 0.3", 0.3),  # a number glued to a word is not a score
    ],
)
def test_judge_replies_are_parsed_as_whole_decimal_numbers(reply, expected):
    grader = ScoreModel([{"content": OUT}], range=[0, 1], judge=echo_judge)
    assert grader.parse(reply) == pytest.approx(expected)
    assert grader.unparsed == 0


@pytest.mark.parametrize(
    "reply", ["", "no idea", "nan", "inf", "1e999", "1.2.3", "3,5", "1e", "5th", "0x1F", "\u22125", "\uff17", None,
              # off the scale: a fraction is ambiguous, a number outside the range is not clipped into it
              "1/2", "7 / 10", "I give it 12/10", "7", "-3", "0.1"],
)
def test_unusable_judge_replies_score_the_minimum_and_are_counted(reply):
    # Before: ".5" was read as 5 and "1e999" as 1, both clipped to a silent 1.0.
    grader = ScoreModel([{"content": OUT}], range=[0.25, 1], judge=echo_judge)
    assert grader.parse(reply) == 0.25
    assert grader.unparsed == 1


def test_judge_replies_through_the_grader():
    grader = ScoreModel([{"content": OUT}], range=[0, 1], judge=echo_judge)
    assert grader([".5", "1e-3", "1e999", "maybe"]) == pytest.approx([0.5, 0.001, 0.0, 0.0])
    assert grader.unparsed == 2
    wrong_count = ScoreModel([{"content": OUT}], judge=lambda conversations: ["1"])
    with pytest.raises(ValueError, match="1 replies for 2 conversations"):
        wrong_count(["a", "b"])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"type": "multi", "calculate_output": "correct",
          "graders": {"correct": {"type": "string_chek", "input": OUT, "reference": ANSWER, "operation": "eq"}}},
         r"^graders.correct.type: unknown grader type 'string_chek' "
         r"\(allowed: string_check, text_similarity, python, score_model, multi\)$"),
        ({"type": "multi", "calculate_output": "correct",
          "graders": {"correct": {"type": "string_check", "input": OUT, "reference": ANSWER}}},
         r"^graders.correct.operation: string_check grader 'correct' needs 'operation'"),
        ({"type": "multi", "calculate_output": "correct",
          "graders": {"correct": {"type": "string_check", "input": OUT, "reference": "{{ item.answer", "operation": "eq"}}},
         r"^graders.correct: StringCheck.reference: unterminated placeholder"),
        ({"type": "multi", "calculate_output": "outer",
          "graders": {"outer": {"type": "multi", "calculate_output": "inner",
                                "graders": {"inner": {"type": "text_similarity", "input": OUT, "reference": ANSWER,
                                                      "evaluation_metric": "meteor"}}}}},
         r"^graders.outer.graders.inner: TextSimilarity: evaluation_metric='meteor' is invalid"),
        ({"type": "multi", "calculate_output": "j",
          "graders": {"j": {"type": "score_model", "model": "/no/such/judge", "input": [{"content": OUT}]}}},
         r"^graders.j: ScoreModel.model: no such folder '/no/such/judge'"),
        ({"type": "multi", "calculate_output": "a", "graders": {"a": "string_check"}},
         r"^graders.a: grader config must be a dict, got str"),
        ({"type": "multi", "calculate_output": "a", "graders": ["a"]}, r"^graders: .*must be a dict"),
        ({"type": "multi", "calculate_output": "a + b",
          "graders": {"a": {"type": "string_check", "input": OUT, "reference": ANSWER, "operation": "eq"}}},
         r"^MultiGrader.calculate_output: unknown name 'b'"),
    ],
)
def test_nested_graders_are_checked_at_construction_naming_their_path(config, message):
    with pytest.raises((ValueError, TypeError), match=message):
        from_openai_grader(config)


def test_a_judge_model_that_is_not_there_is_refused_at_construction(tmp_path):
    messages = [{"content": OUT}]
    with pytest.raises(ValueError, match=r"^ScoreModel.model: no such folder '.*missing'"):
        ScoreModel(messages, model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"^ScoreModel.model: no such folder './judge-folder'"):
        ScoreModel(messages, model="./judge-folder")
    # A name that is neither a folder nor a model in the local Hugging Face cache, as in OpenAI configs.
    with pytest.raises(ValueError, match=r"^ScoreModel.model: no such folder 'o3-mini', nor a model in the local"):
        ScoreModel(messages, model="o3-mini")
    assert ScoreModel(messages, model=str(tmp_path)).model == str(tmp_path)  # checked, loaded on first use


def test_multi_grader_checks_its_graders_and_knows_its_range():
    with pytest.raises(ValueError, match=r"^MultiGrader.graders.a: expected a Grader, got str"):
        MultiGrader({"a": "string_check"}, "a")
    exact, judge = StringCheck(OUT, ANSWER, "eq"), ScoreModel([{"content": OUT}], range=[0, 10], judge=echo_judge)
    assert MultiGrader({"exact": exact}, "0.7 * exact + 0.3 * min(exact, 1)").range == pytest.approx((0.0, 1.0))
    assert MultiGrader({"e": exact, "j": judge}, "2 * j - e").range == (-1.0, 20.0)
    assert MultiGrader({"e": exact, "j": judge}, "abs(j - 5) * e ** 2").range == (0.0, 5.0)
    assert MultiGrader({"e": exact, "j": judge}, "j / e").range == (-math.inf, math.inf)  # e can be 0


@pytest.mark.parametrize(
    "build",
    [lambda v: ScoreModel([{"content": OUT}], range=[0, v], judge=echo_judge),
     lambda v: TextSimilarity(OUT, ANSWER, "bleu", pass_threshold=v)],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_ranges_and_thresholds_are_refused(build, bad):
    with pytest.raises(ValueError, match="is invalid: must be"):
        build(bad)


TEXT = st.text(max_size=120)
JSON_TEXT = st.dictionaries(st.sampled_from(["answer", "other"]),
                            st.one_of(TEXT, st.integers(), st.floats(), st.none(), st.lists(st.integers()))).map(json.dumps)
COMPLETIONS = st.lists(st.one_of(TEXT, JSON_TEXT, JSON_TEXT.map(lambda j: f"Sure: {j} done")), min_size=1, max_size=4)


def property_graders() -> list:
    """One of each kind that grades text alone, and a multi grader combining them with a formula."""
    parts = {f"check_{op}": StringCheck(JSON_ANSWER, ANSWER, op) for op in ("eq", "ne", "like", "ilike")}
    parts |= {metric: TextSimilarity(OUT if metric != "bleu" else JSON_ANSWER, ANSWER, metric)
              for metric in ("fuzzy_match", "bleu", "rouge_1", "rouge_5", "rouge_l")}
    parts["passed"] = TextSimilarity(OUT, ANSWER, "rouge_l", pass_threshold=0.5)
    parts["judge"] = ScoreModel([{"role": "user", "content": OUT}], range=[-2, 3], judge=echo_judge)
    formula = "0.5 * check_eq + 0.2 * max(bleu, rouge_l) - check_ne / 4 + abs(judge - 1) * fuzzy_match ** 2"
    return [*parts.values(), MultiGrader(parts, formula)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(completions=COMPLETIONS, answer=st.one_of(TEXT, st.integers()))
def test_every_grader_stays_in_its_range_for_any_completion(completions, answer):
    for grader in property_graders():
        scores = grader(completions, answer=[answer] * len(completions))
        low, high = grader.range
        assert len(scores) == len(completions)
        assert all(isinstance(s, float) and math.isfinite(s) and low <= s <= high for s in scores), (grader.name, scores)
