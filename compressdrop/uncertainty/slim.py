"""Monte-Carlo prediction from a slim model: the kept units keep their learned noise.

:func:`keep_noise` turns a pruned model back into a stochastic one, at the slim model's size;
:class:`MCSampler` draws all of a batch's samples in one forward pass (and in an exported graph).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..dropout import DropConnect, RecurrentDropout, StochasticLayer
from ..errors import InputError
from ..export import ExportError, ExportReport
from ..gating import input_specs_of, is_gated, named_gates, random_inputs, sites
from ..gating.experts_gated import refuse_noise
from ..gating.gated import HeadGated
from ..gating.inputs import run_example
from ..gating.noisy import NoisySite, noisy_sites, prepare_attention, share_samples
from ..pruning import mask_
from ..runtime import logits_of
from .mc import has_noise, mc_mode

__all__ = ["MCSampler", "export_mc_onnx", "keep_noise"]


def keep_noise(
    gated: nn.Module,
    slim: nn.Module,
    threshold: float | None = None,
    *,
    layers: Sequence[str] | None = None,
    uniform: bool | None = None,
) -> nn.Module:
    """A copy of ``slim`` whose kept units carry their gates' learned noise again.

    Each layer the gated model gated gets a :class:`~compressdrop.gating.noisy.NoisySite` with
    the gate restricted to the units the pruning kept. In eval mode the result computes exactly
    what ``slim`` computes; in :func:`compressdrop.uncertainty.mc_mode` each kept unit is
    multiplied by θ/E[θ] (E[θ] is folded into the slim weights), so a forward pass draws from the
    gated model's posterior over the kept units.

    Args:
        gated: the gated model ``slim`` was pruned from (unchanged).
        slim: the result of :func:`compressdrop.prune` on ``gated`` (unchanged).
        threshold: the threshold of that pruning; by default the one its ``prune_report``
            records.
        layers: the gates whose noise stays, by the names :func:`~compressdrop.gating.named_gates`
            gives them (every layer a shared gate serves keeps it); ``None``: all. Fewer, later
            gates make sampling cheaper (:class:`MCSampler` repeats after the last noise-free
            layer) at the price of a narrower posterior.
        uniform: whether that pruning kept as many units in every layer of a stack; by default
            what its ``prune_report`` records.

    Returns:
        The noisy slim model, in eval mode, with ``slim``'s ``prune_report``.

    Raises:
        InputError: ``gated`` has no gates, ``layers`` names no gate of it, or a gated layer's
            kept units do not match the slim layer (``slim`` was not pruned from ``gated`` at
            this threshold).
    """
    if not is_gated(gated):
        raise InputError("keep_noise needs the gated model the slim model was pruned from")
    names = [n for n, _ in named_gates(gated)]
    unknown = sorted(set(layers or ()) - set(names))
    if unknown or (layers is not None and not layers):
        raise InputError(f"layers must name gates of the model ({names}), got {list(layers or [])}")
    report = getattr(slim, "prune_report", None)
    if threshold is None:
        threshold = getattr(report, "threshold", None)
    if uniform is None:
        uniform = bool(getattr(report, "uniform", False))
    refuse_noise(gated, layers)  # fused experts (gating/experts.py)
    masked = mask_(copy.deepcopy(gated), threshold, uniform=uniform)
    uses: dict[int, int] = {}
    for _, site in sites(masked):
        uses[id(site.gate)] = uses.get(id(site.gate), 0) + 1
    subsets: dict[int, Any] = {}
    for name, g in named_gates(masked):
        if layers is not None and name not in layers:
            continue
        sub = g.select(~g.pruned).eval()
        sub.shared = uses[id(g)] > 1
        subsets[id(g)] = sub
    out = copy.deepcopy(slim).eval()
    for name, site in sites(masked):
        if id(site.gate) not in subsets:
            continue
        head_dim = site.head_dim if isinstance(site, HeadGated) else None
        attention = site.attention if isinstance(site, HeadGated) else None
        if attention is not None:
            prepare_attention(out, attention)
        try:
            layer = out.get_submodule(name)
        except AttributeError:
            raise InputError(
                f"the slim model has no layer {name!r} that the gated model gated"
            ) from None
        out.set_submodule(
            name, NoisySite(layer, subsets[id(site.gate)], site.unit_dim, head_dim, attention)
        )
    share_samples(out)
    _check_fit(out, gated)
    return out


@torch.no_grad()
def _check_fit(noisy: nn.Module, gated: nn.Module) -> None:
    """One sampling pass on the gated model's recorded inputs (the random state left as it
    was): a slim model pruned from another gated model (or at another threshold) has layers of
    other widths than the gates' kept units. Any other failure is left to sampling to report."""
    specs = input_specs_of(gated)
    if not specs:
        return
    try:
        with torch.random.fork_rng(devices=[]), mc_mode(noisy):
            noisy(*random_inputs(specs, 2))
    except InputError as e:
        if "noisy site has" in str(e):
            raise InputError(
                "the slim model does not fit the gated model's kept units (was it pruned from "
                f"another model, or at another threshold?): {e}"
            ) from None
    except Exception:  # the model's own failure: sampling reports it, as before
        pass


