"""benchmarks.device_check runs on the CPU (the tiny preset), each method in its own process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_the_tiny_preset_on_the_cpu(tmp_path):
  out = tmp_path / "check.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("JAX_ENABLE_X64", None)
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.device_check", "--steps", "2", "--json", str(out),
       "--methods", "adamw-bf16", "adapter-nf4-8bit", "--budget-s", "840"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [(r["method"], r["kind"]) for r in rows] == [
      ("adamw-bf16", "ordinary"), ("adapter-nf4-8bit-r8", "ordinary"),
      ("adapter-nf4-8bit-r8", "merge")]
  for r in rows:
    assert r["status"] == "ok", r
    assert r["size"] == "tiny" and r["platform"] == "cpu"
    assert r["plan_peak_bytes"] > 0 and r["step_ms"] > 0
    assert "peak_bytes_in_use" in r  # None on the CPU, bytes on an accelerator
  for r in rows[:2]:  # random weights of std 0.02: nearly uniform logits over the 256 bytes
    assert abs(r["loss"] - math.log(256)) < 0.1
  # the NF4 base and 8-bit state plan below full-rank AdamW even at this size
  assert rows[1]["plan_peak_bytes"] < rows[0]["plan_peak_bytes"]
  assert "adapter-nf4-8bit-r8" in proc.stdout
