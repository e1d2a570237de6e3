"""Evaluation: accuracy and NLL, size (parameters, FLOPs, bytes) and latency."""

from .latency import LatencyReport, ort_latency, torch_latency
from .metrics import Metrics, evaluate
from .model_size import SizeReport, count_flops, count_gate_params, count_params, size

__all__ = [
    "LatencyReport",
    "Metrics",
    "SizeReport",
    "count_flops",
    "count_gate_params",
    "count_params",
    "evaluate",
    "ort_latency",
    "size",
    "torch_latency",
]