class _DrawnDropout(nn.modules.dropout._DropoutNd):
    """``nn.Dropout`` (``spatial`` = 0) or ``nn.Dropout{1,2,3}d`` with its mask drawn by
    ``rand_like``: exported, it samples (ONNX ``RandomUniformLike``), where the exporter writes a
    stock dropout as an inference-mode ``Dropout`` node, which onnxruntime runs as the identity."""

    def __init__(self, p: float, spatial: int) -> None:
        super().__init__(p)
        self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with elements (channels, for the ``Nd`` kinds) zeroed with probability ``p``,
        the rest scaled by 1 / (1 − p); ``x`` itself outside training mode."""
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        k = min(self.spatial, x.dim() - 2)  # (N, C, L) under Dropout2d: its channels, as torch
        u = torch.rand_like(x[(Ellipsis,) + (slice(0, 1),) * k] if k else x)
        return x * (u >= self.p).to(x.dtype) / (1 - self.p)


def _draw_dropout_masks(model: nn.Module) -> nn.Module:
    """``model`` with every stock dropout layer replaced by a :class:`_DrawnDropout`.

    Raises:
        InputError: an alpha dropout (its draw has no export here).
    """
    kinds = {nn.Dropout: 0, nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3}
    for name, m in list(model.named_modules()):
        if type(m) in kinds:
            drawn = _DrawnDropout(m.p, kinds[type(m)])
            if not name:
                return drawn
            model.set_submodule(name, drawn)
        elif isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
            raise InputError(
                f"{name or 'the model'}: {type(m).__name__} cannot be sampled in an exported graph"
            )
    return model


class MCSampler(nn.Module):
    """``samples`` Monte-Carlo passes of a stochastic classifier as one batched forward pass.

    ``forward(x)`` returns the softmax probabilities of every sample, ``(samples, B, C)``. The
    input is repeated ``samples`` times along the batch, unless ``example`` shows that the model
    may be repeated later: then the first noisy site in execution order repeats its own output,
    and the layers before it run once per input (LeNet-5's convolutions under noise on the
    dense layers only, say). That is used only when the model, run that way with the noise at
    its mean, gives exactly the input-repeated outputs on ``example``.

    Keep the wrapped model in :func:`~compressdrop.uncertainty.mc_mode` (or its gates in training
    mode) while sampling, and export this module to get a graph that samples by itself.

    Args:
        model: a classifier with :class:`~compressdrop.gating.noisy.NoisySite` s (from
            :func:`keep_noise`), or any model with per-example noise; a copy is kept.
        samples: passes per input, at least 1.
        example: an input batch (at least 2 examples) to check the later repeat on, or ``None``.

    Raises:
        InputError: ``samples`` < 1; DropConnect (one weight mask per pass) or an alpha
            dropout.
    """

    def __init__(self, model: nn.Module, samples: int, example: torch.Tensor | None = None) -> None:
        super().__init__()
        if samples < 1:
            raise InputError(f"samples must be ≥ 1, got {samples}")
        if any(isinstance(m, DropConnect) for m in model.modules()):
            raise InputError(
                "the model has DropConnect, whose one weight mask is shared by a whole batch: "
                "its samples cannot be stacked in one batch; draw them one pass each with "
                "compressdrop.uncertainty.mc_samples"
            )
        self.model = copy.deepcopy(model)
        config = getattr(self.model, "config", None)
        if getattr(config, "use_cache", None):  # a Hugging Face LM: logits, no key/value cache
            config.use_cache = False  # type: ignore[union-attr]
        self.model = _draw_dropout_masks(self.model)
        self.samples = int(samples)
        self.late_repeat = example is not None and self._repeat_late(example)
        for _, site in noisy_sites(self.model):
            site.prepare_export()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``(samples, B, C)`` of ``samples`` stochastic passes over ``x``.

        The noise samples whatever the module's own mode (the wrapped model runs in
        :func:`~compressdrop.uncertainty.mc_mode`), so an exported graph samples too.
        """
        if not self.late_repeat:
            x = x.repeat(self.samples, *([1] * (x.dim() - 1)))
        with mc_mode(self.model):
            logits = logits_of(self.model(x))
        return torch.softmax(logits.float().unflatten(0, (self.samples, -1)), -1)

    @torch.no_grad()
    def _repeat_late(self, example: torch.Tensor) -> bool:
        found: list[nn.Module] = [m for _, m in noisy_sites(self.model)]
        if not found or len(example) < 2:
            return False
        # the other noise sources too: one that runs before the first site would be drawn once
        # per input and shared by its samples
        other = (nn.modules.dropout._DropoutNd, StochasticLayer, RecurrentDropout)
        found += [m for m in self.model.modules() if isinstance(m, other)]
        order: list[nn.Module] = []
        hooks = [
            m.register_forward_pre_hook(
                lambda mod, _a: order.append(mod) if mod not in order else None
            )
            for m in found
        ]
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            want = logits_of(self.model(example.repeat(self.samples, *([1] * (example.dim() - 1)))))
            for h in hooks:
                h.remove()
            hooks = []
            first = order[0]
            if not isinstance(first, NoisySite) or first.head_dim is not None:
                return False
            first.tile = self.samples
            try:
                got = logits_of(self.model(example))
            except (RuntimeError, TypeError, AttributeError):
                got = None
            ok = (
                isinstance(got, torch.Tensor)
                and got.shape == want.shape
                and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6))
            )
            if not ok:
                first.tile = 1
            return ok
        finally:
            for h in hooks:
                h.remove()
            for m, was in modes:
                m.training = was


