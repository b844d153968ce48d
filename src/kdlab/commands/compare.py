"""``kdlab compare``: our accuracy (mean ± std over seeds) next to the paper numbers recorded in the recipes."""

from __future__ import annotations

import argparse

from kdlab.cli import command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_OR_FOLDER", help="run folders, sweep/chain folders or any folder of runs")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--md", metavar="FILE", help="also write the markdown table to FILE")
    p.add_argument("--paper-only", action="store_true", help="only rows whose recipe records a paper number")


@command("compare", "compare runs or sweeps with the paper numbers recorded in their recipes (meta.paper_top1)", _args)
def compare(args: argparse.Namespace) -> int:
    from kdlab.engine.atomic import atomic_write_text
    from kdlab.errors import check_output_file
    from kdlab.pipelines import compare_rows, comparison_csv, comparison_markdown

    for flag, path in (("--csv", args.csv), ("--md", args.md)):
        if path:  # before any run is read; the tables are results files, replaced when they exist
            check_output_file(path, overwrite=True, flag=flag)
    rows = compare_rows(args.paths)
    md = comparison_markdown(rows, only_paper=args.paper_only)
    for path, text in ((args.csv, comparison_csv(rows) if args.csv else ""), (args.md, md + "\n")):
        if path:
            atomic_write_text(path, text, output=True)
    print(md)
    return 0
