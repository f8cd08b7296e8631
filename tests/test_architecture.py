"""The layers of ARCHITECTURE.md hold: import contracts (import-linter, setup.cfg), and what serving really loads.

* `lint-imports` checks the contracts of setup.cfg: each layer imports only those below it, no import cycles between
  siblings at any depth, serving code never imports the trainer, the optimizer or the input pipeline. A deliberately
  wrong contract must break, so a passing check is not an empty one.
* Serving, run for real: ``predict`` on a finished run, in a fresh process, must not have loaded optax, TensorFlow
  Datasets, the input pipeline or the training package (import-linter sees imports; this sees what ran).
"""

import json
import pathlib
import subprocess
import sys

import _children
import numpy as np
import PIL.Image
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint(config: pathlib.Path) -> subprocess.CompletedProcess:
    return _children.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", str(config), "--no-cache"],
                         cwd=ROOT, text=True, budget_s=600)


def test_import_contracts_are_kept():
    result = _lint(ROOT / "setup.cfg")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_a_violated_contract_breaks(tmp_path):
    # utils "above" training: training imports utils, so this layering is violated and must be reported.
    config = tmp_path / "wrong.cfg"
    config.write_text("[importlinter]\nroot_package = anemia_jax\n\n[importlinter:contract:wrong]\nname = wrong\n"
                      "type = layers\nlayers =\n    anemia_jax.utils\n    anemia_jax.training\n")
    result = _lint(config)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]


def test_serving_a_photo_loads_no_trainer(workdir, tmp_path):
    photo = tmp_path / "eye.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photo)
    script = (
        "import json, sys\n"
        "from anemia_jax import predict\n"
        f"status = predict.main(['predict', '--workdir={workdir}', '{photo}', '--out={tmp_path / 'out'}'])\n"
        "print(json.dumps({'status': status, 'modules': sorted(sys.modules)}))\n")
    result = _children.run([sys.executable, "-c", script], cwd=ROOT, text=True, budget_s=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["status"] == 0
    modules = set(loaded["modules"])
    assert {"anemia_jax.inference.segmenter", "anemia_jax.runs.restore"} <= modules  # it did serve
    forbidden = {m for m in modules if m.split(".")[0] in ("optax", "tensorflow_datasets", "tensorflow")
                 or m.startswith(("anemia_jax.training", "anemia_jax.data.input_pipeline", "anemia_jax.data.loading",
                                  "anemia_jax.data.datasets"))}
    assert not forbidden, sorted(forbidden)

