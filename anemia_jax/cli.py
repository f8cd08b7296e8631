"""The one flag grammar of every command: absl flags, with configs as `ml_collections` config flags.

* Training and the experiment scripts take ``--config=configs/<model>.py[:key=value,...]`` (`Command.config_flag`):
  the config file is loaded, parametrised and locked by ``ml_collections.config_flags``, and any field can be changed
  with ``--config.<a>.<b>=<value>``; a mistyped key fails naming the closest keys.
* Commands that work on finished runs (evaluate, predict, export, app) take ``--workdir=RUN`` (repeatable: several
  runs form an ensemble) and the same ``--config.<a>.<b>=<value>`` overrides, applied to each run's recorded config
  (`Command.run_flags`, `Command.parse_runs`, `Command.run_configs`), e.g. ``--config.dataset.data_dir=/data`` when
  the prepared data moved.

Each command owns a `Command` (its own absl ``FlagValues``), so several commands can live in one process (tests call
``evaluate.main([...])`` and ``predict.main([...])`` side by side). Parsing failures raise `CommandLineError`, which
the command turns into a one-paragraph message and exit status `EXIT_CONFIG`, never a traceback.

One error path: every command passes what stopped it to `Command.fail`, which prints the one-paragraph message of a
known failure (`exit_status`: config, data, checkpoint, output, busy workdir; see `anemia_jax.utils.errors`) and returns
its exit status; the traceback is printed too only with ``--verbose`` (a flag of every command). Anything else is a bug
and keeps its traceback.

Exit statuses (every command): 0 done; 1 the command ran but some of its work failed (listed); 2 invalid command
line or config; 3 missing or unusable data; 4 missing or damaged checkpoint, or one of another model; 5 an output
cannot be written (read-only, full disk, a file in the way); 6 the run directory is held by another trainer.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from anemia_jax.runs import config_lib, loss_config
from anemia_jax.utils import errors, xla_cpu

# Exit statuses shared by the commands (each command's docstring says which it uses).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran, but some of its work failed (e.g. unreadable photos, a non-finite loss)
EXIT_CONFIG = 2  # invalid command line or config
EXIT_DATA = errors.EXIT_DATA  # 3: missing or unusable data
EXIT_CHECKPOINT = errors.EXIT_CHECKPOINT  # 4: missing or damaged checkpoint, or one written by another model
EXIT_IO = errors.EXIT_IO  # 5: cannot write outputs (read-only place, full disk)
EXIT_BUSY = errors.EXIT_BUSY  # 6: the run directory is held by another trainer

__all__ = ["EXIT_BUSY", "EXIT_CHECKPOINT", "EXIT_CONFIG", "EXIT_DATA", "EXIT_FAILED", "EXIT_IO", "EXIT_OK",
           "Command", "CommandLineError", "QuietLibraries", "exit_status", "failure_message", "setup_logging"]


class CommandLineError(ValueError):
    """A command line that cannot run; the message says what was wrong and what to pass instead."""


class QuietLibraries(pylogging.Filter):
    """Drops INFO records logged through absl by Orbax (dozens per checkpoint), keeping warnings and errors."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


_LOG_TRACEBACKS = {"on": False}  # set from --verbose by the command that parsed last


class TracebacksOnlyIfVerbose(pylogging.Filter):
    """Keeps log records but drops their tracebacks unless ``--verbose``: a full disk makes Orbax, TensorStore and
    asyncio log dozens of them from their threads, burying the one message that says what to do."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.exc_info and not _LOG_TRACEBACKS["on"]:
            record.exc_info, record.exc_text = None, None
        return True


def setup_logging(verbosity: int = logging.INFO) -> None:
    """absl logging to stderr at ``verbosity``, without Orbax's INFO chatter, and without tracebacks in log records
    unless the command was given ``--verbose`` (idempotent)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults; commands parse their own
    logging.use_absl_handler()
    logging.set_verbosity(verbosity)
    logger = logging.get_absl_logger()
    if not any(isinstance(f, QuietLibraries) for f in logger.filters):
        logger.addFilter(QuietLibraries())
    # On the handler, so that records of every logger (asyncio's too) pass through it.
    handler = logging.get_absl_handler()
    if not any(isinstance(f, TracebacksOnlyIfVerbose) for f in handler.filters):
        handler.addFilter(TracebacksOnlyIfVerbose())


