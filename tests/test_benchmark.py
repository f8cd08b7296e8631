"""experiments/benchmark.py runs end to end (tiny model from a config) and records every figure it promises; its
command line fails with a message, never a traceback.

Only that it runs and reports: its speed figures belong to the benchmark's own records, never to a timed test.
"""

import json
import pathlib
import sys

import _children
import pytest

from anemia_jax.runs import config_lib
from experiments import benchmark, peer

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "tools" / "peer_bench.py"


def test_benchmark_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "experiments.benchmark", "--config=configs/unet.py:size=32,batch=8,dtype=float32",
           "--config.model.features=4", "--steps=1", "--windows=2", "--warmup=1", f"--out={out}"]
    result = _children.run(cmd, text=True, budget_s=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["devices"] == 8  # the conftest's fake CPU devices reach the child processes
    # The config and its override reached both children: U-Net of width 4, one head of one channel.
    assert row["arch"] == "unet features=4" and row["model"]["features"] == 4 and row["targets"] == ["palpebral"]
    assert row["params"] < 200_000 and (row["batch"], row["size"], row["dtype"]) == (8, 32, "float32")
    assert row["config"] == "configs/unet.py:size=32,batch=8,dtype=float32 --config.model.features=4"
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
    assert len(row["git"]["git_commit"]) == 40 and "-m experiments.benchmark --config=" in row["command"]
    assert "time to first step, cold cache" in result.stdout and "compile_eval" in result.stdout
    # The CPU reports no device memory: the process's peak resident memory stands in, marked in the table.
    assert row["peak_bytes"] is None and row["peak_host_rss_bytes"] > 50 * 2**20
    table = result.stdout.splitlines()
    assert "anemia_jax" in table[-2] and "*" in table[-2] and table[-1].startswith("* the process's peak resident")


def test_measured_config_is_the_peers_work():
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:size=64")
    measured = benchmark.benchmark_config(config, {})
    assert measured.targets == ("palpebral",) and measured.model.deep_supervision is False
    assert peer.framework(measured) == "torch"
    asked = benchmark.benchmark_config(config, {"model.deep_supervision": True})
    assert asked.model.deep_supervision is True
    resnet = benchmark.benchmark_config(config_lib.load_config_file(f"{ROOT}/configs/unetpp_resnet34.py:size=64"), {})
    assert peer.framework(resnet) == "smp"
    # The peer runs in this Python, or in another environment's (PyTorch beside, not inside, the project's).
    argv = peer.command(str(PEER), measured, "eager", steps=1, windows=1, warmup=0)
    assert argv[:2] == [sys.executable, str(PEER)]
    assert peer.command(str(PEER), measured, "eager", steps=1, windows=1, warmup=0, python="/torch/bin/python")[0] \
        == "/torch/bin/python"


@pytest.mark.parametrize("args, message", [
    (["--config=configs/unet.py", "--config.model.featurs=4"], "close keys: model.features"),
    (["--model=unet", "--batch=8"], "come from the config now"),
    (["--config=configs/segformer.py", f"--peer={PEER}"], "No PyTorch peer for segformer"),
    (["--config=configs/unetpp_resnet34.py", "--config.model.encoder=resnet50", f"--peer={PEER}"],
     "No PyTorch peer for unetpp encoder=resnet50"),
    (["--config=configs/unet.py", "--config.model.name=unett"], "Unknown model 'unett'"),
])
def test_bad_command_lines_are_messages(capsys, args, message):
    assert benchmark.main(["benchmark", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_batch_the_devices_do_not_divide_is_a_message(tmp_path):
    # Found in the child (the parent never starts a JAX backend); reported by the parent, exit 2.
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "experiments.benchmark", "--config=configs/unet.py:test", "--config.batch_size=3",
           f"--out={out}"]
    result = _children.run(cmd, text=True, budget_s=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config.batch_size=3" in result.stderr and "multiple of the 8 devices" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
