"""The in-memory classification data set every loader returns, and the seeded stratified split."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import DataError

__all__ = ["MEMORY_SHARE", "DataWarning", "Dataset", "available_memory", "beyond_memory"]

#: the share of the available memory a data set's tensors may take when it loads (the
#: train/test split and training copy them again)
MEMORY_SHARE = 0.4


#: where :func:`available_memory` reads the kernel's view (tests point them at a fake tree)
PROC, CGROUP = Path("/proc"), Path("/sys/fs/cgroup")
#: a cgroup memory limit at or above this is no limit (cgroup v1 writes "none" as 2^63 − 4096)
_NO_LIMIT = 2**60
#: a group's limit, usage and (in ``memory.stat``) file cache, in cgroup v2 and v1
_V2 = ("memory.max", "memory.current", "file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")


def available_memory() -> int | None:
    """Bytes of memory this process may still take, or None where the system does not say: the
    smaller of Linux's ``MemAvailable`` and the room left under the memory limit of the process's
    control group (a container's or a job's: its own ``MemAvailable`` is the host's, and the
    limit is where the out-of-memory killer acts). The room counts the group's file cache as
    free, since the kernel reclaims it before killing anything."""
    sizes = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(sizes) if sizes else None


def _meminfo_available() -> int | None:
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """The least room under the memory limits of this process's cgroup and its ancestors
    (v2: ``memory.max`` − ``memory.current`` + ``file`` of ``memory.stat``; v1, the memory
    controller's: ``memory.limit_in_bytes`` − ``memory.usage_in_bytes`` + ``total_cache``), or
    None where no limit is set or none can be read."""
    try:
        lines = (PROC / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":  # v2's unified hierarchy
            rooms += _rooms(CGROUP, path, *_V2)
        elif "memory" in controllers.split(","):
            rooms += _rooms(CGROUP / "memory", path, *_V1)
    return min(rooms) if rooms else None


def _rooms(base: Path, path: str, limit: str, usage: str, cache: str) -> list[int]:
    """The room under each limit from the group at ``path`` up to ``base`` (inside a container
    the path may name the host's hierarchy, absent here: then ``base`` itself is the group)."""
    group = base / path.strip("/")
    rooms = []
    for d in [group, *group.parents]:
        if not d.is_relative_to(base):
            break
        try:
            text = (d / limit).read_text().strip()
            if text != "max" and int(text) < _NO_LIMIT:
                stat = dict(ln.split(" ", 1) for ln in (d / "memory.stat").read_text().splitlines())
                used = int((d / usage).read_text()) - int(stat.get(cache, 0))
                rooms.append(max(int(text) - max(used, 0), 0))
        except (OSError, ValueError):
            pass
    return rooms


def beyond_memory(need: int, what: str, how: str) -> str | None:
    """Why ``need`` bytes (``what``, held ``how``) are too many to load, or None: more than
    :data:`MEMORY_SHARE` of :func:`available_memory` (never where the system does not say)."""
    free = available_memory()
    if free is None or need <= MEMORY_SHARE * free:
        return None
    return (
        f"{what} take {need / 2**30:.1f} GB {how}, more than {MEMORY_SHARE:.0%} of the "
        f"{free / 2**30:.1f} GB of memory available"
    )


class DataWarning(UserWarning):
    """A loader changed the user's data to read it (e.g. channels-last images transposed), or the
    data do not suit what is asked of them (too few examples for the default recipe's gates to
    learn); the message says what, and what to change."""


@dataclass(frozen=True)
class Dataset:
    """A classification data set held as tensors: inputs float32 ``(N, *input_shape)``, labels int64.

    ``classes`` names the classes in label order where the source has names (an image folder's
    class folders), else it is empty.

    Raises:
        DataError: on construction, for an empty split, lengths or example shapes that differ, or
            labels that are not int64 in ``[0, num_classes)``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] = ()
    #: ``"classify"``: one label per example; ``"lm"``: a label per position (next-token targets)
    task: ClassVar[str] = "classify"

    def __post_init__(self) -> None:
        if self.classes and len(self.classes) != self.num_classes:
            raise DataError(
                f"classes names {len(self.classes)} classes but num_classes is {self.num_classes}"
            )
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) < 1:
                raise DataError(f"x_{split} is empty")
            if len(x) != len(y):
                raise DataError(f"x_{split} has {len(x)} examples but y_{split} has {len(y)}")
            if y.dtype != torch.int64:
                raise DataError(f"y_{split} must be int64 labels, got {y.dtype}")
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DataError(f"y_{split} has labels outside [0, {self.num_classes})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"x_train examples {tuple(self.x_train.shape[1:])} and x_test examples "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    def split_validation(self, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Carve a stratified validation split out of the training set.

        The test set is never used.

        Args:
            fraction: share of each class's training examples moved to validation.
            seed: of the draw.

        Returns:
            ``(train, val)``: ``train`` keeps the rest of the training examples (and the real test
            set); ``val``'s "test" tensors are the validation examples.

        Raises:
            DataError: ``fraction`` is not in (0, 1), or it rounds to no example in every class.
        """
        if not 0 < fraction < 1:
            raise DataError(f"fraction must be in (0, 1), got {fraction}")
        gen = torch.Generator().manual_seed(seed)
        val_idx = []
        for c in range(self.num_classes):
            idx = (self.y_train == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            val_idx.append(idx[: round(len(idx) * fraction)])
        v = torch.cat(val_idx).sort().values
        if len(v) == 0:
            raise DataError(
                f"{self.name}: a validation fraction of {fraction} of {len(self.y_train)} training "
                f"examples rounds to none in every class; raise it, add data, or set it to 0 "
                f"(the recipe's data.val_fraction)"
            )
        keep = torch.ones(len(self.y_train), dtype=torch.bool)
        keep[v] = False
        train = replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep])
        val = replace(
            train, name=f"{self.name}/val", x_test=self.x_train[v], y_test=self.y_train[v]
        )
        return train, val

    def in_class_order(self, names: Sequence[str] | None) -> Dataset:
        """This data set with its labels renumbered to a model's outputs: by name where the model
        records its classes (``names``: a model trained on an image folder since 2026-12-06), so
        that a folder holding some of the classes scores against the right outputs; else as they
        are, the sorted folder names' positions (how training labels a folder), with a
        :class:`DataWarning` where the folders are numbers that say otherwise (``3/``, ``7/``).

        Raises:
            DataError: a class whose name is not among ``names``.
        """
        if not self.classes:
            return self
        if names:
            unknown = [c for c in self.classes if c not in names]
            if unknown:
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                known = ", ".join(list(names)[:10]) + (", ..." if len(names) > 10 else "")
                raise DataError(
                    f"{self.name}: class {unknown[0]!r}{more} is not one the model was trained on "
                    f"({known}); name the class folders as in training"
                )
            target, k, classes = [list(names).index(c) for c in self.classes], len(names), names
        else:
            numbers = [int(c) if c.isdecimal() else None for c in self.classes]
            if numbers != list(range(self.num_classes)) and None not in numbers:
                warnings.warn(
                    f"compressdrop: {self.name}: the model records no class names, so the class "
                    f"folders {', '.join(self.classes[:6])}{', ...' if len(numbers) > 6 else ''} "
                    f"are labelled by their sorted position 0..{self.num_classes - 1} (as "
                    "training on a folder labels them), not by their numbers",
                    DataWarning,
                    stacklevel=2,
                )
            return self
        if target == list(range(self.num_classes)) and k == self.num_classes:
            return self
        order = torch.tensor(target)
        return replace(
            self,
            y_train=order[self.y_train],
            y_test=order[self.y_test],
            num_classes=k,
            classes=tuple(classes),
        )

    def subset(self, n_train: int, n_test: int) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test examples (for tests and smoke runs)."""
        return replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, where: str = "data"):
    """A stratified train/test split; its preconditions checked first, so that the error names
    ``where`` (the file) instead of coming from scikit-learn."""
    from sklearn.model_selection import train_test_split

    labels, counts = np.unique(y, return_counts=True)
    if len(labels) and counts.min() < 2:
        c = labels[counts.argmin()]
        raise DataError(
            f"{where}: class {c} has 1 example; a stratified train/test split needs at least 2 "
            f"per class (or give x_test and y_test)"
        )
    n, k = len(y), len(labels)
    n_test = int(np.ceil(test_fraction * n))
    if n_test < k or n - n_test < k:
        raise DataError(
            f"{where}: a test fraction of {test_fraction} of {n} examples gives {n_test} test and "
            f"{n - n_test} training examples; each split needs at least one example of each of "
            f"the {k} classes (or give x_test and y_test)"
        )
    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)


def spec_options(
    spec: str, prefix: str, allowed: tuple[str, ...], usage: str, what: str = "path"
) -> tuple[str, dict[str, str]]:
    """``PREFIX:PATH[,key=value]...`` → ``(PATH, {key: value})``; ``usage`` and ``what`` (the
    path's name) for the message when the path is missing.

    Options are the trailing ``key=value`` parts, so a path may itself contain commas.

    Raises:
        DataError: an unknown or repeated option, or no path.
    """
    parts = spec.removeprefix(prefix).split(",")
    options: dict[str, str] = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, _, value = parts.pop().partition("=")
        key = key.strip()
        if key not in allowed or key in options:
            problem = "repeated" if key in options else "unknown"
            raise DataError(
                f"data {spec!r}: {problem} option {key!r} (options: {', '.join(allowed)})"
            )
        options[key] = value.strip()
    path = ",".join(parts)
    if not path:
        raise DataError(f"data {spec!r}: no {what}; use {usage}")
    return path, options
