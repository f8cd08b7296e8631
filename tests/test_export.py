"""Tests of anemia_jax.export (StableHLO parity, the command, its model card, the ONNX bundle) and the phantom photo
fixture of the parity tests. ONNX Runtime parity itself runs in the ONNX environment (tests/onnx/); here the
command's ONNX path is run end to end only when that environment is given (``$ANEMIA_JAX_ONNX_PYTHON``, as CI does).

Parity: the `jax.export` artifact, serialized, deserialized and called, equals the JAX forward
(`probabilities.probability_fn` under `jax.jit`) within 1e-4 with identical masks (p > 0.5), for U-Net, UNet++ with deep
supervision and their two-member ensemble, on phantom photos and random images, batches 1 and 3.
"""

from __future__ import annotations

import json
import os
import shutil

import _parity
import jax
import numpy as np
import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax import export
from anemia_jax.data import normalization
from anemia_jax.inference import export as export_lib
from anemia_jax.inference import export_onnx, model_card, probabilities, temperature
from anemia_jax.runs import restore
from anemia_jax.utils import parallel

TOLERANCE = 1e-4


def test_phantom_fixture_is_the_generators_output():
    from anemia_jax.data.datasets.conjunctiva_phantom import phantom

    expected = np.stack([phantom.generate_example(0, i, long_side=64).image for i in range(3)])
    np.testing.assert_array_equal(_parity.phantom_photos(), expected)


@pytest.mark.parametrize("members", [["unet"], ["unetpp_ds"], ["unet", "unetpp_ds"]], ids="+".join)
def test_stablehlo_reloaded_equals_jax(members):
    built = [_parity.tiny_model(m, seed=i) for i, m in enumerate(members)]
    fns = [probabilities.probability_fn(model) for _, model, _ in built]
    fn = fns[0] if len(fns) == 1 else probabilities.ensemble_fn(fns)
    variables = built[0][2] if len(fns) == 1 else tuple(v for _, _, v in built)
    exported = export_lib.export_stablehlo(fn, variables, _parity.SIZE, platforms=("cpu",))
    reloaded = jax.export.deserialize(exported.serialize())
    assert str(reloaded.in_avals[0].shape[0]) == "N" and reloaded.in_avals[0].dtype == np.uint8
    reference = jax.jit(fn)
    worst = 0.0
    for name, images in _parity.input_cases().items():
        got = np.asarray(reloaded.call(images))
        want = np.asarray(reference(variables, images))
        assert got.shape == want.shape == (*images.shape[:3], 2) and got.dtype == np.float32, name
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_array_equal(got > 0.5, want > 0.5, err_msg=name)
    assert worst <= TOLERANCE
    print(f"PARITY stablehlo {'+'.join(members)}: max |reloaded - JAX| = {worst:.2e}")


def test_export_command_writes_stablehlo_and_card(workdir, tmp_path):
    out = tmp_path / "exports" / "tiny.stablehlo"
    status = export.main(["export", f"--workdir={workdir}", "--format=stablehlo", f"--out={out}", "--platforms=cpu"])
    assert status == 0
    run = restore.load_run(workdir, checkpoint="best", mesh=parallel.make_mesh(jax.local_devices()[:1]))
    fn, variables = probabilities.probability_of(run)
    images = _parity.input_cases()["random_b3"]
    np.testing.assert_allclose(np.asarray(export_lib.load(out).call(images)),
                               np.asarray(jax.jit(fn)(variables, images)), atol=TOLERANCE)

    card = json.loads(model_card.card_path(out).read_text())
    assert model_card.card_path(out).name == "tiny.stablehlo.card.json"
    assert card["input"]["shape"] == ["N", 32, 32, 3] and card["input"]["dtype"] == "uint8"
    assert card["normalization"]["mean"] == list(normalization.IMAGE_MEAN)
    assert card["normalization"]["std"] == list(normalization.IMAGE_STD)
    assert [t["name"] for t in card["targets"]] == list(run.targets)
    assert all(t["threshold"] == 0.5 for t in card["targets"])
    [entry] = card["runs"]
    assert entry["checkpoint"]["step"] == 2 and entry["checkpoint"]["chosen_as"] == "best"
    assert entry["training"]["dataset"]["name"] == "phantom" and entry["training"]["split"]["protocol"] == "kfold"
    assert "note" in entry["validation"]  # the tiny run has no summary.json: said, not invented
    assert card["export"]["git_commit"] and card["inference"]["compute_dtype"] == "float32"
    assert card["artifact"]["format"] == "stablehlo" and card["artifact"]["platforms"] == ["cpu"]
    assert card["artifact"]["bytes"] == out.stat().st_size


def test_validation_metrics_of_the_exported_step():
    summary = {"best": {"step": 2, "val": {"dice/mean": 0.9}}, "final": {"step": 4, "val": {"dice/mean": 0.1}}}
    assert model_card._validation(summary, 2) == {"step": 2, "summary_entry": "best", "val": {"dice/mean": 0.9}}
    assert model_card._validation(summary, 4)["val"] == {"dice/mean": 0.1}
    assert "not for the exported step 3" in model_card._validation(summary, 3)["note"]


