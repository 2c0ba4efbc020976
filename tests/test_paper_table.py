"""benchmarks/paper_table.py: the study at toy size (`--quick`: every run of RUNS trained 4 steps, scored at 2
checkpoints), its CSV, figures, resume and report-only redraw; and the report's arithmetic on written rows.
The quick figures are not results."""
import math
import os
import shutil

import pytest
import torch

import paper_table
from bench_util import log_windows
import paper_table_report as report

REQUIRED = ("method", "recipe", "guided", "seed", "step", "train_seconds", "nfe", "fd", "agreement")
FIGURES = ("paper_table_curves_1nfe.png", "paper_table_curves_2nfe.png", "paper_table_ablations.png")


def run_main(argv):
    threads = torch.get_num_threads()
    try:
        return paper_table.main(argv)
    finally:
        torch.set_num_threads(threads)  # main() sets --threads for this process


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_table") / "study"
    run_main(["--quick", "--out", str(out)])
    return out


def copy_study(quick_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(quick_study, out)
    for config in out.glob("runs/*/seed*/config.study.yaml"):  # the copied configs name the original folders
        config.write_text(config.read_text().replace(str(quick_study), str(out)))
    return out


def test_quick_study_writes_every_score(quick_study):
    rows = paper_table.read_csv(quick_study / "paper_table.csv")
    assert set(REQUIRED) <= set(rows[0])
    real = [r for r in rows if r["method"] == "real"]
    assert len(real) == 1 and real[0]["fd"] > 0 and 0.5 < real[0]["agreement"] <= 1
    scored = [r for r in rows if r["method"] != "real"]
    assert {r["method"] for r in scored} == {"soflow", "meanflow", "fm"}
    expected = {(run.variant, sampler, nfe, 0, step) for run in paper_table.RUNS
                if run.variant != paper_table.ABLATION_BASE  # the ablations run the headline's steps here
                for sampler, nfes in run.samplers.items() for nfe in nfes for step in (2, 4)}
    assert {(r["variant"], r["sampler"], r["nfe"], r["seed"], r["step"]) for r in scored} == expected
    assert len(scored) == len(expected)
    for r in scored:
        assert math.isfinite(r["fd"]) and r["fd"] > 0 and 0 <= r["agreement"] <= 1
        assert math.isfinite(r["train_seconds"]) and r["train_seconds"] >= 0 and r["num_samples"] == 100
    guided = {r["variant"]: r["guided"] for r in scored}
    assert guided["soflow-imagenet"] and guided["meanflow-guided"] and not guided["meanflow-unguided"]
    assert not guided["soflow-cifar"] and not guided["fm"] and not guided["ablation:unguided"]
    for name in FIGURES:
        assert (quick_study / name).stat().st_size > 1000
    text = (quick_study / "results.md").read_text()
    assert "### Regime" in text and "| fm, Euler 50 steps, seed 0 | 4 |" in text
    assert "| soflow-imagenet | soflow | 1 | 0 |" in text and "| p=0.5 | 1 | 0 |" in text


def test_run_configs_carry_each_recipe(quick_study):
    from config import load_config
    cfg = load_config(str(quick_study / "runs" / "soflow-imagenet" / "seed0" / "config.study.yaml"))
    assert (cfg.velocity_loss_ratio, cfg.p, cfg.eps, cfg.l_end_ratio, cfg.cfg_scale) == (0.75, 1.0, 0.01, 0.002, 3.0)
    assert cfg.total_steps == 4 and cfg.ckpt_saving_steps == 2 and cfg.seed == 0
    cfg = load_config(str(quick_study / "runs" / "soflow-cifar" / "seed0" / "config.study.yaml"))
    assert (cfg.velocity_loss_ratio, cfg.p, cfg.l_init_ratio, cfg.l_end_ratio) == (0.0, 0.75, 1.0, 0.0003125)
    cfg = load_config(str(quick_study / "runs" / "meanflow-guided" / "seed0" / "config.study.yaml"))
    assert cfg.method == "meanflow" and (cfg.meanflow_cfg_scale, cfg.meanflow_cfg_kappa) == (3.0, 0.0)
    cfg = load_config(str(quick_study / "runs" / "ablation-l_schedule_Const" / "seed0" / "config.study.yaml"))
    assert cfg.l_schedule == "Const" and cfg.velocity_loss_ratio == 0.75


def test_resume_reuses_finished_runs(quick_study, tmp_path):
    out = copy_study(quick_study, tmp_path)
    before = paper_table.read_csv(out / "paper_table.csv")
    redo = out / "runs" / "fm" / "seed0"
    (redo / "scores.csv").unlink()  # fm was trained but not scored: an interrupted study
    kept = out / "runs" / "soflow-cifar" / "seed0"
    files = [kept / "scores.csv", kept / "log.txt", *redo.glob("ckpts/*.pt")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    windows = len(log_windows(str(redo / "log.txt")))
    run_main(["--quick", "--out", str(out)])
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing retrained or rescored
    assert len(log_windows(str(redo / "log.txt"))) == windows  # fm's finished training not repeated
    assert (redo / "scores.csv").is_file()
    assert paper_table.read_csv(out / "paper_table.csv") == before  # the same weights score the same


def test_finished_only_reports_an_interrupted_study_without_training(quick_study, tmp_path):
    out = copy_study(quick_study, tmp_path)
    (out / "runs" / "fm" / "seed0" / "scores.csv").unlink()
    shutil.rmtree(out / "runs" / "soflow-cifar")  # never started
    run_main(["--quick", "--out", str(out), "--finished-only"])
    variants = {r["variant"] for r in paper_table.read_csv(out / "paper_table.csv")}
    assert "fm" not in variants and "soflow-cifar" not in variants and "soflow-imagenet" in variants
    assert not (out / "runs" / "fm" / "seed0" / "scores.csv").exists()
    assert not (out / "runs" / "soflow-cifar").exists()


def test_new_classifier_seed_rescores_without_retraining(quick_study, tmp_path):
    out = copy_study(quick_study, tmp_path)
    ckpts = list(out.glob("runs/*/seed0/ckpts/*.pt"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    run_main(["--quick", "--out", str(out), "--classifier-seed", "3"])
    rows = paper_table.read_csv(out / "paper_table.csv")
    assert {r["classifier_seed"] for r in rows} == {3} and [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert rows != paper_table.read_csv(quick_study / "paper_table.csv")  # another classifier, other agreements


def test_report_only_redraws_from_the_csv(quick_study, tmp_path):
    figures = tmp_path / "figures"
    text = run_main(["--quick", "--out", str(tmp_path / "report"), "--report-only",
                     "--csv", str(quick_study / "paper_table.csv"), "--figures", str(figures)])
    assert sorted(os.listdir(figures)) == sorted(FIGURES)
    assert text.startswith("### Regime") and text == (quick_study / "results.md").read_text().split("\nWall time")[0]
    assert not (tmp_path / "report" / "runs").exists()


def test_jobs_headline_seed_by_seed_then_ablations_with_their_reference():
    jobs = [(run.variant, seed) for run, seed in paper_table.study_jobs(paper_table.parse_args(
        ["--quick", "--seeds", "0", "1", "--ablation-seeds", "0", "1", "--ablation-steps", "2"]))]
    assert jobs[:2] == [("meanflow-guided", 0), ("meanflow-unguided", 0)] and jobs[5] == ("meanflow-guided", 1)
    assert {seed for _, seed in jobs[:5]} == {0} and jobs[10:12] == [("ablation:base", 0), ("ablation:base", 1)]
    assert len(jobs) == 10 + 2 * (len(paper_table.ABLATIONS) + 1)
    same_steps = paper_table.study_jobs(paper_table.parse_args(["--quick", "--ablation-seeds", "0", "1"]))
    assert [seed for run, seed in same_steps if run.variant == "ablation:base"] == [1]  # seed 0: soflow-imagenet


@pytest.mark.parametrize("preset", ["digits", "mnist-cuda"])
def test_every_run_config_of_the_presets_loads(preset, tmp_path):
    from config import load_config
    args = paper_table.parse_args(["--preset", preset, "--device", "cpu", "--out", str(tmp_path)])
    for run, seed in paper_table.study_jobs(args):
        cfg = load_config(paper_table.write_run_config(args, run, seed))  # the config checks of train.py
        assert cfg.total_steps == args.total_steps and cfg.ckpt_saving_steps * args.points == cfg.total_steps
        assert cfg.method == ("meanflow" if run.method == "meanflow" else "soflow") and cfg.seed == seed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(SystemExit):
        paper_table.parse_args(["--preset", "mnist-cuda"])


def test_report_only_without_csv_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        run_main(["--quick", "--out", str(tmp_path), "--report-only"])


# ----------------------------------------------------------------------------------------------------
# The report's arithmetic on written rows


def row(variant, sampler, nfe, seed, step, fd, agreement, method="soflow", seconds=1.0):
    return dict(method=method, recipe="r", variant=variant, guided=False, seed=seed, step=step,
                train_seconds=seconds * step, nfe=nfe, sampler=sampler, fd=fd, agreement=agreement)


def real(fd=0.1, agreement=0.95):
    return dict(method="real", recipe="heldout", variant="real", guided="", seed="", step="", train_seconds="",
                nfe="", sampler="", fd=fd, agreement=agreement)


def test_call_needs_every_seed_to_win():
    assert report.call([1.0, 2.0], [3.0, 4.0], lower_is_better=True) == "a"
    assert report.call([1.0, 3.5], [3.0, 4.0], lower_is_better=True) == "no call"
    assert report.call([0.9, 0.95], [0.5, 0.8], lower_is_better=False) == "a"
    assert report.call([0.5, 0.8], [0.9, 0.95], lower_is_better=False) == "b"


def test_regime_and_first_step_within_the_floor():
    rows = [real(0.1, 0.95)] + [row("fm", "euler", 50, 0, s, fd, 0.93, "fm") for s, fd in ((1, 0.5), (2, 0.19))]
    rows += [row("fm", "euler", 50, 1, s, fd, 0.85, "fm") for s, fd in ((1, 0.5), (2, 0.14))]
    table = report.regime_table(rows)
    assert "| fm, Euler 50 steps, seed 0 | 2 | 0.1900 | 1.90 | 0.930 | -0.020 | yes |" in table
    assert "| fm, Euler 50 steps, seed 1 | 2 | 0.1400 | 1.40 | 0.850 | -0.100 | no |" in table
    curve = report.curves(rows, "fm", "euler", 50)
    assert report.first_within(curve[0], 0.1) is None and report.first_within(curve[1], 0.1) == 2


def test_headline_table_means_and_seeds():
    rows = [real()] + [row("soflow-imagenet", "soflow", 1, seed, 4, fd, 0.9)
                       for seed, fd in ((0, 0.2), (1, 0.4))]
    table = report.headline_table(rows)
    assert "| soflow-imagenet | soflow | 1 | 0, 1 | 0.3000 (0.2000, 0.4000) | 0.900 (0.900, 0.900) |" in table


def test_train_seconds_add_up_windows_and_a_resumed_window_counts_once(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Step 2 | Vel_MSE 1.0 | Time 3.0s\nStep 4 | Vel_MSE 1.0 | Time 5.0s\n"
                   "resumed from 2\nStep 4 | Vel_MSE 1.0 | Time 6.0s\nStep 6 | Vel_MSE 1.0 | Time 1.5s\n")
    assert paper_table.train_seconds_by_step(str(log)) == {2: 3.0, 4: 9.0, 6: 10.5}


def test_num_samples_must_fit_the_floor():
    with pytest.raises(SystemExit, match="multiple of 10"):
        paper_table.check_num_samples(895, 899, 10)
    with pytest.raises(SystemExit, match="at most the 899"):
        paper_table.check_num_samples(900, 899, 10)
    paper_table.check_num_samples(890, 899, 10)
