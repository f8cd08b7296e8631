"""Tests of the eyes_defy_anemia TFDS builder on generated archives (see fake_eyes_archive.py).

The quirk archive reproduces every oddity of the real one (naming, encodings, EXIF rotation, spreadsheets in both
places, a zip whose top folder has a space) plus broken files that must be reported; when ../shared holds the real
file listing and spreadsheets, an archive with the real names yields the real counts.
"""

import io
import math
import pathlib
import pickle
import sys
import types

import fake_eyes_archive as fake
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anemia_jax.data.datasets import get_builder
from anemia_jax.data.datasets.eyes_defy_anemia import archive, masks, metadata, source, summary, xlsx
from anemia_jax.data.datasets.eyes_defy_anemia.eyes_defy_anemia_dataset_builder import Builder, EyesDefyAnemiaConfig

KINDS = fake.KINDS
# patient -> (has_palpebral, has_forniceal, has_forniceal_palpebral) expected from the quirk archive.
EXPECTED_HAS = {
    "Italy/1": (True, False, False), "Italy/2": (True, True, True), "Italy/4": (True, True, True),
    "Italy/9": (True, True, True), "Italy/17": (True, True, True), "Italy/35": (True, False, False),
    "Italy/93": (True, True, True), "Italy/95": (True, True, True), "Italy/100": (False, False, True),
    "India/1": (True, True, True), "India/3": (True, False, True), "India/7": (True, True, True),
    "India/8": (True, True, True), "India/9": (False, False, True),
}


def _decode(example):
    return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in example.items()}


