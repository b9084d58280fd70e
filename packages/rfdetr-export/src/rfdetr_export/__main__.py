"""Allow ``python -m rfdetr_export``."""

import sys

from rfdetr_export.cli import main

sys.exit(main())