def export_mc_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    samples: int = 30,
    *,
    providers: str = "auto",
    repeat_late: bool = True,
) -> ExportReport:
    """Export a noisy slim model as an ONNX graph that draws ``samples`` Monte-Carlo samples.

    The graph takes a batch ``x`` (dynamic batch size; token ids ``(batch, length)`` with a
    dynamic length too, as :func:`~compressdrop.export.export_onnx`'s ``check_lengths``, where
    that exports: else it is fixed, with a warning) and returns the softmax probabilities of
    every sample, ``(samples, batch, classes)``; its random draws are standard ONNX operators
    (``RandomUniformLike``, ``RandomNormalLike``), so any runtime samples anew on every call. The
    samples are stacked in one batch (see :class:`MCSampler`). Metadata: ``mc_samples`` and
    ``mc_output``, besides the slim model's.

    Check: onnxruntime's per-input mean probabilities must agree with PyTorch's within six
    standard errors (at least 64 samples each) on ``example`` (token ids: at half its length
    too); the file appears only if they do.

    Args:
        model: from :func:`keep_noise` (or any model whose noise draws per example).
        example: an input batch (at least 2 examples).
        path: the ``.onnx`` file to write.
        samples: samples per call, at least 1.
        providers: onnxruntime providers, as for :func:`~compressdrop.export.export_onnx`.
        repeat_late: let the graph run the layers before the first noise once per input where
            that is exact (:class:`MCSampler`); False repeats the input (for comparison).

    Raises:
        InputError: the model has no noise, or does not run on ``example``.
        ExportError: the exporter failed, or onnxruntime's samples disagree with PyTorch's.
    """
    from ..export._check import token_lengths

    if not has_noise(model):  # a NoisySite holds a gate
        raise InputError("the model has no noise to sample; build it with keep_noise()")
    run_example(model, (example,), "example")  # an input that does not fit: named
    sampler = MCSampler(model, samples, example=example if repeat_late else None).cpu()
    x = example.detach().cpu()
    meta = {"mc_samples": str(samples), "mc_output": "probabilities (samples, batch, classes)"}
    report = getattr(model, "prune_report", None)
    if report is not None:
        meta.update(report.metadata())
    path = Path(path)
    lengths = token_lengths(x)  # token ids: the sequence length dynamic, as export_onnx's
    if not lengths:
        return _write_mc_onnx(sampler, x, path, meta, providers, ())
    try:
        return _write_mc_onnx(sampler, x, path, meta, providers, lengths)
    except ExportError as e:
        first = e
    fixed = _write_mc_onnx(sampler, x, path, meta, providers, ())
    warnings.warn(
        f"compressdrop: {path.name} takes token ids of length {x.shape[1]} only: a dynamic "
        f"length failed ({(str(first).splitlines() or [''])[0][:300]})",
        UserWarning,
        stacklevel=2,
    )
    return fixed


