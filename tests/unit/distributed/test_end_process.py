"""bootstrap.end_process: a normal exit's work (threads joined, exit hooks in order, output flushed,
the exit code) without the interpreter teardown that can abort a run whose gloo threads are still
releasing tensors (see its docstring)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    from modsquad_ds.distributed.bootstrap import end_process

    out = Path(sys.argv[1])
    def note(name):
        with (out / "hooks").open("a") as f:
            f.write(name + "\\n")
    atexit.register(note, "registered first")
    atexit.register(note, "registered last")
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("finished")
    threading.Thread(target=late).start()
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1)  # an idle worker waits on its queue until threading's exit hook
    pool.submit(print, end="")
    sys.stdout.write("no newline: still in the buffer")
    sys.stderr.write("to stderr")
    end_process(int(sys.argv[2]))
    (out / "after").write_text("end_process returned")
""")


@pytest.mark.parametrize("code", [0, 3])
def test_end_process_does_a_normal_exits_work_and_keeps_the_code(tmp_path, code):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(code)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "no newline: still in the buffer"  # stdout is a pipe here: block-buffered
    assert proc.stderr == "to stderr"
    assert (tmp_path / "thread").read_text() == "finished"  # a non-daemon thread is waited for
    assert (tmp_path / "hooks").read_text() == "registered last\nregistered first\n"  # atexit's order
    assert not (tmp_path / "after").exists()

