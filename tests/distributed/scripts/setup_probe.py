"""The trainer's start-up sequence on a RunConfig: resolve the launch, validate the layout, start the
process group. Prints one JSON line with the ParallelDims, or the ConfigError and exit code 2.

Usage: <launcher> tests/distributed/scripts/setup_probe.py [--set key=value ...]
"""

import argparse
import dataclasses
import json
import sys

from modsquad_ds.config import ConfigError, load_config
from modsquad_ds.distributed.bootstrap import setup, shutdown
from modsquad_ds.distributed.ds_config import ds_config_for_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--local_rank", type=int, default=None)
    args = parser.parse_args()
    try:
        cfg = load_config(overrides=args.overrides)
        ctx, dims = setup(cfg, ds_config_for_run(cfg))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # One write() per line: both ranks share torchrun's stdout pipe, and with PYTHONUNBUFFERED print()
    # writes the text and the newline separately, so two ranks' lines could run together.
    line = json.dumps({"rank": ctx.rank, **dataclasses.asdict(dims), "expert_dp_size": dims.expert_dp_size,
                       "local_experts": dims.local_experts, "global_batch": dims.global_batch})
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    shutdown(ctx)


if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import end_process

    main()
    end_process(0)  # as the trainer ends (gloo threads vs interpreter teardown)
