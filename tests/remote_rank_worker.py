"""training/pretrain.py with one rank made to look like it runs on another host (tests/test_rank_watchdog.py).

In the rank named by SIM_RANK: the hostname is SIM_HOST and the wall clock runs SIM_SKEW_S seconds
behind (negative: ahead), as on a machine whose clock is off; the status writes numbered in
SIM_FAIL_WRITES (comma-separated, 1-based) fail as on a full disk. Every other rank runs unchanged.
"""

import errno
import os
import socket
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from training import pretrain, rank_status  # noqa: E402

if os.environ.get("RANK") == os.environ.get("SIM_RANK", "1"):
    real_time, skew = time.time, float(os.environ.get("SIM_SKEW_S", "0"))
    time.time = lambda: real_time() - skew
    socket.gethostname = lambda: os.environ.get("SIM_HOST", "simulated-remote-host")
    failing = {int(n) for n in os.environ.get("SIM_FAIL_WRITES", "").split(",") if n}
    write, writes = rank_status._write_json, [0]

    def flaky_write(path: Path, text: str) -> None:
        writes[0] += 1
        if writes[0] in failing:
            raise OSError(errno.EDQUOT, "Disk quota exceeded (simulated)", str(path))
        write(path, text)

    rank_status._write_json = flaky_write

sys.exit(pretrain.main(sys.argv[1:]))
