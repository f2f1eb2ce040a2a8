"""Entry script: `python launch/pretrain.py --help` (same as `llmforge pretrain`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["pretrain", *sys.argv[1:]])
