"""Start-up time of modsquad_ds.distributed.bootstrap.init_distributed with and without the shm-op skip.

Each variant runs in a fresh process (1 rank) with an empty TORCH_EXTENSIONS_DIR, so "built" is the
cold-cache cost every new machine or container pays; a second "built" run shows the warm-cache cost.

    .venv/bin/python benchmarks/dist_init.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from modsquad_ds.distributed.bootstrap import end_process, init_distributed, shutdown
ctx = init_distributed(heartbeat_timeout_s=0)
print(json.dumps({"init_seconds": ctx.init_seconds, "shm_op_skipped": ctx.shm_op_skipped,
                  "since_start": time.perf_counter() - t0}))
shutdown(ctx)
end_process(0)
"""


def run(build: bool, ext_dir: str) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext_dir, MODSQUAD_BUILD_SHM_OP="1" if build else "0")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    with tempfile.TemporaryDirectory() as cold:
        rows = [("skipped (default)", run(False, cold)),
                ("built, cold cache", run(True, cold)),
                ("built, warm cache", run(True, cold))]
    print(f"{'shm op':<20} {'init_distributed s':>19} {'whole process s':>16}")
    for name, r in rows:
        print(f"{name:<20} {r['init_seconds']:>19.2f} {r['process_seconds']:>16.2f}")
    print(f"cold-cache speed-up of init_distributed: {rows[1][1]['init_seconds'] / rows[0][1]['init_seconds']:.0f}x")


if __name__ == "__main__":
    main()
