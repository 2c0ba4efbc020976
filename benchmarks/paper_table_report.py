"""The tables and learning-curve figures of benchmarks/paper_table.py, drawn from its CSV rows alone (so they can
be redrawn without retraining: `python benchmarks/paper_table.py --report-only`).

A difference between two rows is called a win only where the seeds' ranges do not overlap (every seed of one
row beats every seed of the other); otherwise "no call"."""
import os
import statistics

from bench_util import markdown_table

WITHIN_FLOOR = 1.5  # "comes within 1.5x of the floor" (the table's first-step column)
REGIME_FD, REGIME_AGREEMENT = 2.0, 0.05  # the regime's test: FM 50 steps within 2x the floor and 0.05 of accuracy
HEADLINE = ("soflow-imagenet", "soflow-cifar", "meanflow-guided", "meanflow-unguided", "fm")
BASE = "soflow-imagenet"
ABLATION_BASE = "ablation:base"  # soflow-imagenet at the ablations' steps and seeds


def real_row(rows):
    found = [r for r in rows if r["method"] == "real"]
    if len(found) != 1:
        raise SystemExit(f"the CSV needs exactly one `real` row, found {len(found)}")
    return found[0]


def curves(rows, variant, sampler, nfe):
    """{seed: [(step, train_seconds, fd, agreement)] by step} of one (variant, sampler, NFE)."""
    out = {}
    for r in rows:
        if r["variant"] == variant and r["sampler"] == sampler and r["nfe"] == nfe:
            out.setdefault(r["seed"], []).append((r["step"], r["train_seconds"], r["fd"], r["agreement"]))
    return {seed: sorted(points) for seed, points in sorted(out.items())}


def series(rows):
    """The (variant, sampler, NFE) triples present, in the CSV's order."""
    seen = []
    for r in rows:
        key = (r["variant"], r["sampler"], r["nfe"])
        if r["method"] != "real" and key not in seen:
            seen.append(key)
    return seen


def final(curve, index):
    """The value at the last scored step of each seed (index 2: FD, 3: agreement)."""
    return [points[-1][index] for points in curve.values()]


def first_within(points, floor):
    for step, _, fd, _ in points:
        if fd <= WITHIN_FLOOR * floor:
            return step
    return None


def spread(values, fmt):
    """'mean (v1, v2, ...)' over the seeds."""
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.mean(values)) + " (" + ", ".join(fmt.format(v) for v in values) + ")"


def call(a, b, lower_is_better):
    """'a' / 'b' where every value of one beats every value of the other, else 'no call'."""
    if not a or not b:
        return "-"
    if (max(a) < min(b)) if lower_is_better else (min(a) > max(b)):
        return "a"
    if (max(b) < min(a)) if lower_is_better else (min(b) > max(a)):
        return "b"
    return "no call"


# ----------------------------------------------------------------------------------------------------
# Tables


def regime_table(rows):
    """Flow matching's 50 Euler steps at the last step, per seed, against the floor and the accuracy."""
    real = real_row(rows)
    lines = [("real (A vs B; classifier on B)", "-", f"{real['fd']:.4f}", "1.00", f"{real['agreement']:.3f}", "-",
              "-")]
    for seed, points in curves(rows, "fm", "euler", 50).items():
        step, _, fd, agreement = points[-1]
        ok = fd <= REGIME_FD * real["fd"] and agreement >= real["agreement"] - REGIME_AGREEMENT
        lines.append((f"fm, Euler 50 steps, seed {seed}", step, f"{fd:.4f}", f"{fd / real['fd']:.2f}",
                      f"{agreement:.3f}", f"{agreement - real['agreement']:+.3f}", "yes" if ok else "no"))
    return markdown_table(("row", "step", "FD", "FD / floor", "class agreement", "vs accuracy",
                           f"within {REGIME_FD:g}x and {REGIME_AGREEMENT}"), lines, "lrrrrrl")


def headline_table(rows, variants=HEADLINE):
    """Per (variant, sampler, NFE): the final FD and agreement (mean, each seed), the first step within 1.5x the
    floor of each seed, and the training seconds of the last step."""
    floor = real_row(rows)["fd"]
    lines = []
    for variant, sampler, nfe in series(rows):
        if variant not in variants or (variant == BASE and sampler == "meanflow"):  # the sampler ablation
            continue
        c = curves(rows, variant, sampler, nfe)
        firsts = ", ".join(str(first_within(p, floor) or "never") for p in c.values())
        lines.append((variant, sampler, nfe, ", ".join(str(s) for s in c), spread(final(c, 2), "{:.4f}"),
                      spread(final(c, 3), "{:.3f}"), firsts, f"{statistics.mean(final(c, 1)):.0f}"))
    return markdown_table(("run", "sampler", "NFE", "seeds", "FD (last step)", "class agreement (last step)",
                           f"first step within {WITHIN_FLOOR}x floor", "train s"), lines, "llrlrrll")


def comparison_table(rows):
    """Each SoFlow recipe against each MeanFlow recipe at 1 and 2 NFE (the methods' own samplers)."""
    lines = []
    for soflow in ("soflow-imagenet", "soflow-cifar"):
        for meanflow in ("meanflow-guided", "meanflow-unguided"):
            for nfe in (1, 2):
                a, b = curves(rows, soflow, "soflow", nfe), curves(rows, meanflow, "meanflow", nfe)
                names = {"a": soflow, "b": meanflow, "no call": "no call", "-": "-"}
                lines.append((soflow, meanflow, nfe, names[call(final(a, 2), final(b, 2), True)],
                              names[call(final(a, 3), final(b, 3), False)]))
    return markdown_table(("SoFlow run", "MeanFlow run", "NFE", "lower FD (all seeds)",
                           "higher agreement (all seeds)"), lines, "llrll")


