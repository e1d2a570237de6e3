"""``torch.export`` programs (``.pt2``) in: checked so that loading runs no code, then turned into
modules that compressdrop can gate and prune.

**Safety.** ``torch.export.load`` is not safe on an untrusted file (PyTorch 2.13,
``torch/export/pt2_archive`` and ``torch/_export/serde``): a weight, constant or custom object
marked ``use_pickle`` is unpickled with ``weights_only=False``; sample inputs that fail the
weights-only unpickler are retried with full pickle; symbolic shape expressions are parsed with
``sympy.sympify``, which evaluates Python; ``guards_code`` strings become Python that runs on every
call; a node's target may name any attribute of ``torch`` (``torch.load``, ``torch.hub.load``, ...);
an AOTInductor entry is a compiled library. :func:`load_program_safely` reads the archive's JSON and
payload tables first and refuses all of these, then loads the program with the guards dropped
(they only re-check input shapes). The graph runs once at load (the batch-size check), so its
ATen and prims calls must be on an allowlist (:mod:`._ops`): the operators real models'
programs call and torch's core opset, less gradient kernels and others whose CPU kernels
crashed or read out of bounds on arguments a file can give; the few that real models need
though their kernels trust their arguments' shapes (``lstm``, ``gru``, ``rnn_tanh``,
``scaled_dot_product_attention``) are called through shape checks (:mod:`._checked`).

**Modules.** :func:`program_to_module` turns the ATen calls that are layers (``linear``,
``conv1d/2d/3d``, ``batch_norm``, ``layer_norm``, ``embedding``) back into the ``nn`` modules they
came from, at the program's own parameter names, so that Torch-Pruning's dependency graph and the
surgery see ordinary layers. A ``view``/``reshape`` that flattens everything after the batch
dimension becomes ``flatten(x, 1)``, so that it still fits once channels are removed.

**Layout.** :mod:`._source` reads a path once (no FIFO), :mod:`.safety` checks archives
(:mod:`._ops` lists the operators they may call), :mod:`.load` loads them, :mod:`.convert` turns
programs into modules (its risky operators through :mod:`._checked`, its inputs' shapes checked
by :mod:`._inputs`), :mod:`.records` ties them to compressdrop's ``arch`` records.
"""

# ProgramModule and Source: importable from here as before, though not in __all__
from .convert import ProgramModule as ProgramModule
from .convert import program_to_module
from .load import load_program_safely
from .records import ProgramWarning, load_program, program_record
from .safety import Source as Source
from .safety import check_pt2_archive, is_pt2

__all__ = [
    "ProgramWarning",
    "check_pt2_archive",
    "is_pt2",
    "load_program",
    "load_program_safely",
    "program_record",
    "program_to_module",
]
