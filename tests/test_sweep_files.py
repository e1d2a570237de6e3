"""``write_sweep`` writes its table, record and plot as a set: a failure leaves the old set."""

import pytest
from matplotlib.figure import Figure

from compressdrop.evaluation.sweep import SweepRow, write_sweep


def _rows(accuracy: float) -> list[SweepRow]:
    return [
        SweepRow(
            threshold=t,
            source="threshold",
            architecture="4-8",
            units=12 - t,
            accuracy=accuracy - t / 100,
            nll=0.3,
            params=1000 - 100 * t,
            flops=5000 - 500 * t,
            onnx_bytes=4000,
            latency_ms=0.1,
            latency_batch=1,
            threads=1,
            provider="cpu",
            device="cpu",
            pareto=True,
        )
        for t in (0, 1, 2)
    ]


def test_a_failed_plot_leaves_the_previous_set_whole_and_no_temporary_files(tmp_path, monkeypatch):
    paths = write_sweep(_rows(0.9), tmp_path)
    before = {k: p.read_bytes() for k, p in paths.items()}

    def broken(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="the plot failed"):
        write_sweep(_rows(0.5), tmp_path)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]
    monkeypatch.undo()
    write_sweep(_rows(0.5), tmp_path)
    assert all(paths[k].read_bytes() != before[k] for k in ("csv", "json", "png"))


def test_the_sweep_table_tells_close_thresholds_apart(capsys):
    """After a short training every SNR sits near its initial value: the table printed nine rows
    of "145" for thresholds from 144.983822 to 144.984421 (four significant digits)."""
    from dataclasses import asdict, replace

    from compressdrop.reporting import sweep_text

    base = _rows(0.9)
    thresholds = [0.0, 1.0, 144.983822, 144.984039, 144.98407, 144.984421]
    rows = [asdict(replace(base[0], threshold=t)) for t in thresholds]
    sweep_text({"rows": rows, "title": "m", "dense": None, "files": {}}, 1, 1)
    lines = capsys.readouterr().out.splitlines()
    cells = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert len(set(cells)) == len(thresholds) and [float(c) for c in cells[:2]] == [0.0, 1.0]
    assert all(abs(float(c) - t) < 1e-3 for c, t in zip(cells, thresholds, strict=True))


def test_the_progress_lines_tell_close_thresholds_apart_as_the_table_does():
    """The table had been fixed, but ``compressdrop sweep``'s progress lines still printed each
    threshold at four digits ("threshold 145" twice) and "acc" for byte-level text, where the
    table reads bits per byte."""
    from dataclasses import replace

    import torch
    from torch import nn

    import compressdrop as cd
    from compressdrop.evaluation.sweep import sweep, threshold_labels
    from compressdrop.reporting import sweep_line

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    cd.attach(net, example_inputs=x[:2])
    said: list[str] = []
    rows = sweep(net, x, y, [144.983822, 144.984039], latency_batch=2, repeats=1,
                 progress=lambda row, label: said.append(sweep_line(row, label)))  # fmt: skip
    labels = threshold_labels([r.threshold for r in rows])
    assert labels == ["0", "144.9838", "144.984"]
    assert [line.split(":")[0] for line in said] == [f"threshold {label}" for label in labels]
    assert all(f"acc {r.accuracy:.4f}" in line for r, line in zip(rows, said, strict=True))
    text = replace(rows[0], bits_per_byte=2.3456)
    assert sweep_line(text, "0") == f"threshold 0: {text.architecture} bits/byte 2.3456"
