"""``python -m modsquad_ds.evaluate``: the evaluation command (see modsquad_ds/eval/__main__.py)."""

from modsquad_ds.eval.__main__ import main

if __name__ == "__main__":
    from modsquad_ds.distributed.bootstrap import run_command

    run_command(main)  # not sys.exit: see end_process (gloo threads vs interpreter teardown)
