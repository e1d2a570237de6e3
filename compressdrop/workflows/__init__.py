"""The jobs compressdrop does, as functions shared by the CLI, the Python API and the tests:
train a recipe, bring in and sparsify a user's model, prune, export, evaluate and sweep it.

:mod:`compressdrop.cli` is a thin layer over these; the recipe runner, the Lightning callback and
:func:`prune_file` all finish a model through :func:`compressdrop.training.finish.finish`.
"""

from ..training.finish import SLIM_FORMATS, SlimFiles, finish, prune_summary, write_slim
from .evaluate import evaluate_file, sweep_file
from .jobs import PruneResult, check_writable, export_file, load_fitting, prune_file
from .precision import PrecisionWarning
from .sparsify import adopt, default_recipe_for, fit_input_shape, sparsify_and_prune
from .train_job import train

__all__ = [
    "SLIM_FORMATS",
    "PrecisionWarning",
    "PruneResult",
    "SlimFiles",
    "adopt",
    "check_writable",
    "default_recipe_for",
    "evaluate_file",
    "export_file",
    "finish",
    "fit_input_shape",
    "load_fitting",
    "prune_file",
    "prune_summary",
    "sparsify_and_prune",
    "sweep_file",
    "train",
    "write_slim",
]
