"""TryAgain and WordleGame: hand-played episodes."""

import pytest

from rftlab.environments import TryAgain, WordleGame
from rftlab.tasks import Arithmetic


def test_try_again_answers_until_correct_and_decays_the_reward():
    task = Arithmetic()
    row = dict(task.test_rows()[0])
    env = TryAgain(task, max_attempts=3, decay=0.5)
    assert env.reset(row) is None  # the task's own prompt opens the episode
    first = env.step("I think it is -1")
    assert not first.done and first.observation == [{"role": "user", "content": "That is not right. Try again."}]
    final = env.step(f"It is {row['answer']}")
    assert final.done and final.reward == 0.5 and env.stats() == {"attempts": 2.0}
    env.reset(row)
    for _ in range(2):
        assert not env.step("no idea").done
    last = env.step("still no idea")
    assert last.done and last.reward == 0.0


@pytest.mark.parametrize("kwargs, name", [(dict(max_attempts=0), "max_attempts"), (dict(decay=0.0), "decay")])
def test_try_again_refuses_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TryAgain(Arithmetic(), **kwargs)


def test_wordle_game_gives_feedback_and_ends_on_the_secret():
    env = WordleGame(max_guesses=3)
    opening = env.reset({"secret": "crane"})
    assert opening[-1]["content"] == "Make your first guess. You have 3 guesses."
    miss = env.step("<think>common letters</think><guess>trace</guess>")
    assert not miss.done and miss.observation[0]["content"].startswith("TRACE -> T(x) R(✓) A(✓) C(-) E(✓)")
    assert "2 guesses left" in miss.observation[0]["content"]
    invalid = env.step("crane?")
    assert not invalid.done and "no <guess>word</guess> found" in invalid.observation[0]["content"]
    win = env.step("<guess>CRANE</guess>")
    assert win.done and win.reward == 1.0 and env.stats() == {"guesses": 3.0, "solved": 1.0}
    env.reset({"secret": "crane"})
    for _ in range(2):
        env.step("<guess>hello</guess>")
    assert env.step("<guess>world</guess>").done
    with pytest.raises(ValueError, match="secret"):
        env.reset({"answer": "x"})
