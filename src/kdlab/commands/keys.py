"""``kdlab keys [GROUP]``: every config key with its default and meaning (:mod:`kdlab.config_keys`)."""

from __future__ import annotations

import argparse

from kdlab.cli import command
from kdlab.config_keys import config_keys_help


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("group", nargs="?", metavar="GROUP",
                   help="only one group: a section (data, model, train, logging, ...), 'method', or a method (kd, dkd, ...)")  # fmt: skip


@command("keys", "list every config key with its default and meaning, grouped by section and method", _args)
def keys(args: argparse.Namespace) -> int:
    print(config_keys_help(args.group))
    return 0
