"""`python -m llmforge <command>`: the `llmforge` command, runnable by a launcher from any install (a wheel has no
launch/ scripts): `deepspeed --num_gpus 8 --module llmforge pretrain --recipe my.yaml`, or `torchrun
--nproc-per-node 8 -m llmforge pretrain --recipe my.yaml`."""

import sys

from llmforge.allocator import reexec_with_tcmalloc
from llmforge.errors import exit_on_user_error

# The DeepSpeed launcher puts --local_rank=N before the command; the rank is in LOCAL_RANK too.
ARGS = [a for a in sys.argv[1:] if not a.startswith("--local_rank=")]
if ARGS[:1] in (["pretrain"], ["sft"], ["dpo"]):
    exit_on_user_error(reexec_with_tcmalloc)()  # before torch is imported (llmforge/allocator.py)

from llmforge.cli import main  # noqa: E402

if __name__ == "__main__":
    main(ARGS)
