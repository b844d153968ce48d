"""``kdlab`` command line.

Commands live in :mod:`kdlab.commands`, one module per command family, each registering itself with
:func:`command`; this file only assembles the parser and turns :class:`~kdlab.errors.KdlabError` into a one-line
message and exit code 2. Config keys are set in a YAML recipe and overridden as ``key.sub=value`` (``kdlab keys``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kdlab.errors import KdlabError
from kdlab.registry import Registry


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


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    from kdlab.commands.run import config_keys_help

    epilog = "config keys (set in the YAML file or as key.sub=value):\n" + config_keys_help()
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation of classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        cmd = COMMANDS.get(name)
        p = sub.add_parser(
            name, help=cmd.help, description=cmd.help, epilog=epilog if cmd.config_epilog else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        cmd.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(None if argv is None else [str(a) for a in argv])
    # overrides may come after options (`--out DIR train.epochs=1`); argparse leaves those over
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS.get(args.command).handler(args)
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kdlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdlab ... | head`: the reader went away; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
