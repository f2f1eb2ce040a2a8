"""Entry script: `python launch/generate.py --help` (same as `llmforge generate`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["generate", *sys.argv[1:]])
