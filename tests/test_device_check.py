"""scripts/device_check.py in its --cpu mode: every row's code runs (small), so the GPU check cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_device_check_script_is_valid_bash():
    run = subprocess.run(["bash", "-n", str(REPO / "scripts" / "device_check.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_device_check_cpu_mode_runs_every_row_and_prints_one_table(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--cpu", "--seeds", "0",
                          "--sample-steps", "5", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "gsplat parity", "avatar 512x512", "avatar 1920x1080", "paper fit", "default samples CUDA vs CPU",
        "fit-all nccl (world size 1)"]
    assert all(r.endswith("| skipped: no CUDA |") and r.count("|") == 5 for r in rows)
    # The rows' comparisons ran for real on their CPU partners: the PyTorch twin against the numba
    # rasterizer, and two CPU samplings of the same seed (identical).
    psnr, cos = map(float, re.search(r"PSNR min ([\d.]+) dB, grad cosine min ([\d.]+)", rows[0]).groups())
    assert psnr >= 40 and cos >= 0.99
    assert re.search(r"\d+\.\d+ ms/frame", rows[1]) and re.search(r"\d+\.\d+ ms/frame", rows[2])
    assert re.search(r"steps/s, loss [\d.]+ -> [\d.]+ over 10 steps", rows[3])
    assert "rendered PSNR min 99.0 dB" in rows[4] and "max abs diff 0.0e+00" in rows[4]
    assert "gloo on cpu: 2/2 subjects fitted" in rows[5]
