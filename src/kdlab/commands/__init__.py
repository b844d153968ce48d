"""CLI commands; every module here is imported by :func:`kdlab.cli.build_parser` and registers its commands."""
