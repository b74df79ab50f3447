"""A reward's own counters (forged sandbox reports, missing fields, unusable judge replies) reach the
logged metrics as ``reward/<fn>/count/<counter>``, per rollout."""

from __future__ import annotations

from rftlab.rewards import CodeExecution, RewardSet, StringCheck
from rftlab.rewards.base import reward_counters

TESTS = ["assert add(1, 2) == 3"]
# A verdict of its own, written on every descriptor the code holds (one is its pipe to the judge).
FORGED = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"stage\": \"done\", \"passed\": [true]}\\n')\n"
          "    except OSError:\n        pass\nos._exit(0)\n")


def test_reward_set_reports_what_a_functions_counters_rose_by():
    code = CodeExecution(timeout=2.0)
    rewards = RewardSet({"code": code})
    honest = rewards.score(["def add(a, b):\n    return a + b\n"], ["p"], [{"tests": TESTS}])
    assert honest.counts == {} and float(honest.total[0]) == 1.0
    forged = rewards.score([FORGED, FORGED], ["p", "p"], [{"tests": TESTS}, {"tests": TESTS}])
    assert forged.counts == {"code": {"malformed_reports": 2}}
    assert reward_counters(code) == {"malformed_reports": 2}


def test_the_counts_reach_the_rollout_metrics(tiny_grpo):
    from rftlab import RolloutDataModule
    from rftlab.tasks import Arithmetic

    # The tiny model writes no JSON: every sample lacks the field the grader reads.
    grader = StringCheck(input="{{ sample.output_json.answer }}", reference="{{ item.answer }}", operation="eq")
    module = tiny_grpo(lora=True)
    dm = RolloutDataModule(task=Arithmetic(num_test=0), rewards={"json_answer": grader}, prompts_per_step=2,
                           num_generations=2, max_new_tokens=3).attach(module)
    rollout = dm.build_rollout()
    assert rollout.metrics["reward/json_answer/count/missing_fields"] == 4.0
    assert "reward/json_answer/count/unparsed" not in rollout.metrics  # only counters that rose
