"""Where runs happen: here (one after another, or one worker per GPU), on Ray, or on Slurm.

Executors import nothing from the sweep: they are given the task function to call.
"""

from .base import Executor, Outcome, Task, TaskFunction

__all__ = ["Executor", "Outcome", "Task", "TaskFunction"]
