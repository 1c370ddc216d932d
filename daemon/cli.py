"""The `ckptd` command line: parse, load and validate every setting, then hand over to the command.

Configuration errors exit 2 before anything starts (SPEC §3); each command owns its other exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import NoReturn

from daemon import __version__, exits, logs
from daemon.config import SPECS, Config, ConfigError, load
from daemon.config.schema import (
    COMMON,
    DOWNLOAD,
    RESTORE,
    RETENTION,
    SERVE,
    STORAGE,
    SUPERVISE,
    UPLOAD,
    default_of,
)

# command: (groups of setting flags it takes, one-line help)
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "run": (
        (COMMON, STORAGE, UPLOAD, RETENTION, RESTORE, SUPERVISE, SERVE),
        "entrypoint: restore, launch the start commands (or CMD after --), upload alongside, drain, exit",
    ),
    "watch": (
        (COMMON, STORAGE, UPLOAD, RETENTION, SERVE),
        "sidecar: upload completed files until SIGTERM/SIGINT or --exit-when, then drain and exit",
    ),
    "restore": ((COMMON, STORAGE, RESTORE), "init container: restore the configured checkpoints, then exit"),
    "ls": ((COMMON, STORAGE), "browse projects, jobs, checkpoints and files"),
    "inspect": ((COMMON, STORAGE), "tensor summary of a stored .safetensors file (header only)"),
    "urls": ((COMMON, STORAGE), "presigned download URLs of a job's checkpoint files, as JSON"),
    "download": ((COMMON, STORAGE, DOWNLOAD), "fetch stored files matching wildcards into a folder"),
    "prune": ((COMMON, STORAGE, RETENTION), "delete old checkpoints by retention rules (dry run unless --yes)"),
    "version": ((), "print the version"),
}

EPILOG = """\
Settings: command-line flag > environment > config file (--config or $CKPTD_CONFIG, YAML or JSON)
> default. Credentials come from the standard AWS chain, never from flags or URLs: every user of
the machine can read a command line (ps, /proc/PID/cmdline).
Exit codes: 2 configuration error, 3 required restore failed, 4 uploads did not all complete,
otherwise the trainer's own exit code (128+N when it died of signal N).
Run 'ckptd COMMAND --help' for a command's settings."""


