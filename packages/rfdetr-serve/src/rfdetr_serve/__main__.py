"""Allow ``python -m rfdetr_serve``."""

import sys

from rfdetr_serve.cli import main

sys.exit(main())
