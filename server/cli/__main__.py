"""`python -m server.cli` (how torchrun starts a distributed build): `influence-index`."""

import sys

from server.cli import main

sys.exit(main())
