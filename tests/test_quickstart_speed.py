"""benchmarks/quickstart_speed.py: the step cost it reads from train.py's log, and the commands it times
(digits_quality.train_command)."""
import sys

import pytest

import quickstart_speed
from digits_quality import train_command

LOG = """starting a new run in /tmp/x on 1 rank(s), device cpu
saved checkpoint /tmp/x/ckpts/0.pt
Step 100 | Vel_MSE 0.2301 | Con_MSE 0.2413 | Grad_Norm 0.8061 | Peak_Mem 0.90GiB | Img/s 708.4 (354.2/rank) | Time 18.0s
Step 200 | Vel_MSE 0.1464 | Con_MSE 0.2121 | Grad_Norm 1.0346 | Peak_Mem 0.91GiB | Img/s 750.1 (375.1/rank) | Time 16.0s
Step 250 | Vel_MSE 0.1388 | Con_MSE 0.2060 | Grad_Norm 0.9580 | Peak_Mem 0.91GiB | Img/s 817.2 (408.6/rank) | Time 9.0s
saved checkpoint /tmp/x/ckpts/250.pt
"""


def test_step_cost_skips_the_warm_up_window(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(LOG)
    per_step, in_windows = quickstart_speed.step_cost(str(log))
    assert per_step == pytest.approx((16.0 + 9.0) / 150)  # windows 2 and 3 (100 + 50 steps)
    assert in_windows == pytest.approx(43.0)
    log.write_text(LOG.splitlines()[2] + "\n")
    with pytest.raises(SystemExit, match="fewer than two logging windows"):
        quickstart_speed.step_cost(str(log))


def test_layout_commands():
    one = train_command(1, "c.yaml")
    two = train_command(2, "c.yaml")
    assert one[0] == sys.executable and one[1].endswith("train.py") and one[2:] == ["--config", "c.yaml"]
    assert two[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in two and two[-2:] == ["--config", "c.yaml"]
