"""Where runs happen: here (one after another, or one worker per GPU), on Ray, or on Slurm."""

from .base import Executor, Outcome, Task, tasks_for

__all__ = ["Executor", "Outcome", "Task", "tasks_for"]
