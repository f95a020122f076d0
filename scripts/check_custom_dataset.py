"""XTuner's scripts/check_custom_dataset.py: same as ``xtuner check-dataset CONFIG``."""

import sys

from xtuner_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-dataset", *sys.argv[1:]]))
