"""Entry script: `python launch/prepare_data.py --help` (same as `llmforge prepare`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]])
