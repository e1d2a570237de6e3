"""Uncertainty: Monte-Carlo prediction from dropout layers and learned gates, from gated and from
slim models, the metrics that judge it, and inputs under dataset shift.

* :mod:`.mc` — :func:`mc_mode`, :func:`mc_predict`, :func:`mc_evaluate` (samples stacked in one
  batch where the noise allows);
* :mod:`.slim` — :func:`keep_noise` (a pruned model whose kept units keep their learned noise) and
  :class:`MCSampler` (all samples in one pass), :func:`export_mc_onnx` (an ONNX graph that samples);
* :mod:`.onnx_mc` — :func:`mc_evaluate_onnx`: the same metrics from such a graph in onnxruntime;
* :mod:`.metrics` — NLL, ECE, Brier score, AUROC and temperature scaling;
* :mod:`.shift` — rotations and corruptions at rising intensity.

Reference: Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in
Deep Learning", ICML 2016; Ovadia et al., "Can You Trust Your Model's Uncertainty? Evaluating
Predictive Uncertainty Under Dataset Shift", NeurIPS 2019.
"""

from .mc import (
    MCPrediction,
    deterministic_probs,
    has_noise,
    mc_evaluate,
    mc_mode,
    mc_predict,
    mc_samples,
    per_example,
    scores,
)
from .metrics import auroc, brier, expected_calibration_error, fit_temperature, nll
from .onnx_mc import mc_evaluate_onnx, onnx_mc_samples
from .shift import SHIFTS, resize_images, shifted
from .slim import MCSampler, export_mc_onnx, keep_noise

__all__ = [
    "SHIFTS",
    "MCPrediction",
    "MCSampler",
    "auroc",
    "brier",
    "deterministic_probs",
    "expected_calibration_error",
    "export_mc_onnx",
    "fit_temperature",
    "has_noise",
    "keep_noise",
    "mc_evaluate",
    "mc_evaluate_onnx",
    "mc_mode",
    "mc_predict",
    "mc_samples",
    "nll",
    "onnx_mc_samples",
    "per_example",
    "resize_images",
    "scores",
    "shifted",
]
