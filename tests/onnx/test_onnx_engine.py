"""ONNX Runtime as the engine of ``predict --onnx`` and ``app --onnx`` (anemia_jax.inference.onnx_engine), run in the
ONNX environment (jax2onnx + ONNX Runtime + ml_collections; README: Export a model): tiny exported models -- a U-Net,
and an ensemble of a U-Net and a deep-supervised UNet++ -- give each member's probabilities equal to JAX's within
1e-4; the segmenter built on them gives the same probabilities and masks as on JAX's; the commands write the same
files with it (engine recorded), read a quality.json beside the model, and refuse what an export fixed. Skipped in
the project environment (no jax2onnx); the project suite checks the message for a missing ONNX Runtime."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import PIL.Image
import pytest

pytest.importorskip("jax2onnx", reason="ONNX environment only (README: Export a model)")
pytest.importorskip("onnxruntime", reason="ONNX environment only (README: Export a model)")
pytest.importorskip("ml_collections", reason="the commands need ml_collections (requirements-onnx.txt)")

import _parity  # noqa: E402

from anemia_jax import app, predict  # noqa: E402
from anemia_jax.inference import export_onnx, onnx_engine, probabilities, segmenter  # noqa: E402
from anemia_jax.screening import quality  # noqa: E402
from anemia_jax.utils import image_io  # noqa: E402

TOLERANCE = 1e-4
TARGETS = ("palpebral", "forniceal_palpebral")


def _card(members: int, threshold: float = 0.5) -> dict:
    """The parts of a model card (`model_card.build`) the engine reads, for runs that exist nowhere here."""
    h, w = _parity.SIZE
    return {"input": {"name": "images", "shape": ["N", h, w, 3], "dtype": "uint8"},
            "targets": [{"name": t, "channel": c, "threshold": threshold} for c, t in enumerate(TARGETS)],
            "runs": [{"workdir": f"/elsewhere/fold{i}", "checkpoint": {"step": 10 + i},
                      "config": {"model": {"name": "unet"}, "quality": None}} for i in range(members)]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (ONNX file, [per-member JAX probability fns], [their variables]) for a single U-Net and a two-member
    ensemble."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, cases in (("single", ["unet"]), ("ensemble", ["unet", "unetpp_ds"])):
        specs, variables, fns = [], [], []
        for seed, case in enumerate(cases):
            model_name, model, v = _parity.tiny_model(case, seed=seed)
            specs.append(export_onnx.member_spec(model_name, model))
            variables.append(v)
            fns.append(probabilities.probability_fn(model))
        bundle = export_onnx.write_bundle(root / f"{name}.bundle.npz", members=specs, variables=variables,
                                          image_size=_parity.SIZE, targets=TARGETS, card=_card(len(cases)))
        (root / name).mkdir()
        out[name] = (export_onnx.convert(bundle, root / name / "model.onnx", check=False), fns, variables)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three phantom photos of their own sizes (64x48), as files in one folder."""
    folder = tmp_path_factory.mktemp("photos")
    for i, photo in enumerate(_parity.phantom_photos()):
        PIL.Image.fromarray(photo).save(folder / f"eye{i}.png")
    return folder


@pytest.mark.parametrize("name", ["single", "ensemble"])
def test_members_equal_jax(exported, name):
    path, fns, variables = exported[name]
    model = onnx_engine.OnnxModel(path)
    assert model.image_size == _parity.SIZE and model.targets == TARGETS and model.threshold == 0.5
    want_fn = jax.jit(probabilities.members_fn(fns))
    for images in _parity.input_cases().values():
        got = model.members(images)
        want = np.asarray(want_fn(tuple(variables), images))
        assert got.shape == want.shape == (len(fns), *images.shape[:3], 2) and got.dtype == np.float32
        assert np.abs(got - want).max() <= TOLERANCE


def test_segmenter_on_onnx_runtime_equals_jax(exported):
    path, fns, variables = exported["ensemble"]
    seg = segmenter.Segmenter.from_onnx(onnx_engine.OnnxModel(path), batch_size=2)
    assert (seg.engine, seg.image_size, seg.targets) == ("onnxruntime", _parity.SIZE, TARGETS)
    assert seg.workdirs == ["/elsewhere/fold0", "/elsewhere/fold1"] and seg.steps == [10, 11]
    photos = list(_parity.phantom_photos())
    got = seg.segment(photos)  # three photos in batches of two: a short last batch
    inputs = np.stack([image_io.resize_image(p, _parity.SIZE) for p in photos])
    members = np.asarray(jax.jit(probabilities.members_fn(fns))(tuple(variables), inputs))
    for i, s in enumerate(got):
        assert s.members_model.shape == (2, *_parity.SIZE, 2)
        assert np.abs(s.members_model - members[:, i]).max() <= TOLERANCE
        mean = members[:, i].mean(axis=0)
        assert np.abs(s.probs_model - mean).max() <= TOLERANCE
        want_masks = image_io.resize_probabilities(mean, photos[i].shape[:2]) > 0.5
        near = np.abs(image_io.resize_probabilities(mean, photos[i].shape[:2]) - 0.5) < TOLERANCE
        assert np.array_equal(s.masks[~near], want_masks[~near])  # equal wherever the threshold is not a coin toss
        assert s.disagreement_model.max() > 0  # two different members disagree somewhere


