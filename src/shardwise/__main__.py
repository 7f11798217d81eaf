"""python -m shardwise: the command line (shardwise.commands.cli)."""

import sys

from .commands.cli import main

sys.exit(main())
