"""Step critics: equations in a line, the rule-based arithmetic critic, judge critics."""

from __future__ import annotations

import pytest

from rftlab.rewards.critics import (
    ArithmeticStepCritic,
    Critique,
    HFJudgeCritic,
    JudgeCritic,
    find_equations,
    neutral_critique,
    parse_arithmetic,
    parse_judgement,
)


def _eqs(line):
    return [(e.lhs, e.claimed, e.correct) for e in find_equations(line)]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("5 + 3 = 8", [("5 + 3", 8.0, True)]),
        ("5 + 3 = 9", [("5 + 3", 9.0, False)]),
        ("Step 2: 5+3=8.", [("5+3", 8.0, True)]),           # label and full stop are not arithmetic
        ("1. 5 + 3 = 8", [("5 + 3", 8.0, True)]),           # "1. 5 + 3" does not parse; "5 + 3" does
        ("3 + 4 = 7 * 2 = 14", [("3 + 4", 7.0, True), ("7 * 2", 14.0, True)]),  # a chain: one per "="
        ("8 x 2 = 16 and 12 ÷ 4 = 3", [("8 * 2", 16.0, True), ("12 / 4", 3.0, True)]),
        ("$1,000 - $250 = $750", [("1000 -  250", 750.0, True)]),
        ("2 * (3 + 4) = 14", [("2 * (3 + 4)", 14.0, True)]),
        ("(5 + 3 = 8)", [("5 + 3", 8.0, True)]),
        ("-3 + 5 = 2", [("-3 + 5", 2.0, True)]),
        ("10 / 0 = 1", [("10 / 0", 1.0, False)]),           # division by zero: wrong, not a crash
        ("8 - 2 = 6.5", [("8 - 2", 6.5, False)]),
        ("Total = 14", []), ("x = 5", []), ("7 = 7", []),   # no operation: not an equation
        ("2**10 = 1024", []),                               # powers are not in the grammar
        ('__import__("os").system("echo hi") = 1', []),     # never evaluated as code
        ("5 + 3 == 8", []),
    ],
)
def test_find_equations(line, expected):
    assert _eqs(line) == expected


def test_parse_arithmetic_rejects_code_and_oversized_input():
    assert parse_arithmetic("(3 + 4) * 2").evaluate() == 14
    assert parse_arithmetic("open('x')") is None and parse_arithmetic("a + 1") is None
    assert parse_arithmetic("1 + " * 100 + "1") is None  # longer than a step can be
    assert parse_arithmetic("42") is None  # no operation


ROW = {"answer": "6", "steps": [8, 6]}


def test_arithmetic_critic_hand_computed():
    segments = ["Tom has 5 apples.", "5 + 3 = 8", "8 - 2 = 7", "8 - 2 = 6", "Answer: 6"]
    # D = {8, 6}. k=1: no equation -> S 0.5; V = {}, n_wrong 0 -> P = 0 / 2 = 0
    # k=2: 5 + 3 = 8 correct -> S 1; V = {8} -> P = 1 / 2
    # k=3: 8 - 2 = 7 wrong -> S 0; n_wrong 1 -> P = 1 / (2 + 1) = 1/3
    # k=4: 8 - 2 = 6 correct -> S 1; V = {8, 6} -> P = 2 / 3. G: the last number 6 is the answer -> 1
    G, S, P = ArithmeticStepCritic().score("prompt", segments, ROW)
    assert G == 1.0 and S == [0.5, 1.0, 0.0, 1.0]
    assert P == pytest.approx([0.0, 0.5, 1 / 3, 2 / 3])


def test_arithmetic_critic_mixed_line_and_wrong_answer():
    # one line with a right and a wrong equation: S = 1/2; the right one's value 8 counts, the wrong one
    # adds to n_wrong: P = 1 / (2 + 1). The final answer 9 is wrong -> G = 0.
    critique = ArithmeticStepCritic().score("p", ["5 + 3 = 8 and 8 - 2 = 5", "Answer: 9"], ROW)
    assert critique == Critique(0.0, [0.5], [pytest.approx(1 / 3)])
    # a chain that is only an answer: no thought scores
    assert ArithmeticStepCritic().score("p", ["The answer is 6"], ROW) == Critique(1.0, [], [])
    # correct values not in D (a detour) make no progress
    assert ArithmeticStepCritic().score("p", ["2 + 2 = 4", "6"], ROW).P == [0.0]


def test_arithmetic_critic_names_missing_columns():
    with pytest.raises(KeyError, match="'steps'"):
        ArithmeticStepCritic().score("p", ["1 + 1 = 2", "2"], {"answer": "2"})
    with pytest.raises(ValueError, match="tolerance"):
        ArithmeticStepCritic(tolerance=-1)


def test_parse_judgement():
    reply = "step 1: thought=0.9 progress=0.4\nStep 2: thought = 1.5, progress = 0.8\noverall=0.7"
    assert parse_judgement(reply, 2) == Critique(0.7, [0.9, 1.0], [0.4, 0.8])  # 1.5 clipped to 1
    assert parse_judgement(reply, 3) is None  # step 3 missing
    assert parse_judgement("step 1: thought=1 progress=1", 1) is None  # no overall
    assert parse_judgement("overall: 1", 0) == Critique(1.0, [], [])


def test_judge_critic_prompts_parses_and_counts_unparsed_output():
    seen = []

    def chat(messages):
        seen.extend(messages)
        return ["step 1: thought=1 progress=0.5\noverall=1", "I think it is fine!"]

    judge = JudgeCritic(chat)
    rows = [{"answer": "6", "solution": "5 + 3 = 8\n8 - 2 = 6"}] * 2
    out = judge.score_batch(["Tom has 5 apples...", "q2"], [["5 + 3 = 8", "Answer: 8"], ["a", "b", "c"]], rows)
    assert out[0] == Critique(1.0, [1.0], [0.5])
    # unparseable: neutral 0.5 everywhere (equal S -> S_hat 0, equal P -> dP 0: every C_k = G), counted
    assert out[1] == neutral_critique(2) == Critique(0.5, [0.5, 0.5], [0.5, 0.5])
    assert judge.num_unparsed == 1
    assert "Step 1: 5 + 3 = 8" in seen[0] and "5 + 3 = 8\n8 - 2 = 6" in seen[0] and "Final answer: Answer: 8" in seen[0]
    assert "step 2: thought=<score> progress=<score>" in seen[1]


def test_judge_critic_bad_arguments():
    with pytest.raises(TypeError, match="chat must be callable"):
        JudgeCritic("not a function")
    with pytest.raises(ValueError, match="rubric must contain"):
        JudgeCritic(lambda m: m, rubric="grade {problem}")
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFJudgeCritic("some/folder", max_new_tokens=0)


def test_hf_judge_on_the_tiny_model_never_crashes(tmp_path, tokenizer):
    # A random model writes garbage: every chain gets neutral scores and is counted.
    from rftlab.models.loading import tiny_llama

    tiny_llama(len(tokenizer), seed=0).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = HFJudgeCritic(str(tmp_path), max_new_tokens=8)
    out = judge.score_batch(["p1", "p2"], [["1 + 1 = 2", "2"], ["2"]], [ROW, ROW])
    assert out == [neutral_critique(1), neutral_critique(0)]
    assert judge.num_unparsed == 2
