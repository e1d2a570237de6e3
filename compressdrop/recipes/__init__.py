"""Recipes: how pruning plugs into training, as validated YAML."""

from .config import (
    DataConfig,
    ExportConfig,
    GateConfig,
    ModelConfig,
    PruneConfig,
    Recipe,
    RecipeError,
    StageConfig,
    Stages,
)
from .io import DEFAULT_RECIPE, dump_recipe, list_recipes, load_recipe, recipe_path
from .schedule import KLSchedule

__all__ = [
    "DEFAULT_RECIPE",
    "DataConfig",
    "ExportConfig",
    "GateConfig",
    "KLSchedule",
    "ModelConfig",
    "PruneConfig",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "Stages",
    "dump_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_path",
]
