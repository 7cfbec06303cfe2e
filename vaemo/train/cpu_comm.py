"""Keep DeepSpeed from compiling its CPU shared-memory collective, which training never uses.

On CPU, `deepspeed.init_distributed` JIT-builds `deepspeed_shm_comm` through torch's cpp_extension in
every process. DeepSpeed calls that op only from `inference_all_reduce` (tensor-parallel inference);
training's collectives go through torch.distributed (gloo). Building it anyway costs:
- about a minute of compiling on each new install, and a C++ compiler on every worker machine;
- a hang: the build takes a lock *file* (torch's FileBaton) that other processes wait on with no timeout.
  A process killed while it held the file (a run stopped with SIGKILL, a job's timeout, a Ray worker torn
  down mid-start) left every later run on the machine waiting before its first step.
Marking the op incompatible is DeepSpeed's own switch for platforms that lack it: `build_shm_op` then
returns None and the backend uses torch.distributed alone.
"""

from __future__ import annotations


def skip_cpu_shm_op() -> None:
    """Call before `deepspeed.init_distributed` on a CPU worker (DS_ACCELERATOR=cpu set)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