class _Parser(argparse.ArgumentParser):
    """argparse quotes the offending argument in its usage errors; that may be a URL with a secret."""

    def error(self, message: str) -> NoReturn:
        super().error(logs.redact(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckptd",
        description="Checkpoint daemon for training jobs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ckptd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (groups, help_text) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text)
        if command != "version":
            p.add_argument("--config", metavar="FILE", help="config file, YAML or JSON [env: CKPTD_CONFIG]")
        _add_setting_flags(p, groups)
        _add_command_arguments(command, p)
    return parser


def _add_setting_flags(p: argparse.ArgumentParser, groups: Sequence[str]) -> None:
    for group in groups:
        g = p.add_argument_group(f"{group} settings")
        for name, spec in SPECS.items():
            if spec.group != group or not spec.flag:
                continue
            env = f" [env: {', '.join(spec.env)}]" if spec.env else ""
            default = "" if callable(spec.default) or spec.default in (None, ()) else f" (default: {spec.default})"
            flags = [spec.flag, "--job"] if name == "job_id" else [spec.flag]
            if spec.parse.__name__ == "boolean":
                g.add_argument(
                    *flags,
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=f"{spec.help}{default}{env}",
                )
            else:
                g.add_argument(
                    *flags,
                    dest=name,
                    metavar=spec.flag.rsplit("-", 1)[-1].upper(),
                    default=None,
                    help=f"{spec.help}{default}{env}",
                )


def _add_command_arguments(command: str, p: argparse.ArgumentParser) -> None:
    if command in ("ls", "inspect", "urls", "download", "prune", "version", "restore"):
        p.add_argument("--json", action="store_true", help="print data as JSON")
    if command == "run":
        p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="training command")
    elif command == "watch":
        p.add_argument("--exit-when", metavar="PATH", help="drain and exit once this path exists")
    elif command == "ls":
        p.add_argument("--checkpoint", metavar="C", help="list the files of this checkpoint ('latest' works)")
        p.add_argument("--sort", metavar="FIELD", help="sort by this column or metric (default: by creation/step)")
        p.add_argument("--reverse", action="store_true", help="reverse the order")
        p.add_argument("--limit", type=_positive, metavar="N", help="show the first N rows only")
    elif command == "inspect":
        p.add_argument(
            "path",
            metavar="PATH",
            help="stored path of a .safetensors file (rank-0/checkpoint-10/model.safetensors), or of a checkpoint "
            "(rank-0/checkpoint-10/, checkpoint-10 for every rank) to sum up its .safetensors files",
        )
    elif command == "urls":
        p.add_argument("--expires", default="7d", metavar="DURATION", help="URL lifetime, at most 7d (default: 7d)")
        p.add_argument("--output", metavar="FILE", help="write the JSON here (default: ckptd-urls-{job_id}.json)")
    elif command == "download":
        p.add_argument("--path", nargs="+", metavar="GLOB", help="with --job: e.g. 'rank-*/checkpoint-10/'")
    elif command == "prune":
        p.add_argument("--all", action="store_true", help="delete the whole job (with --job and --yes)")
        p.add_argument(
            "--force",
            action="store_true",
            help="with --all --yes: delete even if a rank's status says RUNNING (only when its daemon is known dead)",
        )
        p.add_argument("--yes", action="store_true", help="really delete (default: print the plan only)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def print_version(as_json: bool) -> int:
    deps = {}
    for dist in ("aiobotocore", "botocore", "watchdog", "uvloop", "prometheus-client", "structlog"):
        try:
            deps[dist] = version(dist)
        except PackageNotFoundError:
            deps[dist] = None
    if as_json:
        print(json.dumps({"version": __version__, "python": platform.python_version(), "dependencies": deps}))
    else:
        extra = ", ".join(f"{k} {v}" for k, v in deps.items() if v)
        print(f"ckptd {__version__} (python {platform.python_version()}; {extra})")
    return exits.OK


def _command(name: str) -> Callable[[Config, argparse.Namespace], int]:
    def run(config: Config, args: argparse.Namespace) -> int:
        module = importlib.import_module(f"daemon.commands.{name}")  # heavy imports only when used
        return module.main(config, args)

    return run


HANDLERS: dict[str, Callable[[Config, argparse.Namespace], int]] = {c: _command(c) for c in COMMANDS if c != "version"}


def _redacting_excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """A traceback quotes values (a URL, a request) as they were; strip credentials before stderr."""
    sys.stderr.write(logs.redact("".join(traceback.format_exception(kind, error, tb))))


def _one_shot(command: Callable[[Config, argparse.Namespace], int], config: Config, args: argparse.Namespace) -> int:
    """A command that signals only interrupt (not `run` or `watch`, which decide what they mean):
    SIGTERM does what SIGINT does, so a pod's stop runs the same clean-up (a download removes its
    temporary files, a prune leaves records the next one finishes), and either ends in one line."""
    heard: list[int] = []

    def on_term(signum: int, frame: object) -> None:
        heard.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored (a script's background job): interrupt anyway
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)  # asyncio.Runner's: cancels the main task, which cleans up

    signal.signal(signal.SIGTERM, on_term)
    try:
        return command(config, args)
    except KeyboardInterrupt:
        print(f"ckptd: {args.command} interrupted", file=sys.stderr)
        return 128 + (heard[0] if heard else signal.SIGINT)


def entry() -> NoReturn:
    """The `ckptd` program: `main()`, then an exit that skips tearing the interpreter down.

    When `main` returns, every command is done with everything (files fsynced and renamed, threads
    joined, the event loop closed); freeing every object and module on the way out only adds about
    0.2 s to a restore, which the GPUs wait for. Errors and SystemExit leave the usual way."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: show.py has told the user
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    sys.excepthook = _redacting_excepthook
    args = build_parser().parse_args(argv)
    if args.command == "version":
        return print_version(args.json)
    flags = {name: getattr(args, name, None) for name in SPECS}
    notes: list[tuple[str, str, dict]] = []
    try:
        # Only `run` starts the commands that the secrets of environment_variables are for.
        config = load(flags, os.environ, args.config, notes=notes, secrets=args.command == "run")
    except ConfigError as e:
        print(f"ckptd: {e}", file=sys.stderr)
        return exits.CONFIG
    logs.configure(config.log_level, config.log_format)
    for level, event, fields in notes:
        getattr(logs.get(), level)(event, **fields)
    if config.storage == default_of(SPECS["storage"], os.environ) and args.command in ("run", "watch", "restore"):
        logs.get().warning("using the embedded default store: checkpoints stay on this machine", storage=config.storage)
    if args.command in ("run", "watch"):
        return HANDLERS[args.command](config, args)
    return _one_shot(HANDLERS[args.command], config, args)
