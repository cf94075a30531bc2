"""``python -m unetlab`` (and ``torchrun -m unetlab``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
