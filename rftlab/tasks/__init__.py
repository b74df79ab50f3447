"""Built-in verifiable tasks and loaders for users' own data."""

from rftlab.tasks.arithmetic import Arithmetic
from rftlab.tasks.base import RowsTask, Task

__all__ = ["Arithmetic", "RowsTask", "Task"]