def _build(data_dir, **kwargs):
    builder = Builder(data_dir=str(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare()
    ds = builder.as_data_source("train")
    return builder, {ex["patient_id"]: ex for ex in map(_decode, ds)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eyes")
    zpath = fake.write_archive(tmp / "eyes-defy-anemia.zip", fake.quirk_patients(), fake.quirk_sheets())
    builder, examples = _build(tmp / "data", archive_path=str(zpath))
    return builder, examples, summary.read_summary(builder.data_path)


def _max_boundary_error(stored, truth):
    """Largest distance (px) from a wrongly labelled pixel to the true region's boundary."""
    wrong_in = stored & ~truth
    wrong_out = truth & ~stored
    d_in = ndimage.distance_transform_edt(~truth)[wrong_in]
    d_out = ndimage.distance_transform_edt(truth)[wrong_out]
    return float(max(d_in.max(initial=0), d_out.max(initial=0)))


def test_quirk_archive_counts_and_mask_presence(built):
    _, examples, _ = built
    assert sorted(examples) == sorted(EXPECTED_HAS)
    for pid, expected in EXPECTED_HAS.items():
        got = tuple(bool(examples[pid][f"has_{k}"]) for k in KINDS)
        assert got == expected, pid
    assert "tensorflow" not in sys.modules


def test_photos_upright_and_masks_aligned(built):
    _, examples, _ = built
    patients = {p.patient_id: p for p in fake.quirk_patients()}
    for pid, ex in examples.items():
        seed = fake.seed_of(patients[pid])
        image = ex["image"]
        assert image.shape == (80, 60, 3) and image.dtype == np.uint8, pid
        upright = np.asarray(fake.photo(seed, (60, 80)), np.float64)
        # EXIF orientation applied: close to the upright picture, far from its 180-degree turn.
        assert np.abs(image - upright).mean() < 10, pid
        assert np.abs(image - upright[::-1, ::-1]).mean() > 25, pid
        for kind in KINDS:
            mask = ex[kind]
            assert mask.shape == (80, 60, 1) and set(np.unique(mask)) <= {0, 1}, (pid, kind)
            if not ex[f"has_{kind}"]:
                assert not mask.any(), (pid, kind)
                continue
            truth = fake.true_mask(seed, kind, (60, 80))
            stored = mask[..., 0].astype(bool)
            assert _max_boundary_error(stored, truth) <= 2.0, (pid, kind)
            assert (stored & truth).sum() / (stored | truth).sum() > 0.8, (pid, kind)


def test_metadata_parsed_from_both_spreadsheets(built):
    builder, ex, _ = built
    features = builder.info.features
    assert (features["hgb"].np_dtype, features["age"].np_dtype, features["anemic"].np_dtype) == (
        np.float32, np.float32, np.int32)
    # (hgb, gender, age, anemic); Italy.xlsx beside the country folder, India.xlsx inside it.
    expected = {
        "Italy/1": (9.3, "F", 82, 1), "Italy/2": (10.2, "F", 77, 1), "Italy/4": (11.7, "F", 73, 1),
        "Italy/17": (12.9, "M", 78, 1), "Italy/35": (15.7, "M", 36, 0), "Italy/93": (math.nan, "M", 53, -1),
        "Italy/100": (14.5, "F", 63, 0), "India/1": (12.2, "M", 29, 1), "India/7": (9.2, "F", math.nan, 1),
        "India/8": (math.nan, "", math.nan, -1),
    }
    for pid, (hgb, gender, age, anemic) in expected.items():
        e = ex[pid]
        np.testing.assert_allclose([e["hgb"], e["age"]], [hgb, age], rtol=1e-6, err_msg=pid)
        assert (e["gender"], int(e["anemic"])) == (gender, anemic), pid
        assert e["country"] == pid.split("/")[0]
        assert isinstance(e["anemic"], (int, np.integer)) and isinstance(e["hgb"], (float, np.floating))


def test_build_summary_accounts_for_every_file(built):
    builder, _, s = built
    assert builder.build_summary.examples_written == s["examples_written"] == 14
    assert s["masks_present"] == {"palpebral": 12, "forniceal": 9, "forniceal_palpebral": 12}
    assert s["masks_missing"]["forniceal"]["Italy/1"] == "no file"
    assert s["masks_missing"]["forniceal"]["India/3"].startswith("unreadable")
    misaligned = {(m["patient_id"], m["kind"]): m["reason"] for m in s["misaligned_masks"]}
    assert set(misaligned) == {("Italy/100", "palpebral"), ("Italy/100", "forniceal"), ("India/9", "palpebral"),
                               ("India/9", "forniceal")}
    assert "correlation" in misaligned[("Italy/100", "palpebral")]
    assert "aspect" in misaligned[("Italy/100", "forniceal")]
    assert "better scaled by 0.90" in misaligned[("India/9", "palpebral")]  # the 90%-crop cut-out
    skipped = {pathlib.PurePosixPath(f["path"]).name: f["reason"] for f in s["files_skipped"]}
    assert skipped["notes.txt"].startswith("neither a photo nor a mask")
    assert skipped["20200124_091841_forniceal.png"].startswith("unreadable mask")
    assert skipped["20200124_094523.jpg"].startswith("unreadable photo")
    assert sum("has no photo" in r for r in skipped.values()) == 3
    assert {p["patient_id"] for p in s["patients_skipped"]} == {"India/5", "India/6"}
    misnamed = {pathlib.PurePosixPath(m["path"]).name for m in s["misnamed_files_accepted"]}
    assert misnamed == {"004__forniceal.png", "004__forniceal_palpebral.png", "T_64_20190612_092742_palplebral.png",
                        "T_64_20190612_092742_forniceal_palplebral.png", "20200124_202058_papebral.png"}
    assert len(s["duplicates_ignored"]) == 2
    assert [pathlib.PurePosixPath(p).parts[2] for p in s["iccp_chunks_removed"]] == ["17", "35"]
    assert s["files_ignored"] == {"hidden file (.DS_Store)": 6}
    assert s["spreadsheets_used"] == {"India": "dataset anemia/India/India.xlsx", "Italy": "dataset anemia/Italy.xlsx"}
    assert s["hgb_missing"] == ["India/8", "Italy/93"] and s["patients_without_metadata"] == ["India/8"]
    assert s["mask_encodings"] == {"alpha": 23, "white_background": 10}
    # The quirk archive is a small subset: the build goes on but says how it differs from the public archive.
    assert s["source_matches_known_archive"] is False
    assert s["source_differences"] == [
        "known patient folders missing (202 of 218): India/2, India/4, India/10, India/11, India/12, India/13, "
        "India/14, India/15, India/16, India/17, ...",
        "photos: 15 found, 218 in the known archive", "palpebral masks: 16 found, 218 in the known archive",
        "forniceal masks: 14 found, 212 in the known archive",
        "forniceal_palpebral masks: 14 found, 212 in the known archive"]


def test_registry_lookup_and_pickling_reuse_prepared_data(built):
    builder, _, _ = built
    again = get_builder("eyes_defy_anemia", data_dir=builder.data_dir_root, config="long512",
                        archive_path="/unused/because/prepared.zip")
    assert isinstance(again, Builder) and again.data_path == builder.data_path
    assert len(again.as_data_source("train")) == 14
    clone = pickle.loads(pickle.dumps(again))
    assert clone._archive_path == "/unused/because/prepared.zip" and clone.info.file_format == again.info.file_format


def test_manual_dir_nested_folder_and_resizing(tmp_path):
    keep = {"Italy/9", "Italy/100", "India/1"}
    patients = [p for p in fake.quirk_patients() if p.patient_id in keep]
    # Unzipped folder one level down in the default manual_dir (<data_dir>/downloads/manual).
    fake.write_archive(tmp_path / "data/downloads/manual/eyes-defy-anemia", patients, fake.quirk_sheets())
    builder, examples = _build(tmp_path / "data", config=EyesDefyAnemiaConfig(name="long40", long_side=40))
    assert builder.build_summary.source_found_by == "manual_dir"
    assert sorted(examples) == sorted(keep)
    for pid, ex in examples.items():
        assert ex["image"].shape == (40, 30, 3)
        seed = fake.seed_of(next(p for p in patients if p.patient_id == pid))
        for kind in KINDS:
            if ex[f"has_{kind}"]:
                assert _max_boundary_error(ex[kind][..., 0].astype(bool), fake.true_mask(seed, kind, (30, 40))) <= 1.5
    assert "tensorflow" not in sys.modules


def test_source_zip_in_manual_dir_and_explicit_path(tmp_path):
    zpath = fake.write_archive(tmp_path / "manual/archive.zip", fake.quirk_patients()[:1], {})
    (tmp_path / "manual/unrelated.zip").write_bytes(b"not a zip")
    assert source.resolve(None, tmp_path / "manual") == (zpath, "manual_dir")
    assert source.resolve(zpath, None) == (zpath, "archive_path")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source.resolve(tmp_path / "nowhere.zip", tmp_path / "manual")
    (tmp_path / "other/images").mkdir(parents=True)
    (tmp_path / "other/images/a.jpg").write_bytes(b"x")
    with archive.Archive(tmp_path / "other") as wrong, pytest.raises(ValueError, match="right archive"):
        archive.scan(wrong)


def test_missing_source_without_kagglehub_explains_both_ways(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # makes `import kagglehub` fail
    builder = Builder(data_dir=str(tmp_path), file_format="array_record")
    with pytest.raises(source.SourceNotFoundError) as info:
        builder.download_and_prepare()
    msg = str(info.value)
    assert source.KAGGLE_URL in msg
    assert str(tmp_path / "downloads" / "manual") in msg
    assert "pip install kagglehub" in msg and "kagglehub: not installed" in msg
    assert "archive_path" in msg


def test_kagglehub_download_is_used_and_its_failures_reported(tmp_path, monkeypatch):
    folder = fake.write_archive(tmp_path / "kaggle_cache", fake.quirk_patients()[:1], {})
    calls = []

    def download(handle):
        calls.append(handle)
        return str(folder)

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=download))
    assert source.resolve(None, tmp_path / "empty_manual") == (folder, "kagglehub")
    assert calls == ["harshwardhanfartale/eyes-defy-anemia"]

    def offline(handle):
        raise ConnectionError("no route to www.kaggle.com")

    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=offline))
    with pytest.raises(source.SourceNotFoundError, match="no route to www.kaggle.com"):
        source.resolve(None, tmp_path / "empty_manual")


