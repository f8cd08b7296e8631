"""A local screening web page: upload (or take) eye photos, see the masks, their areas and -- where available -- the
uncertainty, the usable / retake verdict and the Hb estimate; download a CSV of the batch.

    python -m anemia_jax.app --workdir=RUN [--workdir=RUN2 ...] [--screening=screening_model.json]
        [--quality=quality.json] [--temperature=temperature.json|none] [--host=127.0.0.1] [--port=8000]
        [--checkpoint=best|latest|<step>] [--tta ...] [--threshold=0.5] [--max_upload_mb=30] [--max_megapixels=50]
        [--allowed_host=NAME ...]
        [--config.<key>=<value> ...]
    python -m anemia_jax.app --onnx=model.onnx [--screening=...] [--quality=...] [--host=...] [--port=...] ...

``--runs`` is accepted for ``--workdir``. ``--onnx=model.onnx`` serves a model exported by ``python -m anemia_jax.export
--format=onnx`` with ONNX Runtime (``pip install onnxruntime``) instead of the runs with JAX: nothing to compile, so the
page opens sooner (experiments/results/photo_latency/); its threshold and quality thresholds default as in ``predict
--onnx``. Then open http://127.0.0.1:8000 in a browser on the same machine (on a phone
browser the "Take a photo" button opens the camera). Nothing leaves the machine: the page carries its own CSS and
JavaScript (`anemia_jax.screening.app_page`), its Content-Security-Policy allows no other origin, and the server listens
on the loopback address unless ``--host`` says otherwise (then anyone who can reach that address can use it: there is no
login).

Per photo the server decodes it as ``predict`` does (`anemia_jax.utils.image_io`: EXIF orientation, 16-bit, greyscale),
segments it with the runs (`anemia_jax.inference.segmenter.Segmenter`; several runs are averaged), and, with the photo
assessment of `anemia_jax.screening.photo_report` (quality verdict; the screening model of ``--screening``, with the sex
the health worker picks), reports the same values as ``predict``'s CSV. Safety: the body size is capped
(``--max_upload_mb``, checked before reading), the decoded size too (``--max_megapixels``, checked from the header
before decoding: a decompression bomb is refused unread), anything that does not decode is a message on the page, never
a crash; requests are served on threads (a burst of uploads waits in a long listen backlog, each answered in turn)
and the model runs under one lock, one photo at a time. The server answers only requests whose ``Host`` names the
address it listens on (for 127.0.0.1 also ``localhost``; ``--allowed_host`` adds a name, e.g. this machine's on the
LAN), so that a web page whose host name is made to resolve here cannot script it; uploads from another origin are
refused; every response carries the Content-Security-Policy and ``nosniff``; the CSV escapes file names that a
spreadsheet would run as formulas (`anemia_jax.screening.app_server`).

Why the standard library's ``http.server`` and no framework: four routes, one at a time through the model, on
localhost -- a WSGI/ASGI framework would add a dependency (and for Flask/Starlette a server) without removing any of
the code that matters here (limits, decoding, the inference lock); `ThreadingHTTPServer` keeps the page responsive
while a photo is analysed. No extra to install.

Exit status: 0 stopped with Ctrl-C; 2 bad arguments, runs or models; 5 the port cannot be opened.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from anemia_jax import cli
from anemia_jax.screening.app_server import ScreeningService, make_server

__all__ = ["build_service", "main"]


def _command() -> cli.Command:
    cmd = cli.Command("python -m anemia_jax.app", __doc__)
    cmd.run_flags(verb="screen with", temperature=True)
    cmd.onnx_flag(verb="screen with")
    fv = cmd.flags
    flags.DEFINE_alias("runs", "workdir", flag_values=fv)
    flags.DEFINE_string("screening", None, "Screening model JSON (anemia_jax.screening.screening_model): Hb "
                        "estimate, its interval and the anemia probability per photo.", flag_values=fv)
    flags.DEFINE_string("quality", None, "Quality thresholds JSON (default as predict: quality.json beside the "
                        "runs, else their config).", flag_values=fv)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (the default is this machine only).",
                        flag_values=fv)
    flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).", flag_values=fv)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold of the masks.", flag_values=fv)
    flags.DEFINE_float("max_upload_mb", 30.0, "Largest photo file accepted, in MB.", flag_values=fv)
    flags.DEFINE_float("max_megapixels", 50.0, "Largest decoded photo accepted, in megapixels.", flag_values=fv)
    flags.DEFINE_multi_string("allowed_host", [], "A host name the page may be opened at besides --host (e.g. this "
                              "machine's name on the LAN); requests naming any other Host are refused.", flag_values=fv)
    return cmd


def build_service(cmd: cli.Command) -> ScreeningService:
    """The service of a parsed command line: runs restored on one local device (or the ``--onnx`` model), compiled
    and run once before it is returned, and the photo assessment."""
    from anemia_jax.inference import onnx_engine, segmenter  # noqa: PLC0415
    from anemia_jax.screening import quality

    if cmd.onnx:
        seg = segmenter.Segmenter.from_onnx(onnx_engine.OnnxModel(cmd.onnx), batch_size=1,
                                            threshold=cmd.threshold if cmd.flags["threshold"].present else None)
        thresholds = quality.thresholds_for_export(cmd.onnx, seg.workdirs, seg.recorded_quality, cmd.quality)
        names = {str((r.get("config") or {}).get("model", {}).get("name")) for r in seg.onnx_model.runs}
        what = f"the exported model {cmd.onnx} ({', '.join(sorted(names))}, ONNX Runtime)"
    else:
        seg = _runs_segmenter(cmd)
        thresholds = quality.thresholds_for_runs(cmd.workdir, seg.recorded_quality, cmd.quality)
        what = f"{len(seg.runs)} run(s) ({seg.runs[0].config.model.name})"
    seg.warm_up()  # compiled (JAX) and run once before the page opens: the first photo is answered at full speed
    assessor = _assessor(cmd, seg.targets, thresholds)
    extra = " with the Hb screening model" if assessor is not None and assessor.screening is not None else ""
    calibrated = "calibrated probabilities" if seg.temperature is not None else "uncalibrated probabilities"
    return ScreeningService(seg, assessor, max_megapixels=cmd.max_megapixels,
                            description=f"Segmentation by {what}, targets {', '.join(seg.targets)}{extra}, "
                                        f"{calibrated}; running on this computer only.")


def _runs_segmenter(cmd: cli.Command):
    """The runs of ``--workdir`` restored on one local device (one photo per request), their compilation cache on."""
    import jax  # noqa: PLC0415

    from anemia_jax.inference import probabilities, segmenter, temperature  # noqa: PLC0415
    from anemia_jax.runs import restore
    from anemia_jax.utils import compilation_cache, parallel

    transforms = probabilities.parse_tta(cmd.tta_flips, cmd.tta_scales) if cmd.tta else None
    configs = cmd.run_configs()
    compilation_cache.enable_for_serving(configs[0].get("compilation_cache_dir", ""))
    restored = restore.load_runs(cmd.workdir, checkpoint=cmd.checkpoint, configs=configs,
                                 mesh=parallel.make_mesh(jax.local_devices()[:1]))  # one photo per request
    scale, _ = temperature.for_runs(cmd.workdir, cmd.temperature, restored[0].targets)
    return segmenter.Segmenter(restored, threshold=cmd.threshold, transforms=transforms,
                               prune_level=cmd.prune_level, batch_size=1, temperature=scale)


def _assessor(cmd: cli.Command, targets, thresholds):
    """The photo assessment: the verdict with ``thresholds``, and screening with ``--screening``."""
    from anemia_jax.screening import photo_report, screening_model  # noqa: PLC0415

    model = screening_model.load(cmd.screening) if cmd.screening else None
    return photo_report.PhotoAssessor(targets, thresholds, model)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the server until Ctrl-C (argv: program name first; default ``sys.argv``); returns the exit status."""
    cmd = _command()
    if (status := cmd.start_runs(sys.argv if argv is None else argv)) is not None:
        return status
    try:
        service = build_service(cmd)
    except Exception as e:  # noqa: BLE001 -- known failures become a message; `fail` re-raises the rest
        return cmd.fail_run(e)
    try:
        server = make_server(service, cmd.host, cmd.port, max_upload_bytes=int(cmd.max_upload_mb * 1e6),
                             allowed_host_names=cmd.allowed_host)
    except OSError as e:
        print(f"app: cannot listen on {cmd.host}:{cmd.port} ({e.strerror or e}); choose another --port or --host.",
              file=sys.stderr)
        return cli.EXIT_IO
    host, port = server.server_address[:2]
    print(f"Screening page on http://{host}:{port}/ (Ctrl-C stops it).", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
