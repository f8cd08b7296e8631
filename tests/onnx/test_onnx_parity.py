"""ONNX export parity, run in the ONNX environment (jax2onnx + ONNX Runtime; README: Export a model; .ci/run runs
it there): for U-Net (transposed-convolution and bilinear-resize upsampling), UNet++ with deep supervision, a two-member
ensemble and UNet++ with test-time augmentation (flips and a 0.75 rescale), the bundle written as `anemia_jax.export
--format=onnx` writes it is converted by `anemia_jax.inference.export_onnx.convert`, and ONNX Runtime's probabilities
equal the JAX function's within 1e-4 with identical masks (p > 0.5), on phantom photos and random images, batches 1 and
3. In the project environment (no jax2onnx) the module is skipped."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip("jax2onnx", reason="ONNX environment only (README: Export a model)")
ort = pytest.importorskip("onnxruntime", reason="ONNX environment only (README: Export a model)")
onnx = pytest.importorskip("onnx")

import _parity  # noqa: E402

from anemia_jax.inference import export_onnx, model_card, probabilities  # noqa: E402

TOLERANCE = 1e-4
CASES = {
    "unet": (["unet"], None),
    "unet_resize": (["unet_resize"], None),
    "unetpp_ds": (["unetpp_ds"], None),
    "ensemble_unet_unetpp": (["unet", "unetpp_ds"], None),
    "unetpp_ds_tta": (["unetpp_ds"], "none,h|0.75,1"),
}


@pytest.fixture(scope="module")
def inputs():
    return _parity.input_cases()


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_runtime_equals_jax(case, inputs, tmp_path):
    members, tta_spec = CASES[case]
    transforms = probabilities.parse_tta(*tta_spec.split("|")) if tta_spec else None
    specs, variables, fns = [], [], []
    for seed, member in enumerate(members):
        name, model, v = _parity.tiny_model(member, seed=seed)
        specs.append(export_onnx.member_spec(name, model, transforms=transforms))
        variables.append(v)
        fns.append(probabilities.probability_fn(model, transforms=transforms))
    bundle = export_onnx.write_bundle(tmp_path / "m.bundle.npz", members=specs, variables=variables,
                                      image_size=_parity.SIZE, targets=("a", "b"), card={"case": case})
    out = export_onnx.convert(bundle, tmp_path / "m.onnx")

    reference = fns[0] if len(fns) == 1 else probabilities.ensemble_fn(fns)
    bound = variables[0] if len(fns) == 1 else tuple(variables)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == (
        ["probabilities"] + (["member_probabilities"] if len(fns) > 1 else []))
    assert session.get_inputs()[0].type == "tensor(uint8)" and session.get_inputs()[0].shape[1:] == [32, 32, 3]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch
    worst = 0.0
    for name, images in inputs.items():
        got = session.run(["probabilities"], {"images": images})[0]
        want = np.asarray(jax.jit(reference)(bound, images))
        assert got.shape == want.shape == (*images.shape[:3], 2) and got.dtype == np.float32, name
        worst = max(worst, float(np.abs(got - want).max()))
        assert np.abs(got - want).max() <= TOLERANCE, (case, name)
        np.testing.assert_array_equal(got > 0.5, want > 0.5, err_msg=f"{case} {name}")
        if len(fns) > 1:  # an ensemble also gives each member's probabilities (uncertainty, verdict)
            each = session.run(["member_probabilities"], {"images": images})[0]
            want_each = np.asarray(jax.jit(probabilities.members_fn(fns))(bound, images))
            assert each.shape == (len(fns), *want.shape) and np.abs(each - want_each).max() <= TOLERANCE, name
    print(f"PARITY onnx {case}: max |ORT - JAX| = {worst:.2e}")

    card = json.loads(model_card.card_path(out).read_text())
    assert card["case"] == case and card["artifact"]["format"] == "onnx"
    assert card["artifact"]["conversion_check"]["max_abs_diff"] <= TOLERANCE
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["anemia_jax.model_card"])["case"] == case


def test_bundle_round_trip_rebuilds_the_same_function(tmp_path, inputs):
    name, model, variables = _parity.tiny_model("unetpp_ds")
    spec = export_onnx.member_spec(name, model, prune_level=1)
    bundle = export_onnx.write_bundle(tmp_path / "b.npz", members=[spec], variables=[variables],
                                      image_size=_parity.SIZE, targets=("a", "b"), card={})
    manifest, restored = export_onnx.read_bundle(bundle)
    assert manifest["members"][0]["fields"]["bn_axis_name"] is None
    np.testing.assert_array_equal(
        np.asarray(export_onnx.bundle_function(manifest, restored)(inputs["random_b3"])),
        np.asarray(probabilities.probability_fn(model, prune_level=1)(variables, inputs["random_b3"])))


def test_main_reports_a_missing_bundle(tmp_path, capsys):
    assert export_onnx.main(["export_onnx", str(tmp_path / "none.npz"), f"--out={tmp_path / 'x.onnx'}"]) == 2
    assert "No bundle" in capsys.readouterr().err
