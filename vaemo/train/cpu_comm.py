"""DeepSpeed's CPU collective op, loaded so that a killed run cannot make every later run hang.

On CPU, `deepspeed.init_distributed` JIT-builds its shared-memory op (`deepspeed_shm_comm`) through
torch's cpp_extension, in every process, even when nothing needs rebuilding. That build takes a lock
*file* (torch's FileBaton) and any other process that finds the file waits for it to vanish, with no
timeout. A process killed while it holds the file (a run stopped with SIGKILL, a job's timeout, a Ray
worker torn down mid-start) leaves it behind, and from then on every run on the machine hangs before its
first step.

Here every vaemo process first takes a kernel lock (flock) beside it. The kernel drops a flock when its
holder dies, so whoever holds it knows that a baton file still there was left by a dead process, and
removes it before DeepSpeed loads the op. The op is then cached in DeepSpeed's op table, so
`init_distributed` does not go through the baton again. A program outside vaemo that builds the same op at
the same moment is not covered by the flock; that race is the one torch had before.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

log = logging.getLogger(__name__)

STALE_BATON = "lock"  # the file name torch.utils.cpp_extension gives its FileBaton in a build directory


def load_cpu_comm_op() -> bool:
    """Build (first time) and load DeepSpeed's shm op under a kernel lock; False when it does not apply.

    Call before `deepspeed.init_distributed` on a CPU worker (DS_ACCELERATOR=cpu set).
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return False
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir / "vaemo.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        baton = build_dir / STALE_BATON
        if baton.exists():
            log.warning("removing %s, left by a process killed while it built DeepSpeed's shm op", baton)
            baton.unlink(missing_ok=True)
        builder.load(verbose=False)
    return True
