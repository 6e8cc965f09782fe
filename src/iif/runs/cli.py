"""The ``iif`` command line.

    iif demo --out DIR [--n-test N] [--seed S] [--quick] [--no-progress] [--threads T]
    iif reproduce NAME --out DIR [--scale smoke|full] [--seed S]
    iif attribute --task MODULE:FUNCTION --out DIR [--method M] [--settings FILE.toml] ...
    iif show DIR [--task MODULE:FUNCTION] [--test-index I ...] [--top K]
    iif report DIR --html [--out FILE] [--top K] [--task MODULE:FUNCTION] [--test-index I ...]
    iif explain --task MODULE:FUNCTION --test-index I [--contrast B|runner-up] [--out DIR]
                [--settings FILE.toml] [--proj-dim P] [--kronecker]
    iif --version

Each subcommand is a function ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`
with ``set_defaults(handler=...)``. Bad input ends the program with one line on stderr and a
non-zero exit code: 2 for a malformed command line, 1 for anything failing while running
(``iif: error: ...``, naming the file and line when the user's own code raised; see
:func:`iif.errors.error_message`). ``--debug`` (before or after the command) also prints the
traceback.

``demo`` and ``reproduce`` run the paper's harness (:mod:`iif_paper`, beside the library); it is
imported inside :func:`_cmd_demo`, :func:`_cmd_reproduce` and :func:`_experiment_names` only,
never by the library (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from iif.errors import InputError, UserCodeError, error_message
from iif.version import __version__

log = logging.getLogger("iif")

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error already printed
        return _exit_code(exc.code)
    _configure_logging(getattr(args, "verbose", 0))
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    from iif.progress import progress_default

    try:
        # --progress / --no-progress reach every loop, also in the user's task function
        with progress_default(getattr(args, "progress", None)):
            return int(args.handler(args))
    except KeyboardInterrupt:
        print("iif: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout stopped early (iif show DIR | head)
        _silence_stdout()
        return EXIT_INPUT
    except Exception as exc:
        return _report(exc, debug=bool(getattr(args, "debug", False)))


def _report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` as one ``iif: error: ...`` line on stderr, after its traceback when
    ``debug``; return the exit code."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    message = error_message(exc)
    if not debug and (isinstance(exc, UserCodeError) or not isinstance(exc, InputError)):
        message += "; run with --debug for the traceback"
    print(f"iif: error: {message}", file=sys.stderr)
    return EXIT_INPUT


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (debug messages)")
    common.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                        metavar="T", help="CPU threads for torch (default: torch's choice)")
    common.add_argument("--progress", dest="progress", action="store_const", const=True,
                        default=argparse.SUPPRESS,
                        help="always report progress: bars on a terminal, else a log line "
                             "with an ETA now and then (default: bars on a terminal, log "
                             "lines otherwise)")
    common.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                        default=argparse.SUPPRESS, help="report no progress")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, print the full traceback too")

    parser = argparse.ArgumentParser(
        prog="iif",
        description="Integrated Influence: which training samples made the model do this on "
                    "that test sample? Score > 0: including the training sample raises the "
                    "test loss (opponent); < 0: it lowers it (proponent).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", parents=[common],
        help="train a small MLP on scikit-learn digits and explain a few test predictions",
        description="Train a 64-64-10 MLP on scikit-learn digits, explain test predictions "
                    "with Integrated Influence, print the top proponents and opponents and "
                    "write summary.json, test_<index>.png (and test_<index>_contrast.png "
                    "for a misclassified sample: why predicted and not the label) and "
                    "attribution/ into --out.",
    )
    demo.add_argument("--out", required=True, metavar="DIR", help="output folder")
    demo.add_argument("--n-test", type=_positive_int, default=3, metavar="N",
                      help="test samples to explain (default: 3; the last one is the first "
                           "misclassified test sample when there is one)")
    demo.add_argument("--top", type=_positive_int, default=8, metavar="K",
                      help="proponents and opponents shown per test sample (default: 8)")
    demo.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed of the data split, model, training and attribution "
                           "(default: 0)")
    demo.add_argument("--quick", action="store_true",
                      help="a small run taking a few seconds (fewer samples, epochs, K=2)")
    demo.set_defaults(handler=_cmd_demo)

    reproduce = sub.add_parser(
        "reproduce", parents=[common],
        help="reproduce a table or figure of the paper",
        description="Run one of the paper's experiments (or all of them) and write NAME.json, "
                    "NAME.md and any figures into --out. Experiments: "
                    + ", ".join(_experiment_names()) + ".",
    )
    reproduce.add_argument("name", metavar="NAME",
                           help="experiment: " + ", ".join(_experiment_names()) + " or all")
    reproduce.add_argument("--out", required=True, metavar="DIR", help="output folder")
    reproduce.add_argument("--scale", choices=("smoke", "full"), default="smoke",
                           help="smoke: a quick run of the same code (default); full: the "
                                "paper's protocol")
    reproduce.add_argument("--seed", type=int, default=0, metavar="S",
                           help="seed of the data and subsets (default: 0)")
    reproduce.set_defaults(handler=_cmd_reproduce)

    attribute = sub.add_parser(
        "attribute", parents=[common],
        help="attribute your own model's test predictions to its training samples",
        description="Call the task function (no arguments; returns (task, train, test) or a "
                    "mapping with keys task, train, test and optionally models, checkpoints), "
                    "build the method from --settings and the flags (flags win), and write the "
                    "scores chunk by chunk into --out. Re-running the same command resumes; "
                    "under torchrun every rank takes its share of the chunks.",
    )
    attribute.add_argument("--task", required=True, metavar="MODULE:FUNCTION",
                           help="the task function, e.g. mytask:build or path/to/file.py:build")
    attribute.add_argument("--out", required=True, metavar="DIR", help="output folder")
    attribute.add_argument("--method", choices=("iif", "if", "tracin", "trak"), default=None,
                           help="attribution method (default: settings file, else iif)")
    attribute.add_argument("--settings", metavar="FILE.toml", default=None,
                           help="settings file (see iif.runs.config)")
    _projection_flags(attribute)
    attribute.add_argument("--solver", choices=("auto", "exact", "projected", "cg"),
                           default=None,
                           help="if: how the curvature is solved (default auto: projected when "
                                "--proj-dim is given, else exact)")
    attribute.add_argument("--test-batch", type=_positive_int, default=None, metavar="B",
                           help="iif: test samples trained together as stacked copies")
    attribute.add_argument("--chunk", type=_positive_int, default=None, metavar="N",
                           help="test samples per stored chunk (default: by method)")
    attribute.add_argument("--seed", type=int, default=None, metavar="S",
                           help="seed of the method's random choices")
    attribute.add_argument("--force", action="store_true",
                           help="replace the results in --out when they belong to another run "
                                "(other settings, model, data or checkpoints) or were written "
                                "by Attribution.save(); without it such a folder is refused. "
                                "Only the files iif writes there are removed")
    attribute.add_argument("--fitted", default=None, metavar="DIR",
                           help="folder of the method's fitted training-side state (IF, TRAK): "
                                "loaded when it holds this run's, else computed and saved "
                                "there; another run's is refused (one process)")
    attribute.add_argument("--peer-timeout", type=_positive_float, default=None,
                           metavar="SECONDS",
                           help="under torchrun: how long a rank waits for the others to join "
                                "(default: 300)")
    attribute.set_defaults(handler=_cmd_attribute)

    show = sub.add_parser(
        "show", parents=[common],
        help="summarise an attribution folder and draw proponents and opponents",
        description="Print what an attribution folder holds (method, settings, progress, "
                    "completeness, top proponents and opponents) and, given --task for the "
                    "images, write show_<i>.png per test index into the folder.",
    )
    show.add_argument("folder", metavar="DIR", help="folder written by iif attribute")
    show.add_argument("--task", default=None, metavar="MODULE:FUNCTION",
                      help="the task function, for the pictures")
    show.add_argument("--test-index", type=int, nargs="+", default=None, metavar="I",
                      help="test samples to detail and draw (default: the first 3; every "
                           "test is listed in one line)")
    show.add_argument("--top", type=_positive_int, default=8, metavar="K",
                      help="proponents and opponents per test sample (default: 8)")
    show.add_argument("--image-shape", type=int, nargs="+", default=None, metavar="D",
                      help="shape of one input image, e.g. 28 28 (default: from the data)")
    show.set_defaults(handler=_cmd_show)

    explain = sub.add_parser(
        "explain", parents=[common],
        help="explain one test prediction: proponents and opponents, or why A and not B",
        description="Attribute one test sample of the task function's test data with "
                    "Integrated Influence and print and draw the training samples behind it. "
                    "With --contrast B (a class or 'runner-up'): why the model predicts A and "
                    "not B, the samples pushing towards A and towards B.",
    )
    explain.add_argument("--task", required=True, metavar="MODULE:FUNCTION",
                         help="the task function (see iif attribute)")
    explain.add_argument("--test-index", type=int, required=True, metavar="I",
                         help="which test sample")
    explain.add_argument("--contrast", default=None, metavar="B",
                         help="the other class: an index or 'runner-up'")
    explain.add_argument("--out", default="explain-out", metavar="DIR",
                         help="folder for explain_<I>.png and .json (default: explain-out)")
    explain.add_argument("--settings", metavar="FILE.toml", default=None,
                         help="IIF settings file (see iif attribute)")
    _projection_flags(explain)
    explain.add_argument("--top", type=_positive_int, default=8, metavar="K",
                         help="training samples per row (default: 8)")
    explain.add_argument("--image-shape", type=int, nargs="+", default=None, metavar="D",
                         help="shape of one input image (default: from the data)")
    explain.set_defaults(handler=_cmd_explain)

    report = sub.add_parser(
        "report", parents=[common],
        help="write a self-contained HTML page of an attribution folder",
        description="Write one HTML file (images inline, no network) for a folder written by "
                    "iif attribute or Attribution.save: the method, settings and run key, "
                    "then per test sample its label and prediction (with --task), the "
                    "completeness and its top proponents (score < 0: lower the test loss) "
                    "and opponents (score > 0: raise it). With --task the samples are drawn "
                    "as images, or printed as text when the task's module defines "
                    "decode(x) -> str; without it they are named by index.",
    )
    report.add_argument("folder", metavar="DIR", help="folder written by iif attribute or "
                                                      "Attribution.save")
    report.add_argument("--html", action="store_true", default=True,
                        help="write the HTML page (the only format so far, and the default)")
    report.add_argument("--out", default=None, metavar="FILE",
                        help="the HTML file to write (default: DIR/report.html)")
    report.add_argument("--top", type=_positive_int, default=5, metavar="K",
                        help="proponents and opponents per test sample (default: 5)")
    report.add_argument("--task", default=None, metavar="MODULE:FUNCTION",
                        help="the task function, for the samples, labels and predictions")
    report.add_argument("--image-shape", type=int, nargs="+", default=None, metavar="D",
                        help="shape of one input image, e.g. 28 28 (default: from the data)")
    report.add_argument("--test-index", type=int, nargs="+", default=None, metavar="I",
                        help="the test samples to show (default: all)")
    report.set_defaults(handler=_cmd_report)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from iif_paper.demo import run_demo

    _check_out(args.out)
    run_demo(args.out, n_test=args.n_test, seed=args.seed, quick=args.quick,
             progress=getattr(args, "progress", None), top_k=args.top)
    return EXIT_OK


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from iif_paper.experiments import EXPERIMENTS, get_experiment, run_experiment

    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    for name in names:
        get_experiment(name)  # every name checked before anything runs
    _check_out(args.out)
    for name in names:
        log.info("running %s at scale %s", name, args.scale)
        result = run_experiment(name, args.out, scale=args.scale, seed=args.seed,
                                progress=getattr(args, "progress", None))
        print(f"{result.title} ({args.scale}, {result.seconds or 0.0:.1f} s); "
              f"ours (paper):")
        print(result.summary())
        print("wrote " + ", ".join(str(p) for p in result.paths(args.out)))
        print()
    return EXIT_OK


def _projection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proj-dim", type=_positive_int, default=None, metavar="P",
                        help="projection dimension ([projection] dim)")
    parser.add_argument("--kronecker", action="store_true", default=None,
                        help="Kronecker-factored projection of Linear and Conv2d layers")


def _projection_settings(args: argparse.Namespace) -> dict:
    return {"projection.dim": args.proj_dim,
            "projection.structure": "kronecker" if args.kronecker else None}


def _run_settings(args: argparse.Namespace, **flags) -> dict:
    """The settings file (``--settings``) with the command's flags and ``--no-progress`` laid
    over it (flags given as None leave the file's value)."""
    from iif.runs.config import load_settings, merge

    if args.settings is not None:
        path = Path(args.settings)
        if not path.is_file():
            raise InputError(f"--settings {args.settings}: "
                             + ("a folder, not a file" if path.is_dir() else "no such file"))
        try:
            loaded = load_settings(path)
        except UnicodeDecodeError:
            raise InputError(f"--settings {args.settings}: not a UTF-8 text (TOML) file") \
                from None
    else:
        loaded = {}
    settings = merge(loaded, {**flags, **_projection_settings(args)})
    if getattr(args, "progress", None) is not None:
        settings["progress"] = args.progress
    return settings


def _cmd_attribute(args: argparse.Namespace) -> int:
    from iif.results.diagnostics import summarize
    from iif.runs.config import build_method, check_settings
    from iif.runs.distributed import attribute_job, world
    from iif.task.job import load_job

    settings = _run_settings(args, method=args.method, seed=args.seed, chunk=args.chunk,
                             test_batch=args.test_batch, solver=args.solver)
    if args.solver is not None and settings.get("method", "iif") != "if":
        raise InputError(f"--solver applies to influence functions (--method if), not to "
                         f"{settings.get('method', 'iif')!r}")
    # settings, --out, --fitted and torchrun's RANK and WORLD_SIZE are checked before the
    # task function, which may train a model
    check_settings(settings)
    _check_out(args.out)
    ranks = world()
    if args.fitted is not None:
        if ranks[1] > 1:  # ranks featurise their own block of the training set
            raise InputError("--fitted runs in one process, not under torchrun")
        _check_out(args.fitted, "--fitted")
    job = load_job(args.task)
    method = build_method(job, settings)
    if args.fitted is not None:
        method.fit(args.fitted)
    timeouts = {} if args.peer_timeout is None else {"peer_timeout_s": args.peer_timeout}
    with _WarningsSeen() as seen:
        result = attribute_job(args.out, method, job, chunk=settings.get("chunk"),
                               force=args.force, **timeouts)
    if result is not None:
        print(f"wrote {args.out}: {result.method} scores {result.scores.shape[0]} test x "
              f"{result.scores.shape[1]} training samples in {result.info['seconds']:.1f} s")
        summary = summarize(result.info.get("flags"), result.completeness)
        # test samples by global index (iif.results.diagnostics); a run of one chunk has just
        # logged the same line, a resumed or chunked one has not said it for every test
        if summary and summary not in seen.messages:
            print(f"warning: {summary}")
    return EXIT_OK


class _WarningsSeen(logging.Handler):
    """The warnings iif logs during a block (``messages``), so that the command's closing
    summary does not repeat one word for word."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> _WarningsSeen:
        logging.getLogger("iif").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("iif").removeHandler(self)


def _cmd_show(args: argparse.Namespace) -> int:
    from iif.views.show import show

    print(show(args.folder, task=args.task, test_indices=args.test_index, k=args.top,
               image_shape=args.image_shape))
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from iif.runs.config import build_method, check_settings
    from iif.task.job import load_job
    from iif.views.explain import explain

    settings = _run_settings(args)
    settings.setdefault("method", "iif")
    if settings["method"] != "iif":
        raise InputError("iif explain uses Integrated Influence (method = \"iif\")")
    contrast = args.contrast
    if contrast is not None and contrast != "runner-up":
        try:
            contrast = int(contrast)
        except ValueError:
            raise InputError(f"--contrast must be a class index or 'runner-up', got "
                             f"{contrast!r}") from None
    check_settings(settings)
    _check_out(args.out)
    job = load_job(args.task)
    text, _ = explain(build_method(job, settings), job.test, args.test_index, args.out,
                      contrast=contrast, k=args.top, image_shape=args.image_shape)
    print(text)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from iif.views.html_report import report_folder

    path = report_folder(args.folder, args.out, top=args.top, task=args.task,
                         image_shape=args.image_shape, tests=args.test_index)
    print(f"wrote {path}")
    return EXIT_OK


def _experiment_names() -> list[str]:
    from iif_paper.experiments import EXPERIMENTS

    return list(EXPERIMENTS)


# ---- helpers ---------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: int) -> None:
    """INFO (or DEBUG with -v) from the ``iif`` loggers to stderr, set up once."""
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in tests)
        pass


def _check_out(out: str, flag: str = "--out") -> None:
    """Refuse the output folder ``out`` (given as ``flag``) before any work: an existing file,
    or a folder that cannot be created or written."""
    path = Path(out)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{flag} {out} is a broken symbolic link; remove it or give another "
                         f"folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {out} is a file, not a folder; give a new or existing folder")
    existing = path.absolute()
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        what = "a broken symbolic link" if not existing.exists() else "a file, not a folder"
        raise InputError(f"{flag} {out}: {existing} is {what}, so the folder cannot be "
                         f"created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write into" if existing == path.absolute() else "create folders in"
        raise InputError(f"{flag} {out}: no permission to {what} {existing}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
