"""Tests of anemia_jax.data.input_pipeline on a tiny TFDS builder written here, over 8 fake CPU devices."""

import io
import sys

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from anemia_jax.data import input_pipeline as ip

NUM = 21  # Over 8 devices: shards of 3, 3, 3, 3, 3, 2, 2, 2 examples.
SOURCE_HW = (24, 20)
SIZE = (16, 16)


def _pixel(i: int) -> int:
    return 5 + 11 * i


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


class TinyEyes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Example i: a flat photo of value _pixel(i), a palpebral box, a forniceal mask missing for every third."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        mask = lambda: tfds.features.Image(shape=(None, None, 1), encoding_format="png")
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "palpebral": mask(), "forniceal": mask(),
            "has_palpebral": tfds.features.Scalar(np.bool_), "has_forniceal": tfds.features.Scalar(np.bool_),
            "patient_id": tfds.features.Text(), "country": tfds.features.Text(), "gender": tfds.features.Text(),
            "hgb": tfds.features.Scalar(np.float32), "age": tfds.features.Scalar(np.float32),
            "anemic": tfds.features.Scalar(np.int32)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        h, w = SOURCE_HW
        for i in range(NUM):
            palpebral = np.zeros((h, w), np.uint8)
            palpebral[6:18, 4:14] = 1  # Exactly half of the rows and columns of the 16x16 target.
            has_forniceal = i % 3 != 0
            forniceal = np.zeros((h, w), np.uint8)
            if has_forniceal:
                forniceal[: 2 + i, :] = 1
            yield i, {"image": PIL.Image.fromarray(np.full((h, w, 3), _pixel(i), np.uint8)),
                      "palpebral": _png(palpebral), "forniceal": _png(forniceal),
                      "has_palpebral": True, "has_forniceal": has_forniceal,
                      "patient_id": f"Italy/{i}", "country": "Italy" if i % 2 else "India", "gender": "F",
                      "hgb": np.float32(10 + i / 4), "age": np.float32(np.nan), "anemic": np.int32(i % 3 - 1)}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    b = TinyEyes(data_dir=str(tmp_path_factory.mktemp("tfds")), file_format="array_record")
    b.download_and_prepare()
    return b


@pytest.fixture(scope="module")
def host(builder):
    return ip.read_examples(builder, "train", np.arange(NUM), image_size=SIZE, targets=("palpebral", "forniceal"))


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return Mesh(np.array(jax.devices()), ("data",))


def _id(patient_ids) -> np.ndarray:
    return np.array([int(p.split("/")[1]) for p in patient_ids])


def test_read_metadata(builder):
    meta = ip.read_metadata(builder, "train")
    assert set(meta) == {"patient_id", "country", "gender", "hgb", "age", "anemic", "has_palpebral", "has_forniceal"}
    source = builder.as_data_source("train")
    np.testing.assert_array_equal(meta["patient_id"], [source[i]["patient_id"].decode() for i in range(NUM)])
    ids = _id(meta["patient_id"])
    assert meta["hgb"].dtype == np.float32 and meta["anemic"].dtype == np.int32
    np.testing.assert_allclose(meta["hgb"], 10 + ids / 4)
    np.testing.assert_array_equal(meta["has_forniceal"], ids % 3 != 0)
    assert np.isnan(meta["age"]).all() and isinstance(meta["country"][0], str)