def exit_status(error: BaseException) -> int | None:
    """The exit status of a failure a command reports as a message (see the module docstring); None for anything
    else, which is a bug and keeps its traceback."""
    if isinstance(error, (CommandLineError, config_lib.ConfigError)):
        return EXIT_CONFIG
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    if errors.is_output_failure(error):
        return EXIT_IO
    return None


def failure_message(error: BaseException) -> str:
    """The one-paragraph message of a known failure (an OS error of writing gets its path, cause and advice)."""
    if errors.is_output_failure(error) and not isinstance(error, errors.OutputError):
        where = getattr(error, "filename", None) or "an output"
        return f"Could not write {where}: {errors.describe_os_error(error)}. {errors.output_advice(error)}"
    return str(error).strip()


def _override_keys(argv: Sequence[str]) -> list[str]:
    """The dotted keys of ``--config.<key>[=value]`` arguments (for error messages only)."""
    return [m.group(1) for arg in argv[1:] if (m := re.match(r"^--?config\.([^=]+)", arg))]


def _split_loss_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without its ``--config.loss.<key>[=]<value>`` arguments, and those as ``{key: value}``.

    The loss block changes shape with the chosen loss (each loss has its own hyper-parameters,
    `anemia_jax.runs.loss_config`), which a locked config flag cannot express: these overrides are applied after
    the config file is loaded (`Command.parse`). ``deep_supervision_weights`` is an ordinary field and stays.
    """
    rest, loss = [argv[0]], {}
    args = list(argv[1:])
    i = 0
    while i < len(args):
        match = re.match(r"^--?config\.loss\.([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?$", args[i], re.S)
        if match and match.group(1) not in loss_config.WRAPPER_KEYS:
            if match.group(2) is not None:
                loss[match.group(1)] = match.group(2)
            elif i + 1 < len(args):
                loss[match.group(1)] = args[i + 1]
                i += 1
            else:
                raise CommandLineError(f"{args[i]} needs a value ({args[i]}=VALUE).")
        else:
            rest.append(args[i])
        i += 1
    return rest, loss


def _config_spec(argv: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (for error messages and imports before absl parses)."""
    for i, arg in enumerate(argv[1:], start=1):
        match = re.match(r"^--?config(?:=(.*))?$", arg)
        if match:
            return match.group(1) if match.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _config_file_error(error: BaseException, spec: str | None) -> CommandLineError | None:
    """The message for a config file that cannot be run (a syntax error, or anything ``get_config`` or the file's
    imports raise), naming the file and line; None when ``error`` did not come from the config file."""
    if not spec:
        return None
    path = os.path.realpath(os.path.expanduser(spec.partition(":")[0]))
    if isinstance(error, SyntaxError) and error.filename and os.path.realpath(error.filename) == path:
        line = error.lineno
    else:
        lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
                 if os.path.realpath(frame.filename) == path]
        if not lines:
            return None
        line = lines[-1]
    what = f"{type(error).__name__}: {error.msg if isinstance(error, SyntaxError) else error}"
    return CommandLineError(f"The config file {path} cannot be loaded (line {line}: {what}). Fix the file (or "
                            "choose another one, e.g. one of configs/) and run the command again.")


