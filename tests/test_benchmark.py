"""experiments/benchmark.py runs end to end (tiny model) and records every figure it promises.

Only that it runs and reports: its speed figures belong to the benchmark's own records, never to a timed test.
"""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "experiments" / "benchmark.py"), "--model=unet", "--features=4",
           "--batch=8", "--size=32", "--dtype=float32", "--steps=1", "--windows=2", "--warmup=1",
           f"--out={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["devices"] == 8  # the conftest's fake CPU devices reach the child processes
    assert row["images_per_s"] > 0 and len(row["window_rates"]) == 2
    assert row["step_flops"] > 0
    assert 0 < row["first_step_warm_s"] and 0 < row["first_step_cold_s"]
    assert row["finite"]
    phases = ("imports", "data", "init", "wait_compile_train", "first_step_run", "compile_eval")
    for kind in ("cold", "warm"):
        assert tuple(row[f"first_step_{kind}_phases_s"]) == phases
        assert all(v >= 0 for v in row[f"first_step_{kind}_phases_s"].values())
    assert row["overlap"] and row["compile_s"] > 0
    assert "--xla_force_host_platform_device_count=8" in row["xla_flags"]
    assert row["machine"]["cpu_count"] and len(row["load_average_before_after"]) == 2
    assert len(row["git"]["git_commit"]) == 40 and "benchmark.py" in row["command"]
    assert "time to first step, cold cache" in result.stdout and "compile_eval" in result.stdout
    assert "anemia_jax" in result.stdout.splitlines()[-1]
