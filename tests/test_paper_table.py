"""benchmarks/paper_table.py --quick: the whole comparison pipeline (three trainings per seed, classifier,
every sampler row, step cost, grids, tables) at toy size. Its figures are not results."""
import json

import torch

import paper_table


def test_quick_pipeline_reports_every_row(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = paper_table.main(["--quick", "--out", str(tmp_path / "out"), "--seeds", "0", "1"])
    finally:
        torch.set_num_threads(threads)  # main() sets --threads for this process
    rows = {(r["model"], r["nfe"], r["seed"]) for r in result["rows"]}
    for name, (_, _, nfes) in paper_table.METHODS.items():
        for nfe in nfes:
            assert (name, nfe, 0) in rows
            assert ((name, nfe, 1) in rows) == (nfe <= 4)  # 50 Euler steps on the first seed only
    assert all(0 <= r["agreement"] <= 1 and r["frechet"] > 0 and r["n"] == 100 for r in result["rows"])
    assert 0 < result["real"]["agreement"] <= 1 and result["real"]["frechet"] > 0
    assert set(result["step_cost"]) == {"FM", "SoFlow", "MeanFlow"}
    assert all(s > 0 and b != 0 for s, b in result["step_cost"].values())
    text = (tmp_path / "out" / "results.md").read_text()
    assert text.count("\n| SoFlow |") == 3 and "| FM | euler | 50 | 0 |" in text and "held-out accuracy" in text
    assert "| MeanFlow | meanflow | 1 | 0, 1 |" in text
    for name in ("soflow_1nfe", "meanflow_1nfe", "meanflow_2nfe", "fm_1nfe", "fm_50nfe"):
        assert (tmp_path / "out" / f"paper_table_{name}.png").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["quick"] is True
