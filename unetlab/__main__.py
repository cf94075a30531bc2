"""``python -m unetlab`` (and ``torchrun -m unetlab``) runs the command line."""

import sys

from unetlab.cli.main import main

sys.exit(main())