@pytest.mark.parametrize("name, kind, stem", [
    ("1.jpg", None, "1"), ("001_palpebral.png", "palpebral", "001"),
    ("004__forniceal.png", "forniceal", "004"), ("004__forniceal_palpebral.png", "forniceal_palpebral", "004"),
    ("T_64_20190612_092742_palplebral.png", "palpebral", "T_64_20190612_092742"),
    ("T_64_20190612_092742_forniceal_palplebral.png", "forniceal_palpebral", "T_64_20190612_092742"),
    ("20200124_202058_papebral.png", "palpebral", "20200124_202058"),
    ("20200124_202947_palpebral(1).png", "palpebral", "20200124_202947"),
    ("20200124_155456_001_forniceal.png", "forniceal", "20200124_155456_001"),
    ("20200124_155456_001.jpg", None, "20200124_155456_001"),
])
def test_parse_name_reads_every_real_naming(name, kind, stem):
    info = archive.parse_name(name)
    assert (info.kind, info.stem) == (kind, stem)
    canonical = name in ("1.jpg", "001_palpebral.png", "20200124_155456_001_forniceal.png", "20200124_155456_001.jpg")
    assert bool(info.notes) == (not canonical)


@pytest.mark.parametrize("encoding", fake.ENCODINGS)
def test_decode_every_mask_encoding(encoding):
    seed, photo_size, mask_size = 7, (60, 80), (30, 40)
    data = fake.cutout(seed, "palpebral", encoding, photo_size, mask_size)
    upright = fake.photo(seed, photo_size)
    if encoding == "garbage":
        with pytest.raises(masks.UnreadableImageError):
            masks.decode_cutout(data)
        return
    if encoding in ("iccp_bad_crc", "iccp_bad_method"):
        with pytest.raises(Exception):  # Pillow alone refuses these files ...
            Image.open(io.BytesIO(data)).load()
    cut = masks.decode_cutout(data)  # ... the builder reads them without the profile.
    assert cut.iccp_removed == (encoding in ("iccp_bad_crc", "iccp_bad_method"))
    alignment = masks.check_alignment(upright, cut)
    if encoding in ("rotated", "landscape", *fake.SCALED):
        assert not alignment.ok and alignment.reason
        return
    size = photo_size if encoding == "full" else mask_size
    np.testing.assert_array_equal(cut.mask, fake.true_mask(seed, "palpebral", size))
    assert alignment.ok and alignment.correlation > 0.8 and alignment.best_alternative < alignment.correlation


