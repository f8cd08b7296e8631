"""Never train on the wrong data: prepared datasets are tied to their source, broken
sources stop with a message, {0, 1} masks read as labels, and oversized zip members are skipped unread.

Sources are tiny synthetic folders and zips made here (`fake_eyes_archive` for Eyes-defy-anemia).
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import zipfile

import fake_eyes_archive as fake
import numpy as np
import pytest
from PIL import Image

from anemia_jax.data import loading
from anemia_jax.data.datasets import source_record
from anemia_jax.data.datasets.eyes_defy_anemia.eyes_defy_anemia_dataset_builder import Builder as EyesBuilder
from anemia_jax.data.datasets.image_mask_folder.image_mask_folder_dataset_builder import Builder as FolderBuilder
from anemia_jax.runs import config_lib
from anemia_jax.utils import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]


def image_folder(root: pathlib.Path, value: int, masks: dict[str, np.ndarray] | None = None) -> pathlib.Path:
    """A Kvasir-SEG-like folder: images a, b, c (solid grey ``value``), square masks, the official split files."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    square = np.zeros((24, 32), np.uint8)
    square[6:18, 8:24] = 255
    masks = masks or {}
    for name in "abc":
        Image.new("RGB", (32, 24), (value, value, value)).save(root / "images" / f"{name}.png")
        Image.fromarray(masks.get(name, square)).save(root / "masks" / f"{name}.png")
    (root / "splits_official_medico2020").mkdir()
    (root / "splits_official_medico2020" / "train.txt").write_text("a\nb\n")
    (root / "splits_official_medico2020" / "val.txt").write_text("c\n")
    return root


def kvasir_config(source: pathlib.Path, data_dir: pathlib.Path):
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=kvasir,test")
    config.dataset.data_dir = str(data_dir)
    config.dataset.builder_kwargs.source_dir = str(source)
    return config


def first_image_value(builder) -> int:
    return int(builder.as_data_source("train")[0]["image"][0, 0, 0])




# ----------------------------------------------------------------------- prepared data tied to its source


def test_prepared_folder_dataset_is_never_reused_for_another_source(tmp_path):
    a, b = image_folder(tmp_path / "A", 50), image_folder(tmp_path / "B", 200)
    data_dir = tmp_path / "tfds"
    builder = loading.prepare_builder(kvasir_config(a, data_dir))
    assert first_image_value(builder) == 50
    with pytest.raises(errors.DataError) as info:
        loading.prepare_builder(kvasir_config(b, data_dir))
    message = str(info.value)
    assert str(a) in message and str(b) in message and "data_dir" in message
    # What config.json records as the data used (train.py writes it as "data_source").
    recorded = loading.data_source(builder)
    assert recorded["source"]["path"] == str(a) and recorded["source"]["files"] == 8
    assert recorded["options"] == {"mask_threshold": 128}

    # Its own data_dir: B is prepared there and read.
    assert first_image_value(loading.prepare_builder(kvasir_config(b, tmp_path / "tfds_b"))) == 200
    # Same folder, changed files: also refused.
    Image.new("RGB", (32, 24), (90, 90, 90)).save(a / "images" / "a.png")
    with pytest.raises(errors.DataError, match="has changed since it was prepared"):
        loading.prepare_builder(kvasir_config(a, data_dir))
    # Another mask threshold changes the stored masks: refused too, naming the option.
    config = kvasir_config(b, tmp_path / "tfds_b")
    config.dataset.builder_kwargs.mask_threshold = "200"
    with pytest.raises(errors.DataError, match="mask_threshold=128.*mask_threshold=200"):
        loading.prepare_builder(config)


def test_a_copy_with_new_modification_times_is_the_same_source(tmp_path, caplog):
    """``cp -r``, a restored backup or a checkout changes every file's modification time and nothing else: the
    prepared data are reused (the content digest decides); same names and sizes with other bytes are refused."""
    a = image_folder(tmp_path / "A", 50)
    data_dir = tmp_path / "tfds"
    builder = loading.prepare_builder(kvasir_config(a, data_dir))
    recorded = loading.data_source(builder)["source"]
    assert recorded["content_sha256"] != recorded["sha256"]
    for path in a.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert source_record.fingerprint(a)["sha256"] != recorded["sha256"]  # the quick check alone would refuse
    with caplog.at_level(logging.INFO):
        assert first_image_value(loading.prepare_builder(kvasir_config(a, data_dir))) == 50
    assert "same contents" in caplog.text
    assert source_record.same_data(recorded, source_record.fingerprint(a, content=True))
    # Same names and sizes, other bytes: refused.
    split = a / "splits_official_medico2020" / "val.txt"
    split.write_text("d\n")
    with pytest.raises(errors.DataError, match="has changed since it was prepared"):
        loading.prepare_builder(kvasir_config(a, data_dir))
    assert not source_record.same_data(recorded, source_record.fingerprint(a, content=True))