def test_read_examples(builder, host):
    assert host.images.shape == (NUM, *SIZE, 3) and host.images.dtype == np.uint8
    assert host.masks.shape == (NUM, *SIZE, 2) and host.masks.dtype == np.uint8
    assert set(np.unique(host.masks)) <= {0, 1}
    ids = _id(host.metadata["patient_id"])
    np.testing.assert_array_equal(host.images[:, 0, 0, 0], [_pixel(i) for i in ids])
    # Area resize keeps the box exactly where it was: rows 6:18 of 24 -> 4:12 of 16, columns 4:14 of 20 -> 3:11.
    expected = np.zeros(SIZE, np.uint8)
    expected[4:12, 3:11] = 1
    np.testing.assert_array_equal(host.masks[0, ..., 0], expected)
    missing = ids % 3 == 0
    np.testing.assert_array_equal(host.mask_weights, np.stack([np.ones(NUM), ~missing], 1).astype(np.float32))
    assert not host.masks[missing, ..., 1].any() and host.masks[~missing, ..., 1].any()
    part = ip.read_examples(builder, "train", [4, 2], image_size=SIZE, targets=("forniceal",))
    np.testing.assert_array_equal(part.indices, [4, 2])
    np.testing.assert_array_equal(part.images, host.images[[4, 2]])
    np.testing.assert_array_equal(part.masks[..., 0], host.masks[[4, 2], ..., 1])
    np.testing.assert_array_equal(host.subset([4, 2]).metadata["patient_id"], part.metadata["patient_id"])
    with pytest.raises(ValueError, match="subset of this dataset's masks"):
        ip.read_examples(builder, "train", [0], image_size=SIZE, targets=("mask",))
    assert "tensorflow" not in sys.modules, "reading must not import TensorFlow"


def test_photo_resize_is_antialiased():
    # A 1-px checkerboard shrunk 3.75x / 2.75x: an antialiased filter averages it to mid-grey (measured: Lanczos
    # 126..129, std 0.5); nearest-neighbour sampling keeps 0/255 pixels (std 127.5), a box filter gives 113..142.
    y, x = np.mgrid[0:60, 0:44]
    board = ((y + x) % 2 * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.dstack([board, board, 255 - board])).save(buffer, format="PNG")
    small = ip._decode_image(buffer.getvalue(), SIZE).astype(np.float64)
    assert small.shape == (*SIZE, 3)
    np.testing.assert_allclose(small.mean(axis=(0, 1)), 127.5, atol=2)
    assert small.std(axis=(0, 1)).max() < 2 and np.abs(small - 127.5).max() <= 6


def test_layout_multi_process_shares():
    device_processes = [0, 0, 1, 1, 2, 2, 3, 3]
    shares = [ip.process_share(NUM, device_processes, p) for p in range(4)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(NUM))
    np.testing.assert_array_equal(shares[1], [2, 10, 18, 3, 11, 19])
    sizes = ip.shard_sizes(NUM, 8)
    np.testing.assert_array_equal(sizes, [3, 3, 3, 3, 3, 2, 2, 2])
    # Each process computes the rows of its own devices; together they equal the single-process rows.
    for step in (0, 1, 7):
        whole = ip.train_device_rows(step, seed=3, sizes=sizes, devices=range(8), per_device_batch=4)
        parts = [ip.train_device_rows(step, seed=3, sizes=sizes, devices=[2 * p, 2 * p + 1], per_device_batch=4)
                 for p in range(4)]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        assert (whole.reshape(8, 4) < sizes[:, None]).all()


def test_train_batches(host, mesh):
    ds = ip.DeviceDataset.from_host(host, mesh, batch_size=16, seed=0)
    assert ds.num_examples == NUM and ds.capacity == 3 and ds.steps_per_epoch() == 2
    batch = ds.train_batch(0)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {"image": ((16, *SIZE, 3), np.uint8), "masks": ((16, *SIZE, 2), np.uint8),
                      "mask_weights": ((16, 2), np.float32), "valid": ((16,), np.bool_), "index": ((16,), np.int32)}
    for value in batch.values():
        assert value.sharding.spec == P("data") and len(value.addressable_shards) == 8
        assert {s.data.shape[0] for s in value.addressable_shards} == {2}
    ids = _id(host.metadata["patient_id"])
    draws = {k: [] for k in range(8)}
    for step in range(3):  # 6 draws per device: 2 epochs of 3 examples, or 3 epochs of 2.
        batch = jax.device_get(ds.train_batch(step))
        assert batch["valid"].all()
        rows = batch["index"]  # Here host row == split index.
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], [_pixel(i) for i in ids[rows]])
        np.testing.assert_array_equal(batch["mask_weights"], host.mask_weights[rows])
        for k in range(8):
            draws[k].extend(rows[2 * k: 2 * k + 2])
    for k, drawn in draws.items():
        assert all(r % 8 == k for r in drawn), "a device drew an example it does not hold"
        counts = np.unique(drawn, return_counts=True)[1]
        assert len(counts) == ip.shard_sizes(NUM, 8)[k] and len(set(counts)) == 1, (k, drawn)


