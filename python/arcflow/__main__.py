"""Command line: ``python -m arcflow demo [options]`` and ``python -m arcflow info``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

COMMANDS = {
    "demo": "kernel SVM on scikit-learn's digits, arcflow vs the NumPy reference "
            "(options: python -m arcflow demo --help)",
    "info": "how this copy of arcflow was built (OpenMP, threads, CUDA)",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m arcflow",
        description="arcflow command line. Commands: "
                    + "; ".join(f"{name}: {text}" for name, text in COMMANDS.items()))
    parser.add_argument("command", choices=sorted(COMMANDS))
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage (and the error) and exits
        return 2
    command, rest = argv[0], argv[1:]  # the command's own options go to its own parser

    if command == "demo":
        from . import demo
        return demo.main(rest)
    import arcflow
    for key, value in arcflow.build_info().items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
