"""What a person watching training sees: on a terminal, the breakdown drawn as two bars on one
scale (measured over predicted); piped, one unwrapped line per logged step with elapsed time
and ETA."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from conftest import MICRO, zhilu
from zhilu.monitor.progress import BAR_WIDTH, breakdown_bars

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_bars_share_one_scale_and_show_each_terms_share() -> None:
    record = {"step_time_s": 0.2, "breakdown": {"forward": 0.05, "backward": 0.1, "optimizer": 0.05},
              "predicted_step_time_s": 0.1, "predicted": {"compute": 0.08, "optimizer": 0.02}}
    console = Console(width=200, record=True, color_system="truecolor")
    console.print(breakdown_bars(record, "straggler: rank 1"))
    measured, predicted, straggler = console.export_text().splitlines()[:3]
    assert measured.startswith("measured") and predicted.startswith("predicted")
    assert measured.count("█") == BAR_WIDTH and predicted.count("█") == BAR_WIDTH // 2  # half the time, half the bar
    assert "200 ms  fwd 25% bwd 50% opt 25%" in measured and "100 ms  compute 80% opt 20%" in predicted
    assert straggler == "straggler: rank 1"


def test_piped_output_is_one_line_per_logged_step_with_elapsed_and_eta(tmp_path: Path) -> None:
    result = zhilu("train", *MICRO, "--steps", "4", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    for line in lines:  # longer than a terminal's 80 columns, never wrapped
        assert re.search(r"ms/step \(predicted \d+\).* elapsed \d:\d\d:\d\d  ETA \d:\d\d:\d\d$", line), line
    assert max(map(len, lines)) > 80
    assert "█" not in result.stdout


def test_a_terminal_shows_the_bar_and_the_breakdown_measured_over_predicted(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "zhilu", "train", *MICRO, "--steps", "6",
                             "--out", str(tmp_path / "run")], stdin=secondary, stdout=secondary, stderr=secondary,
                            env=env, close_fds=True)
    os.close(secondary)
    out = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 240)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(primary, 1 << 16)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0, out[-3000:]
    screen = ANSI.sub("", out.decode(errors="replace"))
    assert re.search(r"train .*6/6", screen), screen[-3000:]
    assert re.search(r"measured +█+ +\d+ ms  (data \d+% )?fwd \d+% bwd \d+%", screen), screen[-3000:]
    assert re.search(r"predicted +█* +\d+ ms  compute \d+%", screen), screen[-3000:]
    assert not re.search(r"^step +\d+/6", screen, re.M)  # the bar, not log lines
