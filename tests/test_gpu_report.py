"""benchmarks/gpu_report.py --smoke: every part of the GPU report runs at toy size on the CPU, into one report."""
import gpu_report


def test_smoke_report_has_every_part(tmp_path):
    out = tmp_path / "report.md"
    assert gpu_report.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "No part failed." in text
    for name, _ in gpu_report.PARTS:
        assert f"## {name} (ok, " in text, name
    assert "| torch |" in text and "images/s" in text


def test_failing_part_is_reported_and_the_next_runs(tmp_path):
    def broken(run):
        raise ValueError("deliberate")
    written = {}
    run = gpu_report.Run(gpu_report.parse_args(["--smoke"]))
    failed = gpu_report.run_parts(run, [("broken", broken), ("environment", gpu_report.part_environment)],
                                  lambda sections, failed: written.update(sections=list(sections)))
    assert failed == ["broken"]
    assert "ValueError: deliberate" in written["sections"][0] and "## environment (ok" in written["sections"][1]