def test_wrong_scale_cutouts_rejected_genuine_ones_kept():
    # Cut-outs of a 90% or 80% centred crop of the photo (same aspect ratio) correlate up to ~0.9 with the photo
    # (above MIN_CORRELATION) but fit it better at their own scale than at the identity.
    photo_size, mask_size = (60, 80), (30, 40)
    scaled_scores = []
    for seed in range(8):
        upright = fake.photo(seed, photo_size)
        for kind in KINDS:
            for encoding in ("rgba", "white", "palette", *fake.SCALED):
                cut = masks.decode_cutout(fake.cutout(seed, kind, encoding, photo_size, mask_size))
                alignment = masks.check_alignment(upright, cut)
                assert alignment.ok == (encoding not in fake.SCALED), (seed, kind, encoding, alignment)
                if encoding == "scaled90":
                    scaled_scores.append(alignment.correlation)
    # The plain correlation threshold alone would have accepted most 90% cut-outs.
    assert np.mean(np.array(scaled_scores) >= masks.MIN_CORRELATION) > 0.5


def test_source_compared_with_known_archive(caplog):
    def folder(country, number, kinds=KINDS):
        return archive.PatientFiles(country, number, f"{country}/{number}", photo=f"{number}.jpg",
                                    masks={k: f"{number}_{k}.png" for k in kinds})

    no_forniceal = {("Italy", n) for n in (1, 35, 54, 58, 75, 109)}
    known = [folder(c, n, ("palpebral",) if (c, n) in no_forniceal else KINDS)
             for c, numbers in source.KNOWN_PATIENTS.items() for n in numbers]
    assert source.compare_with_known_archive(known) == []
    # Two known folders replaced by two unknown ones, one without its photo: only the photo total changes.
    partial = [p for p in known if p.patient_id not in ("India/7", "Italy/120")] + [folder("Spain", 1),
                                                                                       folder("Spain", 2)]
    partial[-1].photo = None
    differences = source.compare_with_known_archive(partial)
    assert differences == ["known patient folders missing (2 of 218): India/7, Italy/120",
                           "patient folders not in the known archive (2): Spain/1, Spain/2",
                           "photos: 217 found, 218 in the known archive"]
    s = summary.BuildSummary(source="/cache/eyes")
    with caplog.at_level("WARNING"):
        s.check_source(differences)
    assert s.source_matches_known_archive is False and s.source_differences == differences
    assert "/cache/eyes differs from the known public archive" in caplog.text and "Spain/1" in caplog.text


