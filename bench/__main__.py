"""``python -m bench ARGS`` = ``ublkml bench ARGS`` (see docs/benchmarks.md)."""

import sys

from ublk_driver.core.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
