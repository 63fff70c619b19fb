"""``correctnet train|evaluate|aggregate ...``: one console script for the three command lines.

``correctnet train ARGS`` is ``python -m correctnet.train ARGS`` (Hydra overrides), ``correctnet evaluate ARGS``
is ``python -m correctnet.evaluate ARGS`` and ``correctnet aggregate ARGS`` is ``python -m correctnet.aggregate
ARGS``: the same functions, the same arguments, the same exit statuses.
"""
from __future__ import annotations

import sys
from typing import Sequence

from . import __version__

USAGE = f"""\
usage: correctnet COMMAND [ARGS ...]

correctnet {__version__}: CorrectNet on simulated RRAM analog in-memory-computing chips.

commands:
  train      train, compensate, calibrate and evaluate (Hydra overrides: key=value, group=option, -m sweeps);
             the same as python -m correctnet.train; correctnet train --help lists the config groups
  evaluate   re-evaluate an exported checkpoint: correctnet evaluate checkpoint=PATH [key=value ...]
  aggregate  turn a sweep directory into results.md/.csv and a plot: correctnet aggregate DIR [key=value ...]

correctnet COMMAND --help shows the arguments of one command.
"""

COMMANDS = ("train", "evaluate", "aggregate")


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] in ("-V", "--version"):
        print(f"correctnet {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"correctnet: error: unknown command {command!r}; accepted: {', '.join(COMMANDS)} "
              f"(correctnet --help)", file=sys.stderr)
        return 2
    if command == "train":
        from .train import cli_main
        return cli_main(rest, prog="correctnet train")
    if command == "evaluate":
        from .evaluate.cli import main as evaluate_main
        return evaluate_main(rest)
    from .aggregate import main as aggregate_main
    return aggregate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
