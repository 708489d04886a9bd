"""`calibrate`: intrinsics, hand-eye and sim-camera alignment; built in the calibration issue."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="calibrate",
        description="Calibrate cameras (ChArUco intrinsics, hand-eye) and align the simulated camera with the real "
                    "one. Subcommands `intrinsics`, `handeye` and `sim-camera` are not available in this version yet.")
    parser.parse_args(argv)
    print("calibrate: error: no subcommands are available in this version yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
