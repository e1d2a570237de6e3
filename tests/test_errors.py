"""compressdrop.CompressDropError is the base of every error the package raises on purpose, and the
CLI turns those (and file-system errors) into one line, leaving real bugs their traceback."""

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

import compressdrop as cd
from compressdrop.checkpoint import CheckpointError
from compressdrop.cli import main
from compressdrop.data.images import ImageFolderError
from compressdrop.errors import DataError, InputError
from compressdrop.export import ExportError, ExportMismatchError
from compressdrop.pruning import SurgeryError
from compressdrop.recipes import RecipeError
from compressdrop.training.runner import TrainingDiverged

PACKAGE = Path(cd.__file__).parent
# Still raised directly, on purpose: TypeError for a wrong kind of object passed in code (a
# programming error, not bad input) and the file system's FileNotFoundError / PermissionError (the
# CLI reports OSError in one line too).


@pytest.mark.parametrize(
    "cls",
    [
        CheckpointError,
        InputError,
        DataError,
        ImageFolderError,
        RecipeError,
        SurgeryError,
        ExportError,
        ExportMismatchError,
        TrainingDiverged,
    ],
)
def test_every_error_class_derives_from_the_base(cls):
    assert issubclass(cls, cd.CompressDropError)


def test_no_bare_builtin_error_is_raised_in_the_package():
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                if name in {"ValueError", "RuntimeError", "KeyError", "Exception"}:
                    bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno} raise {name}")
    assert not bare, "raise a CompressDropError subclass instead:\n" + "\n".join(bare)


def test_the_cli_reports_our_errors_in_one_line_and_keeps_a_bug_s_traceback(monkeypatch):
    res = CliRunner().invoke(main, ["eval", "nope.pt"])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "no such file" in res.output

    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr("compressdrop.workflows.precision.load_model", bug)
    res = CliRunner().invoke(main, ["eval", "nope.pt"])
    assert isinstance(res.exception, RuntimeError)  # not swallowed into "Error: ..."
