"""The ``spon`` command. Sub-commands are plugins (hook ``spon_register_commands``).

Bad input ends with one line on stderr (``error: ...``) and exit status 2, never a traceback;
``SPON_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import SponError


def _base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spon",
        description="TEAL-style activation sparsification with learned SPON biases: evaluate, train, sweep, report.",
    )
    parser.add_argument(
        "--plugins-dir", metavar="DIR", default=None,
        help="directory of one-file plugins to load (default: $SPON_PLUGINS_DIR, else ./plugins if present)",
    )
    return parser


def build_parser(toolkit) -> argparse.ArgumentParser:
    parser = _base_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in toolkit.commands:
        sp = sub.add_parser(entry.name, help=entry.description, description=entry.description)
        configure = entry.meta.get("configure")
        if configure is not None:
            configure(sp)
        sp.set_defaults(_run=entry.factory)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from .plugins import Toolkit

        pre, _ = _base_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
        toolkit = Toolkit(plugins_dir=pre.plugins_dir)
        parser = build_parser(toolkit)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return int(args._run(args, toolkit) or 0)
    except SponError as exc:
        if os.environ.get("SPON_DEBUG"):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: still one line, with the way to the traceback
        if os.environ.get("SPON_DEBUG"):
            raise
        print(f"error: internal error {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
              f"(run again with SPON_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
