"""Entry script: `python launch/evaluate.py --checkpoint runs/tiny-char` (same as `llmforge evaluate`); perplexity
on the val split of each dataset, written as JSON to <run dir>/eval/."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
