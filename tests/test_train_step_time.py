"""benchmarks.train_step_time at a tiny shape: a well-formed, sane table (no timing goal)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_time_prints_one_row_per_candidate():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("JAX_ENABLE_X64", None)
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.train_step_time", "--size", "tiny", "--batch", "1",
       "--seq-len", "8", "--refresh-every", "2", "--periods", "2",
       "--only", "galore,galore_tracking_lazy"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header == ["candidate", "median ms", "p99 ms", "max ms", "max / median",
                    "wall median ms", "wall max / median"]
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert [r[0] for r in rows] == ["galore", "galore_tracking_lazy"]
  for row in rows:
    median, p99, worst, ratio, wall, wall_ratio = map(float, row[1:])
    assert 0 < median <= p99 <= worst
    # the table rounds times to 0.1 ms and the ratio (of the unrounded times) to 0.01
    assert abs(ratio - worst / median) <= ratio * (0.05 / median + 0.05 / worst) + 0.005
    assert wall > 0 and wall_ratio >= 1
  assert "## whole train step" in proc.stdout and "tiny scanned (2 layers" in proc.stdout
  assert "T = 2, 2×T measured steps" in proc.stdout
