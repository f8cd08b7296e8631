"""Two local processes train together and end where a single-process run ends.

Each process (tests/multiprocess_worker.py) has 2 fake CPU devices, joins through
`jax.distributed.initialize` on 127.0.0.1 with gloo CPU collectives, and feeds only its half
of every global batch (`make_array_from_process_local_data`). Augmentation and dropout are on:
their per-device keys come from the mesh position, so the 2x2-device run must match this
process's run on a 4-device mesh, parameter for parameter (float tolerance: the all-reduces
sum in a different order).

The workers are launched again (at most twice more) when, and only when, they failed on the Gloo CPU collectives'
fixed 30 s wait for a peer (``Gloo context initialization failed: DEADLINE_EXCEEDED``), a limit inside JAX that a
worker more than 30 s behind the other reaches on a heavily loaded machine (see test_multiprocess_train.py).
"""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import _children
import jax
import numpy as np
import pytest

from anemia_jax.utils import parallel

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 2
BUDGET_S = 240  # unloaded seconds (`_children`)
GLOO_WAIT = "Gloo context initialization failed: DEADLINE_EXCEEDED"
ATTEMPTS = 3


def _load_worker():
    spec = importlib.util.spec_from_file_location("multiprocess_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}")
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    outs = [tmp_path / f"process_{i}.npz" for i in range(NUM_PROCESSES)]
    reference = None
    for attempt in range(1, ATTEMPTS + 1):
        port = _free_port()
        logs = [open(tmp_path / f"process_{i}_{attempt}.log", "w+") for i in range(NUM_PROCESSES)]
        procs = []
        try:
            for i in range(NUM_PROCESSES):
                procs.append(_children.Child([sys.executable, str(WORKER), "--process_id", str(i),
                                              "--num_processes", str(NUM_PROCESSES), "--port", str(port), "--out",
                                              str(outs[i])], budget_s=BUDGET_S, env=env, stdout=logs[i],
                                             stderr=subprocess.STDOUT))
            if reference is None:  # the reference runs here, once, while the workers run
                worker = _load_worker()
                reference = worker.train(parallel.make_mesh(jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS]))
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                p.close()
        whole = []
        for log in logs:
            log.seek(0)
            whole.append(log.read())
            log.close()
        reports = [text[-3000:] for text in whole]
        for p in procs:
            p.check_budget("\n----\n".join(reports))
        if codes == [0] * NUM_PROCESSES or attempt == ATTEMPTS or not any(GLOO_WAIT in text for text in whole):
            break
    assert codes == [0] * NUM_PROCESSES, "worker failed:\n" + "\n----\n".join(reports)

    for i, out in enumerate(outs):
        got = dict(np.load(out))
        assert int(got.pop("process_index")) == i
        assert int(got.pop("local_device_count")) == DEVICES_PER_PROCESS
        assert set(got) == set(reference)
        assert int(got["num_devices"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
        for key, want in reference.items():
            np.testing.assert_allclose(got[key], want, rtol=2e-4, atol=2e-5, err_msg=f"process {i}: {key}")
    steps_done = [v for k, v in reference.items() if k.endswith(".step")]
    assert steps_done and all(int(s) == worker.NUM_STEPS for s in steps_done)
    assert all(bool(v) for k, v in reference.items() if "finite" in k)
    # The inference gathered every process's rows (fetch of a cross-process sharded array).
    assert reference["['eval']"].shape == (worker.GLOBAL_BATCH, worker.SIZE, worker.SIZE, worker.TARGETS)
