"""``python -m ivr_daemon`` is ``ivr-daemon``."""

import sys

from ivr_daemon.cli import main

sys.exit(main())