def test_white_background_keeps_interior_highlights():
    rgb = np.full((20, 20, 3), 255, np.uint8)
    rgb[5:15, 5:15] = (200, 80, 70)
    rgb[9:11, 9:11] = 255  # specular highlight inside the region
    cut = masks.decode_cutout(_png(Image.fromarray(rgb)))
    assert cut.encoding == "white_background" and cut.mask[5:15, 5:15].all() and cut.mask.sum() == 100
    rgba = np.dstack([rgb, np.full((20, 20), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one stray transparent pixel does not make it an alpha-encoded mask
    assert masks.decode_cutout(_png(Image.fromarray(rgba))).mask.sum() == 100
    with pytest.raises(masks.UnreadableImageError, match="not a cut-out"):
        masks.decode_cutout(_png(Image.fromarray(np.full((20, 20, 3), 90, np.uint8))))


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_resize_mask_stays_binary_and_centred():
    mask = np.zeros((16, 12), bool)
    mask[4:12, 3:9] = True
    big = masks.resize_mask(mask, (48, 64))
    assert big.dtype == np.uint8 and set(np.unique(big)) == {0, 1}
    rows, cols = np.nonzero(big.any(axis=1))[0], np.nonzero(big.any(axis=0))[0]
    # Low-res rows 4..11 / cols 3..8 cover exactly high-res rows 16..47 / cols 12..35: no half-pixel shift.
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (16, 47, 12, 35)


def test_xlsx_reader_cells_and_sheet_lookup():
    data = fake.xlsx([["Number", "Hgb", None, "Note"], [1, "15,1", None, "x"], [2.5, 12, None, None]],
                     inline=("x",))
    assert xlsx.sheet_names(data) == ["Other", "Foglio1"]
    assert xlsx.read_sheet(data, "foglio1") == [["Number", "Hgb", None, "Note"], [1.0, "15,1", None, "x"],
                                                [2.5, 12.0, None, None]]
    assert xlsx.read_sheet(data, None) == [[0.0]]  # first sheet, via an absolute relationship target
    with pytest.raises(xlsx.XlsxError, match="No sheet named"):
        xlsx.read_sheet(data, "Sheet9")
    with pytest.raises(xlsx.XlsxError, match="not a zip"):
        xlsx.read_sheet(b"plain text", None)


def test_metadata_parsing_and_who_thresholds():
    rows = [["Patient data"], ["N.", "Hgb (g/dL)", "Sesso", "Età", "Note", None],
            [1, "15,1", "Donna", 40, None, None], [2, "_", "M", None, "withdrawn", None],
            [3, 11.99, "f", "33", None, None], [4, "n.d.", "X", 50, None, None], [4, 9.0, "M", 1, None, None],
            [None, None, None, None, None, None]]
    parsed = metadata.parse_sheet(rows, source="t.xlsx")
    p = parsed.patients
    assert (p[1].hgb, p[1].gender, p[1].age, p[1].anemic) == (15.1, "F", 40.0, 0)
    assert math.isnan(p[2].hgb) and p[2].anemic == -1 and math.isnan(p[2].age)
    assert (p[3].gender, p[3].age, p[3].anemic) == ("F", 33.0, 1)
    assert math.isnan(p[4].hgb) and p[4].gender == ""  # first row kept, problems reported
    assert len(parsed.problems) == 3 and all(msg.startswith("t.xlsx row") for msg in parsed.problems)
    thresholds = [(11.99, "F", 1), (12.0, "F", 0), (12.99, "M", 1), (13.0, "M", 0), (8.0, "", -1),
                  (math.nan, "F", -1)]
    assert [metadata.anemic_label(h, g) for h, g, _ in thresholds] == [a for _, _, a in thresholds]
    with pytest.raises(ValueError, match="header row"):
        metadata.parse_sheet([["a", "b"], [1, 2]])


def test_real_names_and_spreadsheets_give_real_counts(shared_dir, tmp_path):
    reference = shared_dir / "eyes_defy_anemia_reference"
    if not (reference / "file_list.csv").exists():
        pytest.skip(f"{reference} is not available")
    zpath = fake.write_real_names_archive(tmp_path / "archive.zip", reference)
    with archive.Archive(zpath) as arc:
        scan = archive.scan(arc)
    assert len(scan.patients) == 218 and scan.ignored == {"hidden file (.DS_Store)": 191}
    builder, examples = _build(tmp_path / "data", archive_path=str(zpath))
    s = builder.build_summary
    assert len(examples) == s.examples_written == 218
    assert s.masks_present == {"palpebral": 218, "forniceal": 212, "forniceal_palpebral": 212}
    no_forniceal = {pid for pid, ex in examples.items() if not ex["has_forniceal"]}
    assert no_forniceal == {f"Italy/{n}" for n in (1, 35, 54, 58, 75, 109)}
    assert not s.misaligned_masks and not s.files_skipped and len(s.duplicates_ignored) == 2
    written = summary.read_summary(builder.data_path)
    assert written["source_matches_known_archive"] is True and written["source_differences"] == []
    assert len(s.misnamed_files_accepted) == 5 and len(s.iccp_chunks_removed) > 0
    assert float(examples["Italy/53"]["hgb"]) == pytest.approx(15.1)  # text cell with a decimal comma
    assert math.isnan(examples["Italy/93"]["hgb"]) and examples["Italy/93"]["anemic"] == -1
    assert s.hgb_missing == ["Italy/93"] and not s.patients_without_metadata and not s.spreadsheet_problems
    assert {ex["gender"] for ex in examples.values()} == {"F", "M"}
    assert "tensorflow" not in sys.modules
