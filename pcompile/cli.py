"""The `pcompile` command (also `python -m pcompile`)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pcompile", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="plan, train and check a small GPT on 4 local ranks")
    demo.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pcompile.demo import main as demo_main

        return demo_main(args.ranks)
    return 2


if __name__ == "__main__":
    sys.exit(main())
