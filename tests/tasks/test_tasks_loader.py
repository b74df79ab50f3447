"""DatasetTask: local JSONL / CSV / Parquet through HF datasets, column mapping, GSM8K answers."""

from __future__ import annotations

import csv
import json
import re

import pytest

from rftlab.rewards import CodeExecution, MathAnswer, NumericAnswer
from rftlab.tasks import DatasetTask, gsm8k_answer

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A farm sells 1,000 eggs twice. How many?", "answer": "2 * 1000 = 2000\n#### 2,000"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_jsonl_with_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    task = DatasetTask(path, columns={"prompt": "question"}, system_prompt="Be brief.",
                       template="{prompt} End with the number.", cache_dir=str(tmp_path / "cache"))
    rows = task.train_rows()
    assert [r["answer"] for r in rows] == ["7", "2000", "4.5"]
    assert rows[0]["solution"].endswith("#### 7")
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": GSM8K_ROWS[0]["question"] + " End with the number."}]
    assert task.test_rows() is None
    assert isinstance(task.reward_functions()["correct"], NumericAnswer)
    assert task.is_correct("so 2 * 1000 = 2000", rows[1])


def test_csv_with_json_encoded_tests_and_code_reward(tmp_path):
    path = tmp_path / "code.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "tests"])
        writer.writeheader()
        writer.writerow({"task": "Write f(x) = 2x.", "tests": json.dumps(["assert f(2) == 4", "assert f(0) == 0"])})
        writer.writerow({"task": "Write g() = 1.", "tests": json.dumps(["assert g() == 1"])})
    task = DatasetTask(str(path), columns={"prompt": "task"}, reward="code", cache_dir=str(tmp_path / "cache"))
    rows = task.train_rows()
    assert rows[0]["tests"] == ["assert f(2) == 4", "assert f(0) == 0"]
    reward = task.reward_functions()["correct"]
    assert isinstance(reward, CodeExecution)
    assert reward(["def f(x):\n    return 2 * x"], tests=[rows[0]["tests"]]) == [1.0]


def test_parquet_with_a_test_file_and_math_reward(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    def write(name, rows):
        pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / name)
        return str(tmp_path / name)

    train = write("train.parquet", [{"prompt": "1/2 + 1/4?", "answer": "\\frac{3}{4}"}])
    test = write("test.parquet", [{"prompt": "1/3 + 1/3?", "answer": "\\frac{2}{3}"}])
    task = DatasetTask(train, test=test, reward="math", cache_dir=str(tmp_path / "cache"))
    assert len(task.train_rows()) == 1 and task.test_rows()[0]["answer"] == "\\frac{2}{3}"
    assert isinstance(task.reward_functions()["correct"], MathAnswer)
    assert task.is_correct("Answer: 0.75", task.train_rows()[0])


def test_held_out_rows_and_chat_prompts_kept(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(10)]
    task = DatasetTask(write_jsonl(tmp_path / "chat.jsonl", rows), test_size=3, seed=1,
                       cache_dir=str(tmp_path / "cache"))
    train, test = task.train_rows(), task.test_rows()
    assert len(train) == 7 and len(test) == 3
    assert {r["answer"] for r in train} | {r["answer"] for r in test} == {str(i) for i in range(10)}
    assert test[0]["prompt"][0]["role"] == "user"  # messages are used as given


def test_gsm8k_answer_parsing():
    assert gsm8k_answer("work\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_answer("no marker")


def test_bad_input_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyError, match="no 'prompt' column"):
        DatasetTask(path, cache_dir=cache)
    with pytest.raises(KeyError, match="'query'"):
        DatasetTask(path, columns={"prompt": "query"}, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DatasetTask(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="format"):
        DatasetTask(str(tmp_path / "d.txt"))
    with pytest.raises(ValueError, match="reward='exact'"):
        DatasetTask(path, reward="exact")
    with pytest.raises(ValueError, match="test_size"):
        DatasetTask(path, columns={"prompt": "question"}, test_size=1, cache_dir=cache)


@pytest.mark.parametrize("bad, message", [('{"prompt": "b", "answer": 2', "line 3: not valid JSON"),
                                          ('["prompt", "b"]', "line 3: a JSON list, not an object")])
def test_a_malformed_jsonl_line_is_named_with_its_file_and_line(tmp_path, bad, message):
    from rftlab.tasks.loader import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n' + bad + '\n{"prompt": "c", "answer": 3}\n')
    with pytest.raises(ValueError, match=re.escape(f"{str(path)!r}, {message}")):
        read_rows(path, cache_dir=str(tmp_path / "cache"))
