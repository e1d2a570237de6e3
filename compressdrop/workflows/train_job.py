"""The ``train`` job: a recipe run end to end, in this process or as one rank of a ``torchrun``
launch (:func:`~compressdrop.training.runner.run_recipe` does the work). Like the jobs of
:mod:`compressdrop.workflows.jobs`, it returns plain data and raises
:class:`~compressdrop.CompressDropError` subclasses for what a user can fix.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..arch import Factory
from ..data import absolute_spec, load_dataset
from ..recipes import DEFAULT_RECIPE, Recipe, load_recipe
from ..training.runner import RunResult, TrainingDiverged, run_recipe
from .jobs import Progress, _quiet

__all__ = ["train"]


def train(
    recipe: str | Recipe | None = None,
    *,
    data: str | None = None,
    out: str | Path = "runs/latest",
    resume: bool = False,
    seed: int | None = None,
    precision: str | None = None,
    compile: str | None = None,
    device: str = "auto",
    factory: Factory | str | None = None,
    trust_code: bool = False,
    progress: Progress = _quiet,
) -> RunResult | None:
    """Run a recipe end to end (see :func:`~compressdrop.training.runner.run_recipe`), in this
    process or as one rank of a ``torchrun`` launch.

    Args:
        recipe: a shipped name, a YAML file or a :class:`Recipe` (``None``: the default recipe).
        data: a data spec (``digits``, ``FILE.npz``, ``images:DIR``…) replacing the recipe's.
        out: the output folder.
        resume: continue from ``out/checkpoint.pt``.
        seed / precision / compile: replace the recipe's (``compile``: a ``torch.compile``
            backend, e.g. ``"inductor"``).
        device: ``auto``, ``cpu`` or ``cuda``.
        factory / trust_code: consent to the factory the recipe names (see
            :mod:`compressdrop.arch`).
        progress: called with each event of the run (recipe when it is the default, stage,
            epoch, pruned, done).

    Returns:
        The run's files and report on rank 0 (or a single process); ``None`` on other ranks.
    """
    from ..training.distributed import from_env, shutdown

    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe or DEFAULT_RECIPE)
    if seed is not None:
        r = r.replace(seed=seed)
    if precision is not None:
        r = r.replace(precision=precision)
    if compile is not None:
        r = r.replace(compile=compile)
    if data is not None:
        r = r.override({"data.name": absolute_spec(data)})
    ds = load_dataset(r.data.name)  # its labels: checked by run_recipe before any work
    clean = False  # every rank ends the same way: finished, or diverged at the same agreed step
    fresh = not Path(out).exists()  # a run stopped before it wrote anything leaves no folder
    try:
        dist, dev = from_env(device)
        if recipe is None and dist.is_main:  # said, as prune says its default
            progress({"event": "recipe", "recipe": r, "default": True, "job": "train"})
        result = run_recipe(
            r,
            ds,
            out,
            device=dev,
            resume=resume,
            progress=progress,
            dist=dist,
            factory=factory,
            trust_code=trust_code,
        )
        clean = True
    except TrainingDiverged:
        clean = True
        raise
    finally:
        progress({"event": "done"})
        shutdown(clean=clean)
        if fresh and not clean:
            with contextlib.suppress(OSError):  # not empty: a checkpoint to resume from
                Path(out).rmdir()
    return result if dist.is_main else None