def test_predict_with_an_exported_model(exported, photos, tmp_path):
    path, _, _ = exported["ensemble"]
    out = tmp_path / "out"
    assert predict.main(["predict", f"--onnx={path}", str(photos), f"--out={out}", "--batch_size=2"]) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["engine"] == "onnxruntime" and summary["onnx_model"] == str(path)
    assert summary["runs"] == ["/elsewhere/fold0", "/elsewhere/fold1"] and summary["mask_threshold"] == 0.5
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["stem"] for r in rows] == ["eye0", "eye1", "eye2"]
    mask = np.asarray(PIL.Image.open(out / "eye0_palpebral.png"))
    assert mask.shape == (64, 48) and set(np.unique(mask)) <= {0, 255}
    # A quality.json beside the model is the export's thresholds (here: every photo too dark).
    quality.save_thresholds(path.parent / quality.THRESHOLDS_FILE,
                            quality.DEFAULTS.__class__(**{**quality.DEFAULTS.__dict__, "min_brightness": 1.1}),
                            {"mode": "ensemble", "runs": ["/elsewhere/fold0", "/elsewhere/fold1"]})
    try:
        assert predict.main(["predict", f"--onnx={path}", str(photos), f"--out={tmp_path / 'dark'}"]) == 0
    finally:
        (path.parent / quality.THRESHOLDS_FILE).unlink()
    assert {r["verdict"] for r in csv.DictReader((tmp_path / "dark" / "predictions.csv").open())} == {"retake"}


def test_the_page_with_an_exported_model(exported):
    path, _, _ = exported["single"]
    cmd = app._command()
    assert cmd.parse_runs(["app", f"--onnx={path}", "--threshold=0.4"]) == []
    service = app.build_service(cmd)
    assert service.segmenter.engine == "onnxruntime" and service.segmenter.threshold == 0.4
    assert "ONNX Runtime" in service.info(1)["description"]
    photo = PIL.Image.fromarray(_parity.phantom_photos()[0])
    import io

    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    result = service.analyse(buffer.getvalue(), "eye.png")
    assert (result["width"], result["height"]) == (48, 64) and result["verdict"]["label"] in ("usable", "retake")


@pytest.mark.parametrize("args, message", [
    (["--workdir=/some/run"], "not both"),
    (["--tta"], "fixed when it was exported"),
    (["--checkpoint=latest"], "fixed when it was exported"),
    (["--config.seed=3"], "no config to change"),
])
def test_what_an_export_fixed_is_refused(exported, tmp_path, capsys, args, message):
    path, _, _ = exported["single"]
    assert predict.main(["predict", f"--onnx={path}", str(tmp_path), f"--out={tmp_path / 'o'}", *args]) == 2
    assert message in capsys.readouterr().err


def test_models_that_are_not_anemia_jax_exports_are_messages(tmp_path, capsys):
    import onnx

    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["images"], ["probabilities"])], "other",
                                   [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.UINT8, [1, 2])],
                                   [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.UINT8, [1, 2])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(onnx.helper.make_model(graph), foreign)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "eye.png")  # a photo to predict: the model is what is wrong
    for model, message in ((foreign, "no anemia_jax model card"), (tmp_path / "broken.onnx", "cannot open"),
                           (tmp_path / "missing.onnx", "No ONNX model")):
        assert predict.main(["predict", f"--onnx={model}", str(tmp_path), f"--out={tmp_path / 'o'}"]) == 2
        assert message in capsys.readouterr().err


def test_a_calibrated_export_carries_its_temperature(tmp_path, photos):
    # The temperature is inside the exported graph (sigmoid(logit / T) per member) and on its card: the ONNX engine
    # reports it and predict records it, since --temperature cannot change it (cli refuses it with --onnx).
    scale = [2.0, 0.5]
    model_name, model, v = _parity.tiny_model("unet", seed=3)
    card = {**_card(1), "temperature": {"values": dict(zip(TARGETS, scale)), "source": "/elsewhere/temperature.json"}}
    bundle = export_onnx.write_bundle(tmp_path / "calibrated.bundle.npz",
                                      members=[export_onnx.member_spec(model_name, model, temperature=scale)],
                                      variables=[v], image_size=_parity.SIZE, targets=TARGETS, card=card)
    path = export_onnx.convert(bundle, tmp_path / "calibrated.onnx", check=False)
    seg = segmenter.Segmenter.from_onnx(onnx_engine.OnnxModel(path))
    assert seg.temperature == scale
    images = _parity.input_cases()["phantom_b3"]
    want = np.asarray(jax.jit(probabilities.probability_fn(model, temperature=scale))(v, images))
    assert np.abs(seg.onnx_model.members(images)[0] - want).max() <= TOLERANCE
    out = tmp_path / "out"
    assert predict.main(["predict", f"--onnx={path}", str(photos), f"--out={out}"]) == 0
    recorded = json.loads((out / "predictions.json").read_text())["temperature"]
    assert recorded["values"] == scale and str(path) in recorded["source"]
