"""XTuner's merge-adapter tool: same as ``xtuner merge BASE ADAPTER OUT``."""

import sys

from xtuner_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))
