"""``kdlab`` command line.

Commands live in :mod:`kdlab.commands`, one module per command family, each registering itself with
:func:`command`; this file only assembles the parser and turns every failure into one line on stderr: a
:class:`~kdlab.errors.KdlabError` (bad input, also argparse's usage errors) or an ``OSError`` (read-only file system,
disk full, permissions) exits with code 2, any other exception is an internal error with code 1 and a hint to rerun
with ``--debug`` (anywhere on the command line), which also prints the traceback. Config keys are set in a YAML recipe
and overridden as ``key.sub=value`` (``kdlab keys``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from kdlab.errors import KdlabError, UsageError, describe_os_error
from kdlab.registry import Registry
from kdlab.signals import SIGTERM_EXIT, Terminated, raise_on_sigterm
from kdlab.trust import add_trust_argument, trust_from_cli


@dataclass
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    config_epilog: bool = False


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], config_epilog: bool = False):
    """Decorator registering ``handler(args) -> exit code`` as ``kdlab <name>``."""

    def deco(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.add(name, Command(help, add_arguments, handler, config_epilog))
        return handler

    return deco


def _load_commands() -> None:
    import kdlab.commands as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"kdlab.commands.{mod.name}")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line :class:`UsageError` s (printed by :func:`main`, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")

    def format_help(self) -> str:
        if self.epilog == _CONFIG_KEYS:  # listed only when asked for: it imports every method (and torch)
            from kdlab.config_keys import config_keys_help

            self.epilog = "config keys (set in the YAML file or as key.sub=value):\n" + config_keys_help()
        return super().format_help()


_CONFIG_KEYS = "\0config keys\0"  # a command's epilog placeholder, filled in by _Parser.format_help


DEBUG_FLAG = "--debug"


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that must be at least 1 (``--threads 0`` is a usage error)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse ``type=`` for counts where 0 means "off"."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = _Parser(prog="kdlab", description="Knowledge distillation of classifiers.")
    parser.add_argument(DEBUG_FLAG, action="store_true", help="on an error, also print the Python traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        cmd = COMMANDS.get(name)
        p = sub.add_parser(
            name, help=cmd.help, description=cmd.help, epilog=_CONFIG_KEYS if cmd.config_epilog else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        cmd.add_arguments(p)
        add_trust_argument(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = DEBUG_FLAG in argv  # accepted anywhere: `kdlab train cfg.yaml --out X --debug`
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return _dispatch(argv)
    except KdlabError as err:
        return _fail(str(err), err.exit_code, debug)
    except Terminated:
        print("kdlab: terminated (SIGTERM)", file=sys.stderr)
        return SIGTERM_EXIT
    except KeyboardInterrupt:
        print("kdlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdlab ... | head`: the reader went away; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # the environment, not kdlab: read-only file system, disk full, permissions, ...
        return _fail(describe_os_error(err), 2, debug)
    except Exception as err:  # a bug: one line and a hint, the traceback only on request
        what = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        hint = "" if debug else f"; rerun with {DEBUG_FLAG} for the traceback"
        return _fail(f"internal error ({what}){hint}", 1, debug)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`--out DIR train.epochs=1`); argparse leaves those over
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        from kdlab.config import yacs_hint

        raise UsageError(f"kdlab {args.command}: unrecognized arguments: {' '.join(unknown)}{yacs_hint(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    trust_from_cli(getattr(args, "trust_code", False))
    return COMMANDS.get(args.command).handler(args)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"kdlab: error: {message}", file=sys.stderr)
    return code


def entry() -> None:
    raise_on_sigterm()
    try:
        code = main()
    except Terminated:  # SIGTERM before main() reached its handlers (while importing)
        print("kdlab: terminated (SIGTERM)", file=sys.stderr)
        code = SIGTERM_EXIT
    sys.exit(code)


if __name__ == "__main__":
    entry()