def eyes_archive(path: pathlib.Path, number: int) -> pathlib.Path:
    patient = fake.Patient("Italy", number, f"{number}.jpg",
                           {"palpebral": (f"{number:03d}_palpebral.png", "white")})
    return fake.write_archive(path, [patient], {})


def test_prepared_eyes_dataset_is_never_reused_for_another_archive(tmp_path):
    a, b = eyes_archive(tmp_path / "a.zip", 1), eyes_archive(tmp_path / "b.zip", 2)
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=eyes,test")
    config.dataset.data_dir = str(tmp_path / "tfds")
    config.dataset.builder_kwargs.archive_path = str(a)
    builder = loading.prepare_builder(config)
    assert [e["patient_id"] for e in builder.as_data_source("train")] == [b"Italy/1"]
    config.dataset.builder_kwargs.archive_path = str(b)
    with pytest.raises(errors.DataError, match=rf"built from {a}.*asks for {b}"):
        loading.prepare_builder(config)
    assert loading.data_source(builder)["source"]["kind"] == "zip"


# ------------------------------------------------------------------------------- messages, not tracebacks


def test_malformed_spreadsheet_is_skipped_not_fatal(tmp_path):
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("xl/workbook.xml", "<workbook><sheets><sheet name='Foglio1'")  # cut short: an XML parse error
    patient = fake.Patient("Italy", 1, "1.jpg", {"palpebral": ("001_palpebral.png", "white")})
    source = fake.write_archive(tmp_path / "eyes.zip", [patient], {"Italy.xlsx": broken.getvalue()})
    builder = EyesBuilder(data_dir=str(tmp_path / "tfds"), archive_path=str(source), file_format="array_record")
    builder.download_and_prepare()
    assert len(builder.as_data_source("train")) == 1
    skipped = {s["path"]: s["reason"] for s in builder.build_summary.files_skipped}
    assert "unreadable spreadsheet" in skipped["dataset anemia/Italy.xlsx"]


# -------------------------------------------------------------------------------------------- mask values


def test_masks_stored_as_0_1_and_0_255_both_read(tmp_path):
    square01 = np.zeros((24, 32), np.uint8)
    square01[6:18, 8:24] = 1
    faint = (square01 * 150).astype(np.uint8)
    source = image_folder(tmp_path / "src", 80, masks={"a": square01, "b": square01 * 255, "c": faint})
    builder = FolderBuilder(config="kvasir_seg_256", source_dir=str(source), data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    examples = list(builder.as_data_source("train")) + list(builder.as_data_source("test"))
    for example in examples:
        assert example["has_mask"]
        np.testing.assert_array_equal(example["mask"][..., 0], square01)
    assert builder.build_summary["train"].masks_labels01 == 1


def test_mask_threshold_is_reachable_from_the_config_and_named_in_messages(tmp_path, warnings_log):
    config = config_lib.load_config_file(f"{ROOT}/configs/unetpp.py:data=kvasir,test")
    assert "mask_threshold" in config.dataset.builder_kwargs
    faint = np.zeros((24, 32), np.uint8)
    faint[6:18, 8:24] = 100
    source = image_folder(tmp_path / "src", 80, masks={"a": faint, "b": faint, "c": faint})
    warnings = warnings_log
    builder = loading.prepare_builder(kvasir_config(source, tmp_path / "t128"))
    assert not builder.as_data_source("train")[0]["mask"].any()
    assert any("--config.dataset.builder_kwargs.mask_threshold" in w for w in warnings), warnings
    assert not any("augment" in w for w in warnings)
    config = kvasir_config(source, tmp_path / "t100")
    config.dataset.builder_kwargs.mask_threshold = "100"
    assert loading.prepare_builder(config).as_data_source("train")[0]["mask"].sum() == 12 * 16
    config.dataset.builder_kwargs.mask_threshold = "300"
    with pytest.raises(config_lib.ConfigError, match="mask_threshold"):
        loading.prepare_builder(config)


# ----------------------------------------------------------------------------------- oversized zip members


def test_oversized_zip_member_is_skipped_unread(tmp_path, monkeypatch, warnings_log):
    patients = [fake.Patient("Italy", n, f"{n}.jpg", {"palpebral": (f"{n:03d}_palpebral.png", "white")})
                for n in (1, 2)]
    source = fake.write_archive(tmp_path / "eyes.zip", patients, {})
    big = "dataset anemia/Italy/2/2.jpg"
    with zipfile.ZipFile(source) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[big] = b"\xff\xd8" + bytes(3 << 20)  # 3 MiB that compress to a few kB
    with zipfile.ZipFile(source, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    warnings = warnings_log
    builder = EyesBuilder(data_dir=str(tmp_path / "tfds"), archive_path=str(source), max_file_mb=1,
                          file_format="array_record")
    builder.download_and_prepare()
    assert [e["patient_id"] for e in builder.as_data_source("train")] == [b"Italy/1"]
    assert big not in opened and "dataset anemia/Italy/1/1.jpg" in opened
    assert any(big in w and "over the 1 MiB cap" in w for w in warnings), warnings
