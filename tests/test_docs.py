"""README.md and docs/: every relative link resolves (file and #anchor), and README states the test command
exactly as .ci/run runs it."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _without_fences(path):
    """The page without its fenced code blocks (their '#' lines are not headings, their brackets not links)."""
    with open(path) as f:
        return re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)


def _anchors(path):
    """GitHub's heading anchors of a Markdown page: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", _without_fences(path), flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(re.sub(r"`[^`\n]*`", "", _without_fences(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            broken.append(f"{target} (no file {os.path.relpath(full, ROOT)})")
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links: {broken}"


def quick_start_commands():
    """The command lines of README.md's quick-start code block."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## Quick start", 1)[1]
    return [line.strip() for line in re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).splitlines()
            if line.strip()]


def test_readme_quick_start_is_what_ci_runs():
    """Two commands: the first installs the training requirements alone and trains the demo; the second adds the
    evaluator's requirements and pytest and runs the suite, and .ci/run runs it exactly as README gives it."""
    first, second = quick_start_commands()
    assert "-r requirements_soflow.txt" in first and "requirements_soflow_eval" not in first and "pytest" not in first
    assert first.endswith("python train.py --config configs/digits_demo.yaml")
    assert "-r requirements_soflow_eval.txt" in second and second.endswith("python -m pytest -q tests")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f]
    assert second in ci, f".ci/run must run README's second quick-start command `{second}` as written"
    assert any("-r requirements_soflow.txt" in line for line in ci[:ci.index(second)])  # and the first's install


def test_config_files_named_in_the_docs_exist():
    """Every configs/X.yaml that README.md or docs/ name exists, the release's names among them (its README trains
    configs/imagenet.yaml and configs/cifar.yaml)."""
    named = set()
    for page in PAGES:
        with open(page) as f:
            named.update(re.findall(r"configs/([\w.-]+\.yaml)", f.read()))
    assert {"imagenet.yaml", "cifar.yaml"} <= named
    missing = sorted(name for name in named if not os.path.isfile(os.path.join(ROOT, "configs", name)))
    assert not missing, f"configs named in the docs but absent: {missing}"


def test_an_interrupted_demo_loses_under_a_minute():
    """The digits demo checkpoints at least once a minute of a 2-core CPU's work (the step time docs/digits_demo.md
    states), and keeps its newest checkpoints only."""
    import yaml
    with open(os.path.join(ROOT, "docs", "digits_demo.md")) as f:
        seconds_per_step = float(re.search(r"([\d.]+) s a step", f.read()).group(1))
    with open(os.path.join(ROOT, "configs", "digits_demo.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert cfg["ckpt_saving_steps"] * seconds_per_step < 60 and cfg["ckpt_keep_last"] >= 1
    assert cfg["total_steps"] % cfg["ckpt_saving_steps"] == 0
