"""``python -m rfdetr_train`` / ``accelerate launch -m rfdetr_train``: see :mod:`rfdetr_train.cli`."""

import sys

from rfdetr_train.cli import main

if __name__ == "__main__":
    sys.exit(main())
