"""Tests of anemia_jax.predict, `segmenter` and `image_io` on a tiny UNet++ run (see _tiny_run.py): masks come back
at each photo's own size (odd sizes, portrait, landscape, EXIF-rotated, RGBA, greyscale, 16-bit), match the model's
probabilities, and unreadable inputs are reported and skipped with a non-zero exit status."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from _tiny_run import best_run, workdir  # noqa: F401 -- pytest fixtures

from anemia_jax import predict
from anemia_jax.inference import segmenter
from anemia_jax.screening import photo_folder
from anemia_jax.utils import image_io

_EXIF_ORIENTATION = 0x0112


def _photo(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """name -> (path, upright (H, W))."""
    folder = tmp_path_factory.mktemp("photos")
    made = {}
    for name, (h, w) in {"landscape.jpg": (37, 91), "portrait.png": (120, 45), "odd.bmp": (33, 33)}.items():
        PIL.Image.fromarray(_photo(h, w)).save(folder / name)
        made[name] = (folder / name, (h, w))
    # Stored 50 wide x 30 high with orientation 6 ("rotate 90 clockwise to display"): upright it is 30 x 50.
    rotated = PIL.Image.fromarray(_photo(30, 50, seed=1))
    exif = rotated.getexif()
    exif[_EXIF_ORIENTATION] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    made["rotated.jpg"] = (folder / "rotated.jpg", (50, 30))
    PIL.Image.fromarray(np.dstack([_photo(21, 17), np.full((21, 17), 128, np.uint8)])).save(folder / "rgba.png")
    made["rgba.png"] = (folder / "rgba.png", (21, 17))
    PIL.Image.fromarray(_photo(19, 64)[..., 0]).save(folder / "grey.png")
    made["grey.png"] = (folder / "grey.png", (19, 64))
    return folder, made


def test_masks_at_each_photos_own_size(best_run, photos, tmp_path):
    folder, made = photos
    report = photo_folder.predict_photos(segmenter.Segmenter([best_run], batch_size=8), [folder], tmp_path)
    assert not report.failed and len(report.written) == len(made)
    for name, (_, (h, w)) in made.items():
        stem = name.rsplit(".", 1)[0]
        for t in best_run.targets:
            mask = np.asarray(PIL.Image.open(tmp_path / f"{stem}_{t}.png"))
            assert mask.shape == (h, w), (name, t)
            assert set(np.unique(mask)) <= {0, 255}
        assert PIL.Image.open(tmp_path / f"{stem}_overlay.png").size == (w, h)
    assert len((tmp_path / "predictions.csv").read_text().splitlines()) == len(made) + 1


def test_exif_orientation_applied(photos):
    path, (h, w) = photos[1]["rotated.jpg"]
    with PIL.Image.open(path) as im:
        expected = np.asarray(im.convert("RGB").transpose(PIL.Image.Transpose.ROTATE_270))
    photo = image_io.load_photo(path)
    assert photo.shape == (h, w, 3)
    np.testing.assert_array_equal(photo, expected)


def test_masks_are_the_thresholded_probabilities(best_run, tmp_path):
    # A photo already at the training size is not resized either way: its masks are exactly probs > threshold.
    h, w = best_run.image_size
    photo = _photo(h, w, seed=3)
    PIL.Image.fromarray(photo).save(tmp_path / "exact.png")
    probs = segmenter.Segmenter([best_run]).segment([photo])[0].probs
    threshold = float(np.median(probs[..., 0]))  # a threshold that splits the pixels, whatever the weights
    photo_folder.predict_photos(segmenter.Segmenter([best_run], threshold=threshold), [tmp_path / "exact.png"],
                           tmp_path / "out")
    for c, t in enumerate(best_run.targets):
        mask = np.asarray(PIL.Image.open(tmp_path / "out" / f"exact_{t}.png")) > 0
        np.testing.assert_array_equal(mask, probs[..., c] > threshold)
    assert 0 < (probs[..., 0] > threshold).sum() < h * w


def test_resize_probabilities():
    probs = np.stack([np.full((4, 6), 0.25, np.float32), np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)], -1)
    up = image_io.resize_probabilities(probs, (9, 13))
    assert up.shape == (9, 13, 2)
    np.testing.assert_allclose(up[..., 0], 0.25, atol=1e-6)
    assert up.min() >= 0.0 and up.max() <= 1.0
    np.testing.assert_array_equal(image_io.resize_probabilities(probs, (4, 6)), probs)


def test_command_line_reports_unreadable_inputs(workdir, photos, tmp_path, caplog):
    folder, made = photos
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    portrait = made["portrait.png"][0]
    status = predict.main(["predict", f"--workdir={workdir}", str(bad), str(portrait), str(tmp_path / "missing.png"),
                           f"--out={tmp_path / 'out'}", "--tta", "--threshold=0.4"])
    assert status == 1
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text
    assert np.asarray(PIL.Image.open(tmp_path / "out" / "portrait_palpebral.png")).shape == (120, 45)
    assert not (tmp_path / "out" / "broken_palpebral.png").exists()
    assert predict.main(["predict", f"--workdir={workdir}", str(portrait), f"--out={tmp_path / 'ok'}"]) == 0
    # An ensemble of the run with itself writes the same masks.
    assert predict.main(["predict", f"--workdir={workdir}", f"--workdir={workdir}", str(portrait),
                         f"--out={tmp_path / 'twice'}"]) == 0
    for name in ("portrait_palpebral.png", "portrait_forniceal_palpebral.png"):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / "ok" / name)),
                                      np.asarray(PIL.Image.open(tmp_path / "twice" / name)))


def test_predict_reads_and_fills_the_runs_compilation_cache(workdir, photos, tmp_path, warnings_log):
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    portrait = photos[1]["portrait.png"][0]
    before = jax.config.jax_compilation_cache_dir
    cache = tmp_path / "cache"
    try:
        assert predict.main(["predict", f"--workdir={workdir}", str(portrait), f"--out={tmp_path / 'a'}",
                             f"--config.compilation_cache_dir={cache}"]) == 0
        assert jax.config.jax_compilation_cache_dir == str(cache) and cache.is_dir()
        # A cache that cannot be opened only costs time: a warning, and the photos are written.
        blocked = tmp_path / "a_file"
        blocked.write_text("")
        assert predict.main(["predict", f"--workdir={workdir}", str(portrait), f"--out={tmp_path / 'b'}",
                             f"--config.compilation_cache_dir={blocked / 'cache'}"]) == 0
        assert any("compilation cache" in m and "unavailable" in m for m in warnings_log)
        assert (tmp_path / "b" / "portrait_palpebral.png").is_file()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax_cache.reset_cache()


def test_onnx_model_without_onnx_runtime_is_a_message(tmp_path, capsys):
    # tests/onnx covers --onnx with ONNX Runtime; here (the project environment) it is absent, and says how to get it.
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is not None:
        pytest.skip("ONNX Runtime is installed in this environment")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"an ONNX file")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "eye.png")  # a photo to predict: the model is what is missing
    assert predict.main(["predict", f"--onnx={model}", str(tmp_path), f"--out={tmp_path / 'out'}"]) == 2
    assert "pip install onnxruntime" in capsys.readouterr().err
    assert predict.main(["predict", f"--onnx={model}", "--workdir=/a/run", str(tmp_path), "--out=x"]) == 2
    assert "not both" in capsys.readouterr().err
    # The export fixed the temperature as it fixed the TTA: changing it here would be a silent no-op.
    assert predict.main(["predict", f"--onnx={model}", "--temperature=none", str(tmp_path), "--out=x"]) == 2
    assert "--temperature: an exported model's" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_repeated_stems_do_not_overwrite(best_run, photos, tmp_path):
    folder, made = photos
    other = tmp_path / "other"
    other.mkdir()
    PIL.Image.fromarray(_photo(10, 12)).save(other / "odd.bmp")
    report = photo_folder.predict_photos(segmenter.Segmenter([best_run]), [made["odd.bmp"][0], other / "odd.bmp"],
                                    tmp_path / "out")
    assert sorted(report.written.values()) == ["odd", "odd_2"]
    assert np.asarray(PIL.Image.open(tmp_path / "out" / "odd_2_palpebral.png")).shape == (10, 12)
