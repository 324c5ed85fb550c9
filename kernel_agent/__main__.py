"""``python -m kernel_agent ...`` = ``ublkml agent ...``."""

import sys

from kernel_agent.cli import agent_main

sys.exit(agent_main(sys.argv[1:]))
