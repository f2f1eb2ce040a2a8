"""Render llmforge/templates/pretrain.sbatch for a recipe and submit it with sbatch (or print it with --dry-run).

    python launch/slurm/submit.py --recipe recipes/llama-1b.yaml --nodes 4 --gpus-per-node 8 --partition gpu \\
        --time 2-00:00:00 --account myproj -- --qos=high
"""

import sys

from llmforge.slurm import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