def ablation_table(rows):
    """Each ablation against soflow-imagenet on the ablation's seeds, at 1 and 2 NFE."""
    lines = []
    ablations = [v for v, s, n in series(rows)
                 if v.startswith("ablation:") and v != ABLATION_BASE and s == "soflow" and n == 1]
    for variant in ablations:
        for nfe in (1, 2):
            c = curves(rows, variant, "soflow", nfe)
            reference = ABLATION_BASE if curves(rows, ABLATION_BASE, "soflow", nfe) else BASE  # BASE: same steps
            base = {s: p for s, p in curves(rows, reference, "soflow", nfe).items() if s in c}
            if not base:
                continue  # an interrupted study without the reference run of these seeds
            fd, base_fd = final(c, 2), final(base, 2)
            verdict = {"a": "better", "b": "worse", "no call": "within spread", "-": "-"}[call(fd, base_fd, True)]
            lines.append((variant.split(":", 1)[1], nfe, ", ".join(str(s) for s in c), spread(fd, "{:.4f}"),
                          spread(base_fd, "{:.4f}"), spread(final(c, 3), "{:.3f}"),
                          spread(final(base, 3), "{:.3f}"), verdict))
    sampler = curves(rows, BASE, "meanflow", 2)
    if sampler:
        base = curves(rows, BASE, "soflow", 2)
        verdict = {"a": "better", "b": "worse", "no call": "within spread", "-": "-"}[
            call(final(sampler, 2), final(base, 2), True)]
        lines.append(('sampler="meanflow" (same weights)', 2, ", ".join(str(s) for s in sampler),
                      spread(final(sampler, 2), "{:.4f}"), spread(final(base, 2), "{:.4f}"),
                      spread(final(sampler, 3), "{:.3f}"), spread(final(base, 3), "{:.3f}"), verdict))
    return markdown_table(("change from soflow-imagenet", "NFE", "seeds", "FD", "FD of soflow-imagenet",
                           "agreement", "agreement of soflow-imagenet", "FD call"), lines, "lrlrrrrl")

def report_tables(rows):
    return "\n\n".join(f"### {title}\n\n{table}" for title, table in (
        ("Regime", regime_table(rows)), ("Headline", headline_table(rows)), ("Wins", comparison_table(rows)),
        ("Ablations", ablation_table(rows))))


# ----------------------------------------------------------------------------------------------------
# Figures


def plot_band(ax, curve, x_index, y_index, label, style):
    """The mean over seeds as a line and the seeds' min-max as a band, at the steps every seed has; x is the
    seeds' median (training seconds of a seed that ran on a loaded machine do not pull the line)."""
    import numpy as np
    steps = set.intersection(*({point[0] for point in p} for p in curve.values()))
    kept = [[point for point in p if point[0] in steps] for p in curve.values()]
    values = np.array([[point[y_index] for point in p] for p in kept])
    x = np.median(np.array([[point[x_index] for point in p] for p in kept]), axis=0)
    line, = ax.plot(x, values.mean(0), style, label=label, marker=".")
    ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)


def curve_figure(rows, nfe, entries, path, title):
    """A 2 x 2 figure (FD and agreement against steps and training seconds), one line per entry
    (label, variant, sampler, NFE), the seeds as a band; the real-data rows dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    real = real_row(rows)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for col, (x_index, xlabel) in enumerate(((0, "training step"), (1, "training seconds (train.py log)"))):
        for row, (y_index, ylabel, ref) in enumerate(((2, "Frechet distance (64 px)", real["fd"]),
                                                      (3, "class agreement", real["agreement"]))):
            ax = axes[row, col]
            for k, (label, variant, sampler, n) in enumerate(entries):
                c = curves(rows, variant, sampler, n)
                if c:
                    plot_band(ax, c, x_index, y_index, label, "--" if n == 50 else "-")
            ax.axhline(ref, color="k", ls=":", label="real data")
            if y_index == 2:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title + "; training seconds: the seeds' median")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def report_figures(rows, folder):
    """The learning-curve PNGs: the headline runs at 1 and at 2 NFE, and the ablations. Returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for nfe in (1, 2):
        entries = [(f"{v} ({s})", v, s, nfe) for v, s, n in series(rows) if v in HEADLINE and n == nfe]
        entries += [("fm, Euler 50 (ceiling)", "fm", "euler", 50)]
        paths.append(curve_figure(rows, nfe, entries, os.path.join(folder, f"paper_table_curves_{nfe}nfe.png"),
                                  f"{nfe} NFE: mean over training seeds, band = min to max"))
    entries = [(f"{v.split(':', 1)[-1]} ({s}, {n} NFE)", v, s, n) for v, s, n in series(rows)
               if (v.startswith("ablation:") or (v == BASE and s == "soflow")) and n == 1]
    entries += [('soflow-imagenet, sampler="meanflow" (2 NFE)', BASE, "meanflow", 2),
                ("soflow-imagenet (soflow, 2 NFE)", BASE, "soflow", 2)]
    paths.append(curve_figure(rows, 1, entries, os.path.join(folder, "paper_table_ablations.png"),
                              "Ablations of soflow-imagenet: mean over training seeds, band = min to max"))
    return paths
