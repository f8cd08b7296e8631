"""How long ``predict`` takes on phone-sized photos, end to end and by stage, and what the overlay outline costs.

    python -m experiments.predict_timing --out=experiments/results/predict_timing [--megapixels=12,48]
        [--repeats=3] [--old_overlay_megapixels=12] [--size=256] [--features=32]

A UNet++ run at the default width (``configs/unetpp.py:data=phantom,size=256,dtype=float32``; initial weights, no
training: the time does not depend on what the weights are) is written to a temporary workdir, and a synthetic
4000x3000 (12 MP) JPEG photo of an eye-like scene is segmented by `anemia_jax.screening.photo_folder.predict_photos` as the command
does (decode, EXIF, resize, UNet++ forward pass, probabilities back to photo size, masks, quality verdict, overlay
with its outline and caption, uncertainty map, PNG files, CSV). Timed separately, on the same photo and masks:

* the overlay alone, as it is drawn now (`image_io.overlay`: outline by a separable running minimum on the masks'
  bounding box) and as it was drawn before (PIL's ``MinFilter`` over the whole photo, whose cost grows with the
  outline width squared), side by side in the same round, median of ``--repeats``;
* the new overlay at outline widths 1, 13 (predict's choice at 12 MP) and 40, to show the width does not matter,
  and with a mask whose bounding box is the whole photo (the worst case).

Results (medians, with the machine, the load average and the commit) go to ``<out>/predict_timing.md`` and ``.json``
(`experiments.provenance`). This is the speed record of `predict` on phone photos; no test times anything.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageFilter
from absl import flags

from anemia_jax import cli
from anemia_jax.utils import image_io
from experiments import provenance


def old_overlay(image: np.ndarray, masks: np.ndarray, outline: int, alpha: float = image_io.DEFAULT_ALPHA,
                 colors=image_io.COLORS) -> np.ndarray:
    """`image_io.overlay` as it was before its O(pixels) rewrite: PIL's MinFilter over the whole photo."""
    out = image.astype(np.float32)
    masks = masks.astype(bool)
    for c in np.argsort(-masks.reshape(-1, masks.shape[-1]).sum(0), kind="stable"):
        m = masks[..., c]
        colour = np.asarray(colors[c % len(colors)], np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
        if outline > 0 and m.any():
            eroded = np.asarray(PIL.Image.fromarray(m.astype(np.uint8) * 255).filter(
                PIL.ImageFilter.MinFilter(2 * outline + 1))) > 0
            out[m & ~eroded] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An eye-like scene: skin-toned smooth noise with a redder elliptical band (the lid) across the lower middle."""
    rng = np.random.default_rng(seed)
    small = rng.normal(size=(h // 50 + 2, w // 50 + 2, 3))
    noise = np.asarray(PIL.Image.fromarray(((small - small.min()) / np.ptp(small) * 255).astype(np.uint8)).resize(
        (w, h), PIL.Image.Resampling.BICUBIC), np.float32) - 128
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    lid = ((xx - w / 2) / (0.3 * w)) ** 2 + ((yy - 0.6 * h) / (0.08 * h)) ** 2 <= 1
    base = np.array([175.0, 125.0, 105.0]) + 0.3 * noise
    base[lid] += np.array([45.0, -35.0, -25.0])
    return np.clip(base, 0, 255).astype(np.uint8)


def _lid_masks(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    palpebral = ((xx - w / 2) / (0.28 * w)) ** 2 + ((yy - 0.62 * h) / (0.06 * h)) ** 2 <= 1
    both = palpebral | (((xx - w / 2) / (0.3 * w)) ** 2 + ((yy - 0.57 * h) / (0.08 * h)) ** 2 <= 1)
    return np.stack([palpebral, both], axis=-1)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    return _median_times(fn, repeats)[0]


def _median_times(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Medians of the wall time and of the CPU time of this process (every thread) of ``repeats`` calls. On a shared
    machine the CPU time is the steadier measure: it does not grow with other processes' load."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _write_run(root, size: int, features: int) -> str:
    """A UNet++ run (config.json + one checkpoint of its initial state) in ``root/run``; returns the workdir."""
    from anemia_jax.runs import checkpointing, config_lib, model_factory  # noqa: PLC0415
    from anemia_jax.training import experiment, reporting
    from anemia_jax.utils import parallel

    config = config_lib.load_config_file(f"{provenance.REPO}/configs/unetpp.py:data=phantom,size={size},dtype=float32")
    config.model.features = features
    mesh = parallel.make_mesh()
    model = model_factory.build_model(config)
    tx, _ = experiment.build_optimizer(config, total_steps=10, warmup_steps=1)
    state = experiment.init_train_state(config, model, tx, mesh)
    workdir = f"{root}/run"
    reporting.Reporter(workdir, is_main=True, tensorboard=False).write_config(config.to_dict())
    with checkpointing.CheckpointManager(f"{workdir}/checkpoints", max_to_keep=1) as manager:
        manager.save(1, state, metrics={"dice/mean": 0.0})
    return workdir


def time_predict(megapixels: Sequence[float], *, repeats: int, old_overlay_megapixels: float, size: int,
                 features: int) -> list[dict]:
    from anemia_jax.inference import segmenter
    from anemia_jax.runs import restore
    from anemia_jax.screening import photo_folder  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory() as root:
        run = restore.load_run(_write_run(root, size, features), checkpoint="latest")
        seg = segmenter.Segmenter([run])
        seg.segment([np.zeros((64, 64, 3), np.uint8)])  # compile once, outside the timings
        for mp in megapixels:
            w = int(round((mp * 1e6 * 4 / 3) ** 0.5))
            h = int(round(w * 3 / 4))
            photo = _photo(h, w)
            path = f"{root}/photo_{mp:g}mp.jpg"
            PIL.Image.fromarray(photo).save(path, quality=92)
            end_to_end, end_to_end_cpu = _median_times(lambda: photo_folder.predict_photos(seg, [path], f"{root}/out"),
                                                       repeats)
            decoded = image_io.load_photo(path)
            decode = _median_time(lambda: image_io.load_photo(path), repeats)
            segment = _median_time(lambda: seg.segment([decoded]), repeats)
            masks = _lid_masks(h, w)
            outline = max(1, round(max(h, w) / 300))  # what predict draws
            row = {"megapixels": mp, "photo": f"{w}x{h}", "outline": outline, "end_to_end_s": end_to_end,
                   "end_to_end_cpu_s": end_to_end_cpu,
                   "decode_s": decode, "segment_s": segment,
                   "overlay_new_s": _median_time(lambda: image_io.overlay(photo, masks, outline=outline), repeats),
                   "overlay_new_by_width_s": {str(k): _median_time(lambda k=k: image_io.overlay(photo, masks, outline=k),
                                                                   repeats) for k in (1, 13, 40)}}
            frame = masks.copy()
            frame[0, 0, 0] = frame[-1, -1, 0] = True  # bounding box = the whole photo
            row["overlay_new_full_frame_s"] = _median_time(lambda: image_io.overlay(photo, frame, outline=outline),
                                                           repeats)
            if mp <= old_overlay_megapixels:
                # Same round, alternating, so that the machine's load hits both alike.
                new, old = [], []
                for _ in range(repeats):
                    for fn, times in ((lambda: image_io.overlay(photo, masks, outline=outline), new),
                                      (lambda: old_overlay(photo, masks, outline), old)):
                        start = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - start)
                row["pair_overlay_new_s"], row["pair_overlay_old_s"] = statistics.median(new), statistics.median(old)
                np.testing.assert_array_equal(image_io.overlay(photo, masks, outline=outline),
                                              old_overlay(photo, masks, outline))
            rows.append(row)
            print(row, flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| photo | outline px | predict end to end (s) | its CPU time (s) | decode (s) | segment (s) | "
             "overlay now (s) | overlay before (s) | overlay now, width 1 / 13 / 40 (s) | overlay now, full-frame box "
             "(s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        widths = " / ".join(f"{r['overlay_new_by_width_s'][k]:.2f}" for k in ("1", "13", "40"))
        old = f"{r['pair_overlay_old_s']:.2f}" if "pair_overlay_old_s" in r else "not run"
        now = f"{r.get('pair_overlay_new_s', r['overlay_new_s']):.2f}"
        lines.append(f"| {r['photo']} ({r['megapixels']:g} MP) | {r['outline']} | {r['end_to_end_s']:.2f} | "
                     f"{r['end_to_end_cpu_s']:.2f} | {r['decode_s']:.2f} | {r['segment_s']:.2f} | {now} | {old} | {widths} | "
                     f"{r['overlay_new_full_frame_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _command() -> cli.Command:
    cmd = cli.Command("python -m experiments.predict_timing", __doc__)
    fv = cmd.flags
    flags.DEFINE_string("out", None, "Folder for predict_timing.md and .json.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_list("megapixels", ["12", "48"], "Photo sizes (4:3) in megapixels.", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (median).", flag_values=fv)
    flags.DEFINE_float("old_overlay_megapixels", 12, "Time the old overlay only up to this size (it takes minutes "
                       "at 48 MP).", flag_values=fv)
    flags.DEFINE_integer("size", 256, "Training resolution of the model.", flag_values=fv)
    flags.DEFINE_integer("features", 32, "UNet++ width (32: the default config's).", flag_values=fv)
    flags.DEFINE_string("note", "", "Free text stored with the results.", flag_values=fv)
    return cmd


def main(argv: Sequence[str]) -> int:
    start = time.time()
    cmd = _command()
    try:
        if cmd.parse(argv) is None:
            return cli.EXIT_OK
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    import jax  # noqa: PLC0415

    rows = time_predict([float(m) for m in cmd.megapixels], repeats=cmd.repeats,
                        old_overlay_megapixels=cmd.old_overlay_megapixels, size=cmd.size, features=cmd.features)
    body = (f"UNet++ (features {cmd.features}, {cmd.size}x{cmd.size}, float32, initial weights) on "
            f"{len(jax.devices())} {jax.default_backend()} device(s); synthetic JPEG photos; every time is the median "
            f"of {cmd.repeats} calls. 'End to end' is `photo_folder.predict_photos` on one photo (decode, segment, verdict, "
            "masks, overlay, uncertainty map, PNGs, CSV), wall time and the CPU time of the process (all threads; on "
            "this shared machine the steadier figure, see the load average above). 'Overlay before/now' were timed alternately in the same "
            "round on the same photo and lid-shaped masks, and give identical images. CPU-scale figures of this "
            "machine, not of any other.\n\n" + format_rows(rows))
    prov = provenance.record(argv[1:], time.time() - start, "-m experiments.predict_timing")
    path = provenance.write_results(cmd.out, "predict_timing", "predict on phone photos: time by stage", body,
                                    {"rows": rows}, prov, cmd.note)
    print(f"Wrote {path}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
