"""``python -m ml model ...`` = ``ublkml model ...``; otherwise ``ublkml ml ...``."""

import sys

from ublk_driver.core.cli import main

argv = sys.argv[1:]
sys.exit(main(argv if argv[:1] == ["model"] else ["ml", *argv]))