def _write_mc_onnx(
    sampler: MCSampler,
    x: torch.Tensor,
    path: Path,
    meta: dict[str, str],
    providers: str,
    lengths: tuple[int, ...],
) -> ExportReport:
    """:func:`export_mc_onnx`'s file, the sequence length dynamic with ``lengths`` (checked at
    ``x``'s and at each of them), checked by its Monte-Carlo mean before it appears."""
    from ..export import ExportWarning, export_onnx
    from ..runtime import ort_session

    with atomic_write(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)  # a fixed length: refused below, retried
        inner = export_onnx(
            sampler,
            x,
            tmp,
            metadata=meta,
            check_batch_sizes=(),
            providers=providers,
            dynamic_length=bool(lengths),
        )
        session, provider = ort_session(tmp, providers)
        name, shape = session.get_inputs()[0].name, session.get_inputs()[0].shape
        if lengths and isinstance(shape[1], int):  # the exporter may specialise it silently
            raise ExportError(f"the exporter fixed the sequence length at {shape[1]}")
        for xl in (x, *(x[:, :n] for n in lengths)):
            _check_mc_mean(sampler, lambda xl=xl: session.run(None, {name: xl.numpy()})[0], xl)
    return ExportReport(path, path.stat().st_size, provider, {}, inner.opset, inner.metadata)


def _check_mc_mean(sampler: MCSampler, draw: Any, x: torch.Tensor) -> None:
    """onnxruntime's per-input mean probabilities (``draw()``, at least 64 samples) against
    PyTorch's on ``x``, within six standard errors.

    Raises:
        ExportError: they differ, or their shapes do.
    """
    samples = sampler.samples
    runs = -(-64 // samples)
    got = torch.cat([torch.from_numpy(draw()) for _ in range(runs)])
    with torch.no_grad():
        want = torch.cat([sampler(x) for _ in range(runs)])
    if got.shape != want.shape:
        raise ExportError(
            f"onnxruntime gives samples of shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}"
        )
    n = len(got)
    bound = 6 * ((got.var(0) + want.var(0)) / n).sqrt() + 1e-4
    worst = float(((got.mean(0) - want.mean(0)).abs() / bound).max())
    if not worst <= 1:
        raise ExportError(
            f"onnxruntime's Monte-Carlo mean differs from PyTorch's by {6 * worst:.1f} standard "
            f"errors ({n} samples each, input shape {tuple(x.shape)})"
        )
