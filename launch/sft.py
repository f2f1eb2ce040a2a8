"""Entry script: `deepspeed launch/sft.py --recipe recipes/sft-tiny.yaml` (same as `llmforge sft`)."""

import sys

from llmforge.cli import main

if __name__ == "__main__":
    main(["sft", *sys.argv[1:]])