def test_onnx_bundle_rebuilds_the_runs_function(workdir, tmp_path, monkeypatch):
    onnx_python = os.environ.get(export.ONNX_PYTHON_ENV, "")
    monkeypatch.delenv(export.ONNX_PYTHON_ENV, raising=False)
    out = tmp_path / "tiny.onnx"
    argv = ["export", f"--workdir={workdir}", "--format=onnx", f"--out={out}"]
    if export._have_jax2onnx():
        pytest.skip("jax2onnx is installed in this environment: the command converts in-process")
    assert export.main(argv) == 1  # no ONNX environment: the bundle is written and the command says how to convert
    bundle = tmp_path / "tiny.bundle.npz"
    manifest, variables = export_onnx.read_bundle(bundle)
    assert manifest["card"]["runs"][0]["checkpoint"]["step"] == 2 and manifest["image_size"] == [32, 32]
    run = restore.load_run(workdir, checkpoint="best", mesh=parallel.make_mesh(jax.local_devices()[:1]))
    fn, run_variables = probabilities.probability_of(run)
    images = _parity.input_cases()["phantom_b3"]
    np.testing.assert_allclose(np.asarray(jax.jit(export_onnx.bundle_function(manifest, variables))(images)),
                               np.asarray(jax.jit(fn)(run_variables, images)), atol=1e-6)
    if not onnx_python:
        return
    assert export.main(argv + [f"--onnx_python={onnx_python}"]) == 0  # the ONNX environment converts the bundle
    card = json.loads(model_card.card_path(out).read_text())
    assert card["artifact"]["format"] == "onnx" and card["artifact"]["conversion_check"]["max_abs_diff"] <= TOLERANCE
    print(f"PARITY onnx command (UNet++ tiny run): {card['artifact']['conversion_check']}")


def test_two_exports_of_one_stem_keep_two_cards(workdir, tmp_path, monkeypatch):
    """model.stablehlo then model.onnx: each artifact keeps its own card, named after its full file name. The run
    has a temperature file beside it: both exports compute the calibrated probabilities and their cards say so."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    temperature.save(run / temperature.FILE, [1.5, 0.5], ["palpebral", "forniceal_palpebral"], {"mode": "test"})
    stablehlo, onnx = tmp_path / "model.stablehlo", tmp_path / "model.onnx"
    assert export.main(["export", f"--workdir={run}", "--format=stablehlo", f"--out={stablehlo}",
                        "--platforms=cpu"]) == 0
    restored = restore.load_run(run, checkpoint="best", mesh=parallel.make_mesh(jax.local_devices()[:1]))
    fn, variables = probabilities.probability_of(restored, temperature=[1.5, 0.5])
    images = _parity.input_cases()["random_b3"]
    np.testing.assert_allclose(np.asarray(export_lib.load(stablehlo).call(images)),
                               np.asarray(jax.jit(fn)(variables, images)), atol=TOLERANCE)

    def convert(bundle, out, python, opset):  # what export_onnx.convert does to the card, without jax2onnx
        out.write_bytes(b"onnx model")
        model_card.write(export_onnx.read_bundle(bundle)[0]["card"], out, format="onnx")
        return 0

    monkeypatch.setattr(export, "_convert_onnx", convert)
    assert export.main(["export", f"--workdir={run}", "--format=onnx", f"--out={onnx}"]) == 0
    cards = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("*.card.json")}
    assert set(cards) == {"model.stablehlo.card.json", "model.onnx.card.json"}
    assert cards["model.stablehlo.card.json"]["artifact"]["format"] == "stablehlo"
    assert cards["model.stablehlo.card.json"]["artifact"]["file"] == "model.stablehlo"
    assert cards["model.onnx.card.json"]["artifact"]["format"] == "onnx"
    for card in cards.values():
        assert card["inference"]["temperature"]["values"] == {"palpebral": 1.5, "forniceal_palpebral": 0.5}
        assert card["training_data"]["kind"] == "phantom" and "research use only" in card["training_data"][
            "intended_use"]
    manifest, bundled = export_onnx.read_bundle(tmp_path / "model.bundle.npz")
    assert manifest["members"][0]["temperature"] == [1.5, 0.5]
    np.testing.assert_allclose(np.asarray(jax.jit(export_onnx.bundle_function(manifest, bundled))(images)),
                               np.asarray(jax.jit(fn)(variables, images)), atol=1e-5)  # what ONNX converts


@pytest.mark.parametrize("args, message", [
    (["--format=onnx", "--dtype=bfloat16"], "float32 only"),
    (["--format=tflite"], "format"),
])
def test_bad_command_lines_are_messages(workdir, tmp_path, capsys, args, message):
    assert export.main(["export", f"--workdir={workdir}", f"--out={tmp_path / 'x'}", *args]) == 2
    assert message in capsys.readouterr().err

