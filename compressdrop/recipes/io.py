"""Reading and writing recipe files, and the recipes that ship in ``recipes/``."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import RECIPES_DIR, Recipe, RecipeError

__all__ = ["DEFAULT_RECIPE", "dump_recipe", "list_recipes", "load_recipe", "recipe_path"]

DEFAULT_RECIPE = "lenet300-lognormal"


def list_recipes() -> list[str]:
    """Names of the shipped recipes (files ``recipes/NAME.yaml``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise RecipeError(
        f"{name_or_path}: no such recipe file, and not a shipped recipe (shipped: {', '.join(list_recipes())})"
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe; YAML syntax errors report their line and column."""
    path = recipe_path(name_or_path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{path}: invalid YAML at {where}: {problem}") from None
    return Recipe.from_dict(data, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text (``load_recipe`` of it gives the same recipe back)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