class Command:
    """The flags of one command line.

    Args:
        name: the command, e.g. ``'python -m anemia_jax.evaluate'`` (help text).
        doc: its usage text (the module docstring), printed by ``--help``.
    """

    def __init__(self, name: str, doc: str):
        self._prog = name
        self._usage = doc
        self.flags = flags.FlagValues()
        self._template: ml_collections.ConfigDict | None = None
        self._config_file: bool | None = None  # --config file flag: None none, else whether it is required
        self._verbose_requested = False  # --verbose seen on a command line that failed to parse
        self._loss_overrides: dict[str, str] = {}  # --config.loss.<key>=<value> (`_split_loss_overrides`)
        # A command line is a program of its own: before JAX starts, it takes the package's CPU flag (a no-op
        # where JAX is already running, e.g. when tests call a command's `main` in-process).
        xla_cpu.applied[:] = xla_cpu.apply()
        flags.DEFINE_bool("verbose", False, "On a failure, print the traceback as well as the message.",
                          flag_values=self.flags)

    def __getattr__(self, name: str) -> Any:
        # cmd.split reads the parsed value of --split (any flag name but 'flags').
        if name.startswith("_") or name == "flags":
            raise AttributeError(name)
        return getattr(self.flags, name)

    def fail(self, error: BaseException) -> int:
        """Reports ``error`` as this command's one-paragraph message on stderr and returns its exit status; with
        ``--verbose`` the traceback is printed first. Re-raises anything that is not a known failure (`exit_status`).
        """
        status = exit_status(error)
        if status is None:
            raise error
        verbose = self.flags["verbose"].value if self.flags.is_parsed() else self._verbose_requested
        if verbose:
            traceback.print_exception(error, file=sys.stderr)
        name = self._prog.rsplit(".", 1)[-1]
        hint = "" if verbose or status == EXIT_CONFIG else " (--verbose prints the traceback)"
        print(f"{name}: {failure_message(error)}{hint}", file=sys.stderr)
        return status

    def fail_run(self, error: BaseException) -> int:
        """`fail` for a command working on finished runs: a FileNotFoundError or ValueError that is no known failure
        is an argument these runs cannot take (a split, TTA view, prune level, ensemble, threshold), reported as a
        command-line error (exit status 2) with the original kept as its cause; anything else goes to `fail`."""
        if exit_status(error) is None and isinstance(error, (FileNotFoundError, ValueError)):
            wrapped = CommandLineError(str(error))
            wrapped.__cause__ = error
            error = wrapped
        return self.fail(error)

    # ---------------------------------------------------------------------------------------------- flags

    def config_flag(self, *, required: bool = True) -> None:
        """``--config=configs/<model>.py[:arg]``: a locked `ml_collections` config file, overridable per field.

        (Defined at parse time: config_flags reads the ``--config.<key>`` overrides from the argv it is given then.)
        """
        self._config_file = required

    def _define_config_file(self, argv: Sequence[str]) -> None:
        config_flags.DEFINE_config_file(
            "config", None, "Config file, optionally parametrised: configs/unetpp.py:data=phantom,size=256. Change "
            "any field with --config.<key>=<value>.", flag_values=self.flags, lock_config=True, sys_argv=list(argv))
        if self._config_file:
            flags.mark_flag_as_required("config", flag_values=self.flags)

    def config_file_name(self) -> str:
        """The ``path[:arg]`` given to ``--config`` (after parsing)."""
        return config_flags.get_config_filename(self.flags["config"])

    def run_flags(self, *, verb: str, checkpoint_default: str = "best", tta: bool = True,
                  checkpoint_help: str = "'best' (validation mean Dice), 'latest' or a step.",
                  temperature: bool = False) -> None:
        """The flags of a command that restores runs: ``--workdir`` (repeatable), ``--checkpoint``, with ``tta``
        ``--tta``, ``--tta_flips``, ``--tta_scales``, ``--prune_level``, and with ``temperature`` ``--temperature``
        (`anemia_jax.inference.temperature.for_runs`). ``verb`` completes the help texts."""
        fv = self.flags
        flags.DEFINE_multi_string("workdir", [], f"Training run directory to {verb} (config.json + checkpoints/), "
                                  "local or gs://...; repeat it to combine several runs (e.g. the folds of a "
                                  "cross-validation) into an ensemble averaging their probabilities.", flag_values=fv)
        flags.DEFINE_string("checkpoint", checkpoint_default, checkpoint_help, flag_values=fv)
        if tta:
            flags.DEFINE_bool("tta", False, "Average over test-time augmentation views.", flag_values=fv)
            flags.DEFINE_string("tta_flips", "none,h", "Comma-separated flips of the TTA views (none, h, v, hv).",
                                flag_values=fv)
            flags.DEFINE_string("tta_scales", "1", "Comma-separated scales of the TTA views, e.g. 0.75,1,1.25.",
                                flag_values=fv)
            flags.DEFINE_integer("prune_level", None, f"UNet++: {verb} with the pruned network L^k.", flag_values=fv)
        if temperature:
            flags.DEFINE_string("temperature", None, "Temperature file calibrating the probabilities (python -m "
                                "anemia_jax.calibrate_quality writes temperature.json beside the runs, the default); "
                                "'none': the models' own probabilities.", flag_values=fv)

    def onnx_flag(self, *, verb: str) -> None:
        """``--onnx=MODEL.onnx``: an exported model run by ONNX Runtime instead of ``--workdir`` runs (`parse_runs`
        accepts either)."""
        flags.DEFINE_string("onnx", None, "An exported ONNX model (python -m anemia_jax.export --format=onnx) to "
                            f"{verb}, run by ONNX Runtime (pip install onnxruntime), instead of --workdir runs: no "
                            "compilation at start. Its ensemble, TTA and pruning were fixed at export.",
                            flag_values=self.flags)

    # -------------------------------------------------------------------------------------------- parsing

    def _help(self, argv: Sequence[str]) -> bool:
        if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
            print(f"{self._usage.strip()}\n\nFlags of {self._prog}:\n{self.flags.get_help()}")
            return True
        return False

    def parse(self, argv: Sequence[str]) -> list[str] | None:
        """Parses ``argv`` (program name first); returns the positional arguments, or None after printing --help.

        Raises:
            CommandLineError: an unknown or malformed flag, a missing required one, a bad config file or argument, or
                an unknown ``--config.<key>`` (listing the closest keys).
        """
        argv = list(argv)
        self._verbose_requested = any(a in ("--verbose", "-verbose", "--verbose=true") for a in argv[1:])
        if self._config_file is not None:
            argv, self._loss_overrides = _split_loss_overrides(argv)
        if self._config_file is not None and "config" not in self.flags:
            self._define_config_file(argv)
        if self._help(argv):
            return None
        spec = _config_spec(argv)
        if spec and self._template is None:
            path = spec.partition(":")[0]
            if not os.path.isfile(os.path.expanduser(path)):
                raise CommandLineError(f"Config file {path!r} does not exist (looked at {os.path.abspath(path)}). "
                                       "Pass one of the files in configs/, e.g. --config=configs/unetpp.py.")
            config_lib.make_config_importable(path)
        try:
            rest = self.flags(argv)[1:]
            if self._config_file is not None and self.flags["config"].present:
                config = self.flags.config  # config_flags loads the file lazily: fail here, not at first use
                if self._loss_overrides:
                    try:
                        loss_config.apply_overrides(config, self._loss_overrides)
                    except config_lib.ConfigError as e:
                        raise CommandLineError(f"Invalid --config.loss override: {e}") from None
            _LOG_TRACEBACKS["on"] = bool(self.flags["verbose"].value)
            return rest
        except flags.Error as e:
            message = str(e)
            # A bad config argument surfaces as a traceback inside config_flags' message; its last line says it all.
            for error in (config_lib.ConfigError, FileNotFoundError):
                marker = f"{error.__name__}: "
                if marker in message:
                    message = f"Invalid --config={spec}: {message.rsplit(marker, 1)[1].strip()}"
            raise CommandLineError(f"{message}\nPass --help to see every flag of {self._prog}.") from None
        except (AttributeError, KeyError) as e:
            raise (_config_file_error(e, spec) or self._unknown_override(argv, spec, e)) from None
        except (OSError, config_lib.ConfigError) as e:  # config_flags reports an unloadable file as an OSError
            raise (_config_file_error(e, spec) or CommandLineError(f"Invalid --config={spec}: {e}")) from None
        except Exception as e:  # noqa: BLE001 -- only what the config file itself raised becomes a message
            failure = _config_file_error(e, spec)
            if failure is None:
                raise
            raise failure from None

    def _unknown_override(self, argv: Sequence[str], spec: str | None, error: Exception) -> CommandLineError:
        # ml_collections raises AttributeError/KeyError (with at most one suggestion) for a missing key.
        messages = []
        try:
            config = self._template if self._template is not None else (
                config_lib.load_config_file(spec) if spec else None)
            if config is not None:
                messages = config_lib.unknown_keys(config, _override_keys(argv))
        except Exception as load_error:  # noqa: BLE001 -- report the original problem below
            messages = [f"(could not reload {spec} to suggest keys: {load_error})"]
        return CommandLineError("Invalid --config override: " + ("\n  ".join(messages) or str(error)))

    def parse_runs(self, argv: Sequence[str]) -> list[str] | None:
        """`parse` for run commands: ``--config.<key>=<value>`` overrides are parsed (typed, key-checked) against
        the first ``--workdir``'s recorded config; `run_configs` then applies them to every run."""
        argv = list(argv)
        if self._help(argv):
            return None
        try:
            self.flags(argv, known_only=True)  # only to read --workdir; everything is parsed again below
        except flags.Error:
            pass  # reported by the full parse below
        workdirs = list(self.flags["workdir"].value or [])
        onnx = self.flags["onnx"].value if "onnx" in self.flags else None
        self.flags.unparse_flags()
        if onnx:
            return self._parse_onnx(argv, workdirs)
        if not workdirs:
            alternative = " or an exported model with --onnx=MODEL.onnx" if "onnx" in self.flags else ""
            raise CommandLineError(f"Pass the training run to use with --workdir=RUN (repeat it for an ensemble)"
                                   f"{alternative}. Pass --help to see every flag of {self._prog}.")
        from anemia_jax.runs import restore  # noqa: PLC0415 -- JAX loads only once the command line looks right

        try:
            self._template = restore.load_config(workdirs[0])
        except (FileNotFoundError, ValueError) as e:
            raise CommandLineError(str(e)) from None
        if "config" not in self.flags:
            try:  # a config dict flag parses its overrides when it is defined
                config_flags.DEFINE_config_dict("config", self._template, "The runs' recorded config; change a "
                                                "field with --config.<key>=<value>.", flag_values=self.flags,
                                                lock_config=True, sys_argv=argv)
            except (AttributeError, KeyError) as e:
                raise self._unknown_override(argv, None, e) from None
            except flags.Error as e:
                raise CommandLineError(f"{e}\nPass --help to see every flag of {self._prog}.") from None
        return self.parse(argv)

    def _parse_onnx(self, argv: Sequence[str], workdirs: Sequence[str]) -> list[str] | None:
        """`parse` for ``--onnx``: the run flags do not apply (the export fixed them), nor do config overrides."""
        if workdirs:
            raise CommandLineError("Pass either --onnx=MODEL.onnx or --workdir=RUN, not both.")
        overrides = _override_keys(argv)
        if overrides:
            raise CommandLineError(f"--config.{overrides[0]}: an exported model (--onnx) has no config to change.")
        rest = self.parse(argv)
        fixed = [f"--{name}" for name in ("checkpoint", "tta", "tta_flips", "tta_scales", "prune_level", "temperature")
                 if name in self.flags and self.flags[name].present]
        if fixed:
            raise CommandLineError(f"{', '.join(fixed)}: an exported model's checkpoint, test-time augmentation, "
                                   "pruning and temperature were fixed when it was exported (python -m "
                                   "anemia_jax.export ... --tta --prune_level=k --temperature=FILE); drop them, or use "
                                   "--workdir=RUN.")
        return rest

    def start_runs(self, argv: Sequence[str]) -> int | None:
        """The opening of a command on finished runs: `parse_runs` on ``argv``, then `setup_logging`. Returns the exit
        status to end with at once (`EXIT_OK` after ``--help``; a bad command line's, its message printed), or None
        when the command goes on."""
        try:
            if self.parse_runs(argv) is None:
                return EXIT_OK
        except CommandLineError as e:
            return self.fail(e)
        setup_logging()
        return None

    def run_configs(self) -> list[ml_collections.ConfigDict]:
        """Each ``--workdir``'s recorded config with the ``--config.<key>=<value>`` overrides applied (none with
        ``--onnx``)."""
        from anemia_jax.runs import restore  # noqa: PLC0415

        overrides = dict(self.flags["config"].override_values) if "config" in self.flags else {}
        configs = []
        for workdir in self.flags.workdir:
            config = restore.load_config(workdir)
            config.update_from_flattened_dict(overrides)
            configs.append(config)
        return configs

    def config_overrides(self) -> dict[str, Any]:
        """The ``--config.<key>=<value>`` overrides as ``{dotted key: typed value}`` (after parsing), the loss's
        (``loss.name``, ``loss.<hyper>``) included, typed as the parsed config holds them."""
        overrides = dict(self.flags["config"].override_values)
        if self._loss_overrides and "config" in self.flags and self.flags["config"].present:
            loss = self.flags.config.loss
            overrides.update({f"loss.{key}": loss[key] for key in self._loss_overrides})
        return overrides
