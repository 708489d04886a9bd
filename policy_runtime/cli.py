"""`policy-runtime`: serve exported policies over ZeroMQ (`serve`, `check`); built in the runtime issue."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="policy-runtime",
        description="Serve an exported flow VLA (ONNX Runtime) as action chunks over ZeroMQ + msgpack. "
                    "Subcommands `serve EXPORT_DIR` and `check EXPORT_DIR` are not available in this version yet.")
    parser.parse_args(argv)
    print("policy-runtime: error: no subcommands are available in this version yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
