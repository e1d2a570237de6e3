"""Reading and writing recipe files, and the recipes shipped inside the package.

The shipped recipes are package data (``compressdrop/recipes/shipped/NAME.yaml``), read through
:mod:`importlib.resources`, so they are found wherever and however the package is installed
(a wheel, an editable install, a zip).
"""

from __future__ import annotations

import atexit
import contextlib
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .._io import opened
from .config import Recipe, RecipeError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["DEFAULT_RECIPE", "dump_recipe", "list_recipes", "load_recipe", "recipe_path"]

DEFAULT_RECIPE = "lenet300-lognormal"
_MOST_BYTES = 256 << 10  # a recipe's file; the shipped ones hold about 1 KB

#: The folder of shipped recipes, as package data (not necessarily a real directory).
SHIPPED_RECIPES: Traversable = resources.files(__package__).joinpath("shipped")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` and ``5E2`` as numbers as YAML 1.2 does (YAML 1.1,
    which PyYAML follows, wants a dot: ``1.0e-3``; without it they were strings, refused as
    ``gates.kwargs`` or ``gates.kl_scale`` values). An alias may name a scalar (``*lr``), not a
    list or mapping: forty nested aliases of a 1 KB file unfold into 2**40 values when the
    recipe is checked and printed (a recipe that never loads)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if isinstance(node, yaml.CollectionNode):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"*{event.anchor} repeats a list or mapping; recipes take aliases of single "
                    "values only (write the list or mapping out)",
                    event.start_mark,
                )
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

# Real paths of shipped recipes that had to be extracted (a zipped install) stay valid until exit.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def list_recipes() -> list[str]:
    """Names of the shipped recipes (package data ``compressdrop/recipes/shipped/NAME.yaml``)."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in SHIPPED_RECIPES.iterdir()
        if p.name.endswith(".yaml") and p.is_file()
    )


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path (a user's own YAML), or the name of a shipped recipe.

    Args:
        name_or_path: a path to a YAML file, or a name from :func:`list_recipes`.

    Returns:
        A real file path; for a shipped recipe, a path into the installed package (or a temporary
        copy that lives until the interpreter exits, when the package is not on a file system).
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = SHIPPED_RECIPES.joinpath(f"{name_or_path}.yaml")
    if p.name == str(name_or_path) and shipped.is_file():  # a bare name: no path into the package
        return _extracted.enter_context(resources.as_file(shipped))
    raise RecipeError(
        f"{name_or_path}: no such recipe file, and not a shipped recipe (shipped: {', '.join(list_recipes())})"
    )


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe; YAML syntax errors report their line and column."""
    path = recipe_path(name_or_path)
    with opened(path, RecipeError) as f:  # one bounded read: a file swapped in after a check
        raw = f.read(_MOST_BYTES + 1)
    if len(raw) > _MOST_BYTES:  # PyYAML reads some scalars in quadratic time
        raise RecipeError(f"{path}: over {_MOST_BYTES:,} bytes; a recipe holds at most 256 KB")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects
    except (RecursionError, ValueError) as e:  # nested past the limit; an int of 5,000 digits
        raise RecipeError(f"{path}: not a recipe ({type(e).__name__}: {str(e)[:200]})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{path}: invalid YAML at {where}: {problem}") from None
    if data is None:  # an empty file would silently be the default recipe
        raise RecipeError(f"{path}: the recipe file is empty")
    return Recipe.from_dict(data, source=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text (``load_recipe`` of it gives the same recipe back)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