def test_train_batches_deterministic_and_resumable(host, mesh):
    ds = ip.DeviceDataset.from_host(host, mesh, batch_size=16, seed=5)
    run = [np.asarray(ds.train_batch(s)["index"]) for s in range(6)]
    resumed = ip.DeviceDataset.from_host(host, mesh, batch_size=16, seed=5)
    for s in (3, 4, 5):
        np.testing.assert_array_equal(np.asarray(resumed.train_batch(s)["index"]), run[s])
    other = ip.DeviceDataset.from_host(host, mesh, batch_size=16, seed=6)
    assert any(not np.array_equal(np.asarray(other.train_batch(s)["index"]), run[s]) for s in range(6))
    assert not all(np.array_equal(run[0], r) for r in run[1:])


def test_eval_batches_cover_each_example_once(host, mesh):
    ds = ip.DeviceDataset.from_host(host, mesh, batch_size=16)
    assert ds.num_eval_batches(8) == 3
    batches = [jax.device_get(b) for b in ds.eval_batches(batch_size=8)]
    assert len(batches) == 3 and all(b["image"].shape[0] == 8 for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(np.sort(index[valid]), np.arange(NUM))
    assert (index[~valid] == -1).all() and (~valid).sum() == 3 and not batches[-1]["valid"].all()
    for b in batches:
        np.testing.assert_array_equal(b["mask_weights"][b["valid"]], host.mask_weights[b["index"][b["valid"]]])
        np.testing.assert_array_equal(b["masks"][b["valid"]], host.masks[b["index"][b["valid"]]])
        assert not b["image"][~b["valid"]].any() and not b["mask_weights"][~b["valid"]].any()


def test_local_share_and_from_builder_match_global(builder, host, mesh):
    ds = ip.DeviceDataset.from_host(host, mesh, batch_size=16, seed=1)
    share = ip.process_share(NUM, [d.process_index for d in mesh.devices.flat], jax.process_index())
    local = ip.DeviceDataset.from_host(host.subset(share), mesh, batch_size=16, seed=1, num_global_examples=NUM)
    read = ip.DeviceDataset.from_builder(builder, "train", np.arange(NUM), mesh, image_size=SIZE,
                                         targets=("palpebral", "forniceal"), batch_size=16, seed=1)
    want = jax.device_get(ds.train_batch(4))
    for other in (local, read):
        got = jax.device_get(other.train_batch(4))
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="process_share"):
        ip.DeviceDataset.from_host(host.subset([0, 1]), mesh, batch_size=16, num_global_examples=NUM)


def test_errors(host, mesh):
    # 3 rows per device of 16*16*(3+2) + 4*2 + 5 bytes.
    message = r"needs 3.8 KiB per device \(21 examples at 16x16 with 2 masks.*limit of 1000 bytes.*Lower image_size"
    with pytest.raises(MemoryError, match=message):
        ip.DeviceDataset.from_host(host, mesh, batch_size=16, memory_limit_bytes=1000)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        ip.DeviceDataset.from_host(host, mesh, batch_size=12)
    with pytest.raises(ValueError, match="1-D mesh"):
        ip.DeviceDataset.from_host(host, Mesh(np.array(jax.devices()), ("batch",)), batch_size=16)
    small = ip.DeviceDataset.from_host(host.subset(np.arange(5)), mesh, batch_size=8)
    with pytest.raises(ValueError, match="holds no example"):
        small.train_batch(0)
    valid = np.concatenate([np.asarray(b["valid"]) for b in small.eval_batches()])
    assert valid.sum() == 5
