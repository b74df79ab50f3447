"""Built-in verifiable tasks and loaders for users' own data."""

from rftlab.tasks.arithmetic import Arithmetic, BigArithmetic, FinalTurnAnswer
from rftlab.tasks.base import RowsTask, Task
from rftlab.tasks.coding import CodeFunctions
from rftlab.tasks.countdown import Countdown, CountdownEquation
from rftlab.tasks.curriculum import Curriculum
from rftlab.tasks.json_extraction import JsonExtraction
from rftlab.tasks.loader import DatasetTask, gsm8k_answer, read_rows
from rftlab.tasks.reasoning_gym import GymScore, ReasoningGym
from rftlab.tasks.word_problems import WordProblems
from rftlab.tasks.wordle import Wordle, WordleCorrect, WordleFormat, WordlePartial, WordleStrategy

__all__ = [
    "Arithmetic", "BigArithmetic", "CodeFunctions", "Countdown", "CountdownEquation", "Curriculum", "DatasetTask", "FinalTurnAnswer", "GymScore", "JsonExtraction", "ReasoningGym", "RowsTask",
    "Task", "Wordle", "WordleCorrect", "WordleFormat", "WordlePartial", "WordleStrategy", "WordProblems", "gsm8k_answer", "read_rows",
]
