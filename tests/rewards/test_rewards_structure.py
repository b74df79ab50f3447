"""TagFormat and JsonSchema: hand-computed partial credit."""

from __future__ import annotations

import pytest

from rftlab.rewards import JsonSchema, TagFormat, extract_json

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think>\n<answer>4</answer>", 3 / 3),        # both tags once + exact structure
        ("<answer>4</answer>", 1 / 3),                           # answer once only
        ("<think>a</think> so <answer>4</answer>", 2 / 3),       # text between: no structure credit
        ("<answer>4</answer><think>a</think>", 2 / 3),           # wrong order
        ("<think>a</think><answer>1</answer><answer>2</answer>", 1 / 3),  # answer twice: no credit for it
        ("plain text", 0.0),
    ],
)
def test_tag_format_partial_credit(text, expected):
    assert TagFormat()([text]) == [pytest.approx(expected)]


def test_tag_format_validation():
    with pytest.raises(ValueError, match="tags"):
        TagFormat(tags=["<think>"])
    assert TagFormat(tags="answer")(["<answer>x</answer>"]) == [1.0]


def test_extract_json():
    assert extract_json('Here:\n```json\n{"a": [1, 2]}\n```') == {"a": [1, 2]}
    assert extract_json('text {not json} then {"b": 2} end') == {"b": 2}
    assert extract_json("none") is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ('{"name": "Ann", "age": 30, "city": "Oslo"}', 4 / 4),   # 3 fields + whole document
        ('{"name": "Ann", "age": 30}', 4 / 4),                    # city optional and absent: counts
        ('{"name": "Ann", "age": -1}', 2 / 4),                    # age invalid; doc invalid: name + city
        ('{"name": "Ann"}', 2 / 4),                               # age required, absent: name + city
        ('{"name": "Ann", "age": 30, "x": 1}', 3 / 4),            # extra field: whole doc invalid
        ("no json", 0.0),
    ],
)
def test_json_schema_partial_credit(completion, expected):
    assert JsonSchema(SCHEMA)([completion]) == [pytest.approx(expected)]


def test_json_schema_against_reference_values():
    reward = JsonSchema(SCHEMA, answer_key="answer")
    reference = '{"name": "Ann Lee", "age": 30, "city": "Oslo"}'
    completions = ['{"name": "ann lee", "age": 30, "city": "Oslo"}',  # case-insensitive strings: 4/4
                   '{"name": "Ann Lee", "age": 31, "city": "Oslo"}',  # wrong age: 2 fields, doc no: 2/4
                   '{"name": "Ann Lee", "age": 30}']                  # city expected but absent: 2/4
    assert reward(completions, answer=[reference] * 3) == pytest.approx([1.0, 0.5, 0.5])


def test_json_schema_per_sample_schema_column():
    reward = JsonSchema()
    scores = reward(['[1, 2]', '{"a": 1}'], schema=[{"type": "array"}, {"type": "array"}])
    assert scores == [1.0, 0.0]  # no properties: 1[valid]


def test_json_schema_bad_input():
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        JsonSchema({"type": "no-such-type"})
    with pytest.raises(KeyError, match="schema"):
        JsonSchema()(["{}"])
    with pytest.raises(KeyError, match="'answer'"):
        JsonSchema(SCHEMA, answer_key="answer")(["{}"])
