"""Training with gates: the KL schedule, a Sparsifier for your own loop, and the recipe runner."""

from ..recipes.schedule import KLSchedule
from .sparsifier import Sparsifier, param_groups

__all__ = ["KLSchedule", "Sparsifier", "param_groups"]
