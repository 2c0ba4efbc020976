"""benchmarks/gpu_report.py --smoke: every part of the GPU report runs at toy size on the CPU, into one report."""
import math
import re

import torch

import gpu_report
import step_variants


def report_parts(text):
    """{part name: its text} of a report whose parts all ran."""
    pieces = re.split(r"^## (.+) \(ok, \d+ s\)$", text, flags=re.M)
    return dict(zip(pieces[1::2], pieces[2::2]))


def table_column(text, column):
    """{first cell: value of `column`} of the Markdown table in `text`."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    index = rows[0].index(column)
    return {row[0]: row[index] for row in rows[2:]}


def test_smoke_report_has_every_part(tmp_path):
    """Every part ran and wrote its figures: the environment's torch, the tests' exit status, a finite positive
    loss per step variant, finite positive speeds and memory, and the precision chain's bit-for-bit self-check."""
    out = tmp_path / "report.md"
    assert gpu_report.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "No part failed." in text
    parts = report_parts(text)
    assert list(parts) == [name for name, _ in gpu_report.PARTS]
    environment = table_column(parts["environment"], "value")
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"
    assert "exit 0" in parts["tests"] and re.search(r"\b[1-9]\d* passed", parts["tests"])
    losses = {name: float(v) for name, v in table_column(parts["step cost"], "loss").items()}
    assert set(losses) == set(step_variants.VARIANTS)
    figures = [*losses.values()]
    for part, column in (("unet step", "images/s"), ("unet step", "peak GiB"), ("dump", "images/s"),
                         ("evaluator", "images/s")):
        values = [float(v) for v in table_column(parts[part], column).values()]
        assert values, (part, column)
        figures += values
    assert all(math.isfinite(v) and v > 0 for v in figures), figures
    self_check = re.search(r"max rel\. diff (\S+)", parts["precision"])
    assert self_check and float(self_check.group(1)) == 0.0


def test_failing_part_is_reported_and_the_next_runs(tmp_path):
    def broken(run):
        raise ValueError("deliberate")
    written = {}
    run = gpu_report.Run(gpu_report.parse_args(["--smoke"]))
    failed = gpu_report.run_parts(run, [("broken", broken), ("environment", gpu_report.part_environment)],
                                  lambda sections, failed: written.update(sections=list(sections)))
    assert failed == ["broken"]
    assert "ValueError: deliberate" in written["sections"][0] and "## environment (ok" in written["sections"][1]
