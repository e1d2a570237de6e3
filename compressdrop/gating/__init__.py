"""Attach gates to any PyTorch model (and detach them)."""

from .attention import MultiheadAttention
from .experts_gated import ExpertsGated  # registers the wrapper of fused experts
from .gated import (
    Gated,
    HeadGated,
    attach,
    attach_config,
    detach,
    example_input_for,
    example_inputs_of,
    groups_of,
    input_shapes_of,
    input_specs,
    input_specs_of,
    is_gated,
    kl,
    named_gates,
    random_inputs,
    sites,
)
from .groups import GatingWarning, Site, UnitGroup, find_groups
from .heads import HeadSpec, register_attention
from .packed_mlp_gated import PackedMLPGated  # registers the wrapper of packed MLPs
from .record import gate_sites
from .recurrent import GatedLSTM  # registers compressdrop.dropout.LSTM's layer spec
from .registry import LayerSpec, register_layer, spec_of

__all__ = [
    "ExpertsGated",
    "Gated",
    "GatedLSTM",
    "GatingWarning",
    "HeadGated",
    "HeadSpec",
    "LayerSpec",
    "MultiheadAttention",
    "PackedMLPGated",
    "Site",
    "UnitGroup",
    "attach",
    "attach_config",
    "detach",
    "example_input_for",
    "example_inputs_of",
    "find_groups",
    "gate_sites",
    "groups_of",
    "input_shapes_of",
    "input_specs",
    "input_specs_of",
    "is_gated",
    "kl",
    "named_gates",
    "random_inputs",
    "register_attention",
    "register_layer",
    "sites",
    "spec_of",
]
