"""Entry script: `python launch/export_hf.py --checkpoint runs/x --out hf/x` (same as `llmforge export-hf`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["export-hf", *sys.argv[1:]])
