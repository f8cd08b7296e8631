"""Segmenting new photographs with a trained run (or an ensemble of runs): mask PNGs and overlays at each photo's size.

    python -m anemia_jax.predict --workdir=runs/unetpp [--workdir=RUN2 ...] photo.jpg more_photos/ --out=masks/
        [--checkpoint=best|latest|<step>] [--tta [--tta_flips=none,h] [--tta_scales=1]] [--threshold=0.5]
        [--prune_level=k] [--batch_size=8] [--quality=quality.json] [--temperature=temperature.json|none]
        [--screening=screening_model.json [--sex=F|M | --sex_csv=sex.csv]] [--max_megapixels=50] [--max_file_mb=100]
        [--config.<key>=<value> ...]
    python -m anemia_jax.predict --onnx=model.onnx photo.jpg more_photos/ --out=masks/ [--threshold=...] ...

``--onnx`` predicts with a model exported by ``python -m anemia_jax.export --format=onnx`` (the runs, their ensemble,
TTA, pruning and temperature fixed in it), run by ONNX Runtime (``pip install onnxruntime``) instead of JAX: nothing
is compiled, so the first photo is answered sooner (experiments/results/photo_latency/). Its threshold defaults to the
one its card records, its quality thresholds to ``--quality``, else a ``quality.json`` beside the model file, else the
runs'. Everything after the model (resizing, masks, verdict, screening, files) is the same code.

Each photo (any size or aspect ratio; folders contribute their image files, non-recursively, sorted) is decoded with
PIL and turned upright by its EXIF orientation (phone photos are often stored sideways with an orientation tag), then
segmented by `anemia_jax.inference.segmenter.Segmenter`: resized to the training resolution as training photos were,
predicted (optionally with test-time augmentation, a pruned UNet++, or averaged over several runs; calibrated by
the temperatures of ``--temperature``, default the ``temperature.json`` that ``calibrate_quality`` writes beside
the runs: `anemia_jax.inference.temperature`), and its probabilities resized back to the photo's own size and
thresholded (``p > threshold``).

Each photo also gets a quality verdict, usable or retake with its reasons (`anemia_jax.screening.quality`: no
conjunctiva found, region too small, segmentation too uncertain, photo too dark, overexposed), with the thresholds of
``--quality`` (default: ``quality.json`` in the first run's folder or its parent, as ``python -m
anemia_jax.calibrate_quality`` writes it; else the defaults, `anemia_jax.screening.quality.DEFAULTS`). With ``--screening`` (a screening model,
`anemia_jax.screening.screening_model`) each photo also gets one answer (retake, likely anemic, likely not anemic, or
unclear: confirm with a blood test), the estimated Hgb with its prediction interval, the probability of anemia and the
call (WHO: < 12 g/dL women, < 13 g/dL men; unknown sex: 13), from colour features computed as the model's were
(`anemia_jax.screening.photo_report`), and the model's origin (PHANTOM for one fitted on synthetic photos) with the
research-use notice on every output. Sex: ``--sex=F|M`` for every photo, or ``--sex_csv`` (or,
without it, a ``sex.csv`` in the photo's folder) with columns ``file,sex`` (``file`` a name or a path relative to the
CSV; ``sex`` F/M/female/male, empty for unknown).

Outputs in ``--out``: ``<stem>_<target>.png`` (8-bit, 0 background / 255 mask, photo size), ``<stem>_overlay.png``
(the photo with each mask tinted and outlined, the verdict, the answer and any Hgb estimate written across its top,
the model's origin and the notice across its bottom),
``<stem>_uncertainty.png`` (8-bit grey: the per-pixel entropy of the mean probability, 0 certain .. 255 = 1 bit;
the largest over the targets), ``predictions.csv`` (file, size, mask fraction per target, the verdict and its
measures, and the screening columns) and ``predictions.json`` (the runs, checkpoints, the quality thresholds and
where they came from, the temperature, the screening model and its origin, and the counts of verdicts and answers).
A photo with the verdict 'retake' has no estimate anywhere: its screening cells are empty and the note says why.

Stems that repeat across folders get ``_2``, ``_3``... appended, and so does a stem whose outputs would replace one
of the input photos (``--out`` may be the photos' own folder: an output never overwrites an input; a warning names
it). A file that cannot be read as an image is reported with a warning and skipped, and so is anything that is not
a regular file (a FIFO or a device is never opened), a file over ``--max_file_mb`` and a photo over
``--max_megapixels`` (read from its header: it is refused before any pixel is decoded). Text cells of the CSV (file
names) are escaped so that a spreadsheet never runs them as formulas. Photos, folders and ``--out`` may be local or
on shared/cloud storage (``gs://...``).

It runs in one process (over that process's devices); photos are batched ``--batch_size`` at a time at the
training resolution, so memory does not grow with the photos' size beyond one decoded photo per batch slot.

Every output file is written atomically (`anemia_jax.utils.atomic`): it appears complete under its name or not at all,
even on a full disk or a kill. ``predictions.csv`` is rewritten after every batch, so it always lists the photos whose
files are all written; when writing fails (full disk, read-only ``--out``) the command stops with a message saying how
many photos were done.

Failures end with a one-paragraph message and no traceback unless ``--verbose``. Exit status:

| status | meaning |
|---:|---|
| 0 | every photo written |
| 1 | some photos could not be read (listed); the others were written |
| 2 | bad arguments or run directory; ``--out`` would replace an input with ``predictions.csv`` |
| 3 | no photo to read: no image file in the inputs, or none of them readable (nothing written) |
| 4 | no usable checkpoint (``--checkpoint=STEP`` damaged or absent, every checkpoint damaged, or one of another model configuration) |
| 5 | ``--out`` cannot be written (a file, read-only, full disk); the message says how many photos were done and whether predictions.csv lists them |
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from anemia_jax import cli
from anemia_jax.screening import photo_folder, photo_report, quality

__all__ = ["main"]


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.predict", __doc__)
    cmd.run_flags(verb="predict with", temperature=True)
    cmd.onnx_flag(verb="predict with")
    fv = cmd.flags
    flags.DEFINE_string("out", None, "Output folder for masks, overlays and predictions.csv.", flag_values=fv)
    flags.mark_flag_as_required("out", flag_values=fv)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold of the masks.", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Photos per device call (default: device count).", flag_values=fv)
    flags.DEFINE_string("quality", None, "Quality thresholds JSON (python -m anemia_jax.calibrate_quality); default: "
                        f"{quality.THRESHOLDS_FILE} in the first run's folder or its parent, else the defaults.",
                        flag_values=fv)
    flags.DEFINE_string("screening", None, "Screening model JSON (anemia_jax.screening.screening_model): adds the Hgb "
                        "estimate, its interval and the anemia call per photo.", flag_values=fv)
    flags.DEFINE_string("sex", None, "F or M: sex of every photo's subject, for the WHO threshold "
                        "(default: per photo from --sex_csv or sex.csv beside the photos; else unknown).",
                        flag_values=fv)
    flags.DEFINE_string("sex_csv", None, "CSV with columns file,sex (default: sex.csv in each photo's folder).",
                        flag_values=fv)
    flags.DEFINE_float("max_megapixels", photo_folder.MAX_PIXELS / 1e6, "Largest photo decoded, in megapixels "
                       "(read from its header: a larger one is refused before decoding).", lower_bound=0.0,
                       flag_values=fv)
    flags.DEFINE_float("max_file_mb", photo_folder.MAX_FILE_BYTES / 1e6, "Largest photo file read, in MB.",
                       lower_bound=0.0, flag_values=fv)
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command on ``argv`` (program name first, then photos/folders and flags); returns the exit status."""
    cmd = _command()
    try:
        inputs = cmd.parse_runs(sys.argv if argv is None else argv)
        if inputs is None:
            return cli.EXIT_OK  # --help
        if not inputs:
            raise cli.CommandLineError("Name the photos (files or folders) to segment.")
    except cli.CommandLineError as e:
        return cmd.fail(e)
    cli.setup_logging()
    # After the flags (--help and flag errors stay fast); JAX only for the runs (--onnx needs none of it).
    from anemia_jax.inference import onnx_engine, segmenter  # noqa: PLC0415
    from anemia_jax.screening import screening_model, wording

    try:
        photo_folder.find_photos(inputs)  # before the model loads: nothing to read is said at once
        if cmd.onnx:
            seg = segmenter.Segmenter.from_onnx(onnx_engine.OnnxModel(cmd.onnx), batch_size=cmd.batch_size,
                                                threshold=cmd.threshold if cmd.flags["threshold"].present else None)
            thresholds = quality.thresholds_for_export(cmd.onnx, seg.workdirs, seg.recorded_quality, cmd.quality)
            scale, scale_source = seg.temperature, f"the card of {cmd.onnx}" if seg.temperature else "none"
        else:
            import jax  # noqa: PLC0415

            from anemia_jax.inference import probabilities, temperature  # noqa: PLC0415
            from anemia_jax.runs import restore
            from anemia_jax.utils import compilation_cache, parallel

            transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
            configs = cmd.run_configs()
            # The runs' persistent compilation cache: a second predict on the same runs skips the compilation.
            compilation_cache.enable_for_serving(configs[0].get("compilation_cache_dir", ""))
            # This process's devices only: every process of a multi-host job would otherwise need the same photos.
            restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint,
                                         mesh=parallel.make_mesh(jax.local_devices()), configs=configs)
            scale, scale_source = temperature.for_runs(cmd.workdir, cmd.temperature, restored[0].targets)
            seg = segmenter.Segmenter(restored, threshold=cmd.threshold, transforms=transforms,
                                      prune_level=cmd.prune_level, batch_size=cmd.batch_size, temperature=scale)
            thresholds = quality.thresholds_for_runs(cmd.workdir, seg.recorded_quality, cmd.quality)
        model = screening_model.load(cmd.screening) if cmd.screening else None
        assessor = photo_report.PhotoAssessor(seg.targets, thresholds, model)
        record = {"screening_model": None if model is None else {
            "path": str(cmd.screening), "provenance": wording.provenance(model.training), "notice": wording.NOTICE,
            "features_from": model.training.get("features_from"), "constancy": model.constancy,
            "coverage": model.coverage, "anemia_threshold": model.threshold,
            "colour_domain": model.domain is not None},
            "temperature": {"values": scale, "source": scale_source}}
        report = photo_folder.predict_photos(seg, inputs, cmd.out, assessor=assessor, sex=cmd.sex, sex_csv=cmd.sex_csv,
                                             record=record, max_bytes=int(cmd.max_file_mb * 1e6),
                                             max_pixels=int(cmd.max_megapixels * 1e6))
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail_run(e)
    print(f"Wrote masks of {len(report.written)} photo(s) to {cmd.out}.")
    if report.failed:
        print(f"{len(report.failed)} input(s) failed:", file=sys.stderr)
        for path, why in report.failed.items():
            print(f"  {path}: {why}", file=sys.stderr)
        return cli.EXIT_FAILED
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
