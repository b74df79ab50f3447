"""JSON extraction: read a short text, return its facts as JSON that fits a schema."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

from rftlab.rewards.base import RewardFn
from rftlab.rewards.structure import JsonSchema
from rftlab.tasks.arithmetic import _GeneratedRows
from rftlab.tasks.base import Row, Task

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string"},
        "occupation": {"type": "string"},
    },
    "required": ["name", "age", "city", "occupation"],
    "additionalProperties": False,
}
FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Grace", "Kenji",
         "Sofia", "David", "Amara", "Lucas", "Nora", "Ravi", "Elena", "Samuel"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Fischer", "Silva", "Patel", "Brown", "Khan", "Petrov", "Okafor",
        "Sato", "Rossi", "Cohen", "Mensah", "Martin", "Berg", "Iyer", "Novak", "Reyes"]
CITIES = ["Lisbon", "Chicago", "Osaka", "Cairo", "Berlin", "Bogota", "Mumbai", "Leeds", "Lahore", "Kazan", "Lagos",
          "Kyoto", "Turin", "Haifa", "Accra", "Lyon", "Oslo", "Pune", "Prague", "Manila"]
JOBS = ["nurse", "teacher", "engineer", "baker", "pilot", "lawyer", "chef", "farmer", "architect", "dentist",
        "plumber", "journalist", "pharmacist", "librarian", "electrician"]
SENTENCES = [
    "{name}, {age}, works as a {occupation} in {city}.",
    "Meet {name}: a {age}-year-old {occupation} living in {city}.",
    "In {city}, {name} has been a {occupation} for years; {name_first} turned {age} last spring.",
    "{name} ({age}) moved to {city} to work as a {occupation}.",
    "The {occupation} {name} is {age} years old and lives in {city}.",
]
DEFAULT_TEMPLATE = (
    "Extract the person's name, age, city and occupation from the text as a JSON object with the keys "
    '"name", "age" (an integer), "city" and "occupation", and nothing else.\n\nText: {text}'
)


class JsonExtraction(Task):
    """Generated one-sentence biographies; the answer is a JSON object checked against a schema and
    the reference values (``JsonSchema`` with partial credit per field).

    Args:
        num_train: length of the (lazily generated) training stream.
        num_test: size of the held-out split (texts never seen in training).
        seed: seeds both splits.
        template: user message with ``{text}``.
        system_prompt: system message; "" for none.
    """

    name = "json_extraction"

    def __init__(self, num_train: int = 100_000, num_test: int = 200, seed: int = 0,
                 template: str = DEFAULT_TEMPLATE, system_prompt: str = "You are a helpful assistant.") -> None:
        if num_train < 1 or not 0 <= num_test <= 5000:
            raise ValueError(f"need num_train >= 1 and num_test in [0, 5000], got {num_train}, {num_test}")
        if "{text}" not in template:
            raise ValueError(f"template must contain {{text}}, got {template!r}")
        self.seed, self.template, self.system_prompt = seed, template, system_prompt
        rng = random.Random(f"json-test-{seed}")
        test: dict[str, Row] = {}
        while len(test) < num_test:
            row = self._draw(rng)
            test.setdefault(row["text"], row)
        self._test = list(test.values())
        self._held_out = set(test)
        self._train = _GeneratedRows(num_train, self._train_row)

    def _draw(self, rng: random.Random) -> Row:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        facts = {"name": f"{first} {last}", "age": rng.randint(18, 80), "city": rng.choice(CITIES),
                 "occupation": rng.choice(JOBS)}
        text = rng.choice(SENTENCES).format(name_first=first, **facts)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": self.template.format(text=text)})
        return {"prompt": messages, "text": text, "answer": json.dumps(facts)}

    def _train_row(self, index: int) -> Row:
        rng = random.Random(f"json-train-{self.seed}-{index}")
        row = self._draw(rng)
        while row["text"] in self._held_out:
            row = self._draw(rng)
        return row

    def train_rows(self) -> Sequence[Row]:
        return self._train

    def test_rows(self) -> Sequence[Row]:
        return self._test

    def reward_functions(self) -> Mapping[str, RewardFn]:
        return {"fields": JsonSchema(SCHEMA, answer_key="answer", name="fields")}
