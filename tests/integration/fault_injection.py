"""Fault injection: every failure of issue 11 tried for real, as a user would meet it.

    python tests/integration/fault_injection.py            # all scenarios, then a table
    python tests/integration/fault_injection.py lock ckpt  # some scenarios

Each scenario starts the real commands (``python -m modsquad_ds.train`` alone, under torchrun and
under the deepspeed launcher, ``python -m data_tools.make_shards``) on a generated mini-Taskonomy,
with loader workers on as configs/demo.yaml has them, injects a fault (real signals, real damaged
files) and checks what the user sees. It prints one row per case: the case, PASS/FAIL, what
happened, and the time to fail (launch or signal to exit: how long the user waits for the answer).
tests/integration/test_fault_injection.py runs the same scenarios under pytest; the Slurm preemption
case lives in tests/integration/test_slurm.py (it needs the local cluster).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "tests"):  # the package, and the tests' shared helpers when run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from _sigint import with_sigint  # noqa: E402  (after the path is set)
BIN = Path(sys.executable).parent
EXIT_STOPPED = 3


# ---- processes -------------------------------------------------------------------------------
def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_STEP_ID"):
        e.pop(key, None)
    e.update(PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
             DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


class Proc:
    """A command in its own session, as if typed in a terminal (Ctrl-C at its default: tests/_sigint.py),
    output to a file (so a test can read it while it runs)."""

    def __init__(self, cmd: list[str], log: Path, environ: dict | None = None):
        self.log = log
        self._out = open(log, "w")
        self.started = time.monotonic()
        self.p = subprocess.Popen(with_sigint(cmd), cwd=REPO, env=environ or env(), stdout=self._out,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout_s:.0f} s:\n{self.output[-3000:]}") from None

    def wait_session(self, timeout_s: float) -> None:
        """Wait until every process of the command's session has ended (a launcher may end before
        its ranks: the deepspeed runner dies of SIGTERM while its per-node launcher saves them)."""
        import psutil

        def members():
            out = []
            for p in psutil.process_iter():
                try:
                    if os.getsid(p.pid) == self.p.pid and p.status() != psutil.STATUS_ZOMBIE:
                        out.append(p)
                except (ProcessLookupError, psutil.Error):
                    pass
            return out

        self.p.wait(timeout_s)
        wait_until(lambda: not members(), "the session's processes to end", timeout_s=timeout_s)

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()
        self._out.close()


def run(cmd: list[str], log: Path, timeout_s: float = 240, environ: dict | None = None) -> tuple[int, str, float]:
    proc = Proc(cmd, log, environ)
    try:
        code = proc.wait(timeout_s)
    finally:
        proc.kill()
    return code, proc.output, time.monotonic() - proc.started


def wait_until(condition, what: str, proc: Proc | None = None, timeout_s: float = 150, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.p.poll() is not None:
            raise AssertionError(f"ended ({proc.p.returncode}) while waiting for {what}:\n{proc.output[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def train_cmd(shards: Path, out: Path, *sets: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> list[str]:
    """``launcher`` ends with the flag that takes a module name (``-m``, ``--module``)."""
    args = ["modsquad_ds.train", "--config", "configs/demo.yaml", "--set", f"data.shards_dir={shards}",
            "--set", "data.batch_size=4", "--set", "train.warmup_steps=0", "--set", "train.log_every=1",
            "--set", f"train.out_dir={out}"]
    for item in sets:
        args += ["--set", item]
    return [*launcher, *args]


def torchrun() -> tuple[str, ...]:
    return (str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m")


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---- data -----------------------------------------------------------------------------------
def make_data(root: Path) -> Path:
    """The mini-Taskonomy (4 buildings x 3 points x 3 views, 32 px) and its train shards of 5:
    18 samples in 4 shards."""
    from data_tools import make_shards
    from data_tools.mini_taskonomy import generate

    if not (root / "shards" / "train.index.json").is_file():
        generate(root, buildings=4, points=3, views=3, resolution=32, seed=1, workers=2, progress=False)
        assert make_shards.main(["--root", str(root), "--out", str(root / "shards"), "--split", "train",
                                 "--split-csv", str(root / "splits" / "train_val_test_mini.csv"),
                                 "--samples-per-shard", "5", "--no-progress"]) == 0
    return root / "shards"


def _png_resized(data: bytes, size: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.resize((size, size)).save(out, format="PNG")
        return out.getvalue()


def shrink_member(tar_path: Path, domain: str, size: int = 16) -> str:
    """Rewrite a shard with its first sample's ``domain`` image at ``size`` px; returns the key."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    first_key = members[0][0].name.split(".")[0]
    tmp = tar_path.with_suffix(".rewrite")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            key, dom, _ = info.name.split(".")
            if key == first_key and dom == domain:
                data = _png_resized(data, size)
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, tar_path)
    return first_key


# ---- results --------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    ok: bool
    outcome: str
    seconds: float


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def check(self, case: str, ok: bool, outcome: str, seconds: float, output: str = "") -> bool:
        detail = "" if ok or not output else f"\n--- output ---\n{output[-2500:]}"
        self.rows.append(Row(case, bool(ok), outcome + detail, seconds))
        return bool(ok)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    def table(self) -> str:
        lines = ["| case | result | outcome | time to fail (s) |", "|---|---|---|---:|"]
        for r in self.rows:
            outcome = r.outcome.splitlines()[0][:150]
            lines.append(f"| {r.case} | {'PASS' if r.ok else 'FAIL'} | {outcome} | {r.seconds:.1f} |")
        return "\n".join(lines)


# ---- scenarios ------------------------------------------------------------------------------
def one_line_refusal(report: Report, case: str, output: str, code: int, seconds: float, key: str) -> None:
    errors = error_lines(output)
    ok = code == 2 and len(errors) == 1 and key in errors[0] and "Traceback" not in output
    report.check(case, ok, errors[0] if errors else f"exit {code}, no error line", seconds, output)


def scenario_preflight(report: Report, shards: Path, work: Path) -> None:
    """Bad inputs refused in one line before any process group: rank 0 of a 2-rank world whose
    rank 1 never starts (reaching the rendezvous would wait for it until the timeout)."""
    from modsquad_ds.distributed.env import free_port

    e = env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    bad_json = work / "bad_json"
    shutil.copytree(shards, bad_json)
    (bad_json / "train.index.json").write_text('{"format": "modsquad-taskonomy-shards", "shards": [')
    lacking = work / "lacking"
    from data_tools import make_shards

    assert make_shards.main(["--root", str(shards.parent), "--out", str(lacking), "--split", "train",
                             "--split-csv", str(shards.parent / "splits" / "train_val_test_mini.csv"),
                             "--domains", "rgb", "depth_zbuffer", "normal", "--samples-per-shard", "5",
                             "--no-progress"]) == 0
    missing = work / "missing_shard"
    shutil.copytree(shards, missing)
    (missing / "train-000002.tar").unlink()
    blocker = work / "a_file"
    blocker.write_text("not a folder")
    cases = [
        ("shard index not valid JSON", [f"data.shards_dir={bad_json}"], "data.shards_dir"),
        ("tasks' domains not in the shards", [f"data.shards_dir={lacking}"], "tasks.names"),
        ("split smaller than one batch per rank", ["data.batch_size=16"], "data.batch_size"),
        ("out_dir cannot be created", [f"train.out_dir={blocker}/run"], "train.out_dir"),
        ("shard in the index but missing", [f"data.shards_dir={missing}"], "data.shards_dir"),
        ("validation without a val split", ["train.eval_every=2"], "train.eval_every"),
    ]
    for i, (case, sets, key) in enumerate(cases):
        cmd = train_cmd(shards, work / f"pre{i}", "train.ep_size=2", "train.steps=5", *sets)
        code, output, seconds = run(cmd, work / f"pre{i}.log", timeout_s=90, environ=e)
        one_line_refusal(report, case, output, code, seconds, key)


def scenario_lock_and_signals(report: Report, shards: Path, work: Path) -> None:
    """One process with loader workers: a second run into the same folder, SIGUSR1, a crash
    (SIGKILL) that must not leave the folder locked, then SIGTERM (save, stop, exit 3)."""
    out = work / "run"
    first = Proc(train_cmd(shards, out, "train.steps=100000"), work / "first.log")
    try:
        wait_until(lambda: logged_steps(out) >= 2, "training to start", first)
        code, output, seconds = run(train_cmd(shards, out, "train.steps=100000"), work / "second.log", 120)
        errors = error_lines(output)
        report.check("second run into the same out_dir", code == 2 and len(errors) == 1
                     and "is in use by another run" in errors[0] and "Traceback" not in output,
                     errors[0] if errors else f"exit {code}", seconds, output)
        os.kill(first.p.pid, signal.SIGUSR1)
        wait_until(lambda: "SIGUSR1: saved, going on" in first.output, "the SIGUSR1 save", first, 90)
        report.check("SIGUSR1 save is logged", True,
                     next(l for l in first.output.splitlines() if "SIGUSR1" in l).strip(), 0.0)
        saved = (out / "checkpoints" / "latest").read_text()
        os.kill(first.p.pid, signal.SIGKILL)  # a crash: the rank dies, its workers with it
        first.p.wait(30)
    finally:
        first.kill()
    third = Proc(train_cmd(shards, out, "train.steps=100000"), work / "third.log")
    try:
        t0 = time.monotonic()
        wait_until(lambda: "resumed from" in third.output, "the run after the crash to start", third)
        report.check("lock left by a crashed run", saved in third.output,
                     f"next run took the folder and resumed from {saved}", time.monotonic() - t0, third.output)
        start = logged_steps(out)
        wait_until(lambda: logged_steps(out) >= start + 2, "training to go on", third)
        t0 = time.monotonic()
        os.kill(third.p.pid, signal.SIGTERM)
        code = third.wait(120)
        seconds = time.monotonic() - t0
        output = third.output
    finally:
        third.kill()
    latest = (out / "checkpoints" / "latest").read_text()
    ok = (code == EXIT_STOPPED and int(latest.split("_")[1]) == logged_steps(out)
          and "killed by signal" not in output and "stopped by SIGTERM or Ctrl-C, exit code 3" in output)
    report.check("SIGTERM, one process, loader workers on", ok,
                 f"exit {code}, checkpoint {latest} = last step {logged_steps(out)}", seconds, output)


def _signal_launcher(report: Report, case: str, name: str, shards: Path, work: Path, launcher: tuple[str, ...],
                     send, sets: tuple[str, ...] = ("train.ep_size=2",)) -> None:
    out = work / name
    proc = Proc(train_cmd(shards, out, *sets, "train.steps=100000", launcher=launcher), work / f"{out.name}.log")
    try:
        wait_until(lambda: logged_steps(out) >= 2, "training to start", proc)
        t0 = time.monotonic()
        send(proc)
        proc.wait_session(120)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    output = proc.output
    latest_file = out / "checkpoints" / "latest"
    latest = latest_file.read_text() if latest_file.is_file() else "none"
    ok = (latest != "none" and int(latest.split("_")[1]) == logged_steps(out)
          and "killed by signal" not in output and "stopped by SIGTERM or Ctrl-C, exit code 3" in output)
    report.check(case, ok, f"checkpoint {latest} = last step {logged_steps(out)}, no worker killed", seconds,
                 output)


def scenario_sigterm_torchrun(report: Report, shards: Path, work: Path) -> None:
    """SIGTERM to the torchrun agent (docker stop, Kubernetes, kill): it signals each rank's whole
    session, loader workers included."""
    _signal_launcher(report, "SIGTERM to torchrun (2 ranks, loader workers on)", "torchrun", shards, work, torchrun(),
                     lambda proc: os.kill(proc.p.pid, signal.SIGTERM))


def scenario_sigterm_deepspeed(report: Report, shards: Path, work: Path) -> None:
    """SIGTERM to the deepspeed launcher's process group: its per-node launcher terminates each
    rank's whole process tree. Then ``kill PID`` of the deepspeed command alone, which ends it and
    nothing else: the ranks notice their launcher is gone (launcher_watch) and stop the same way."""
    from modsquad_ds.distributed.env import free_port

    for case, name, send in (("SIGTERM to deepspeed (2 ranks, loader workers on)", "deepspeed",
                              lambda proc: os.killpg(proc.p.pid, signal.SIGTERM)),
                             ("SIGTERM to the deepspeed command alone (kill PID)", "deepspeed_pid",
                              lambda proc: os.kill(proc.p.pid, signal.SIGTERM))):
        launcher = (str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module")
        _signal_launcher(report, case, name, shards, work, launcher, send)


def scenario_ctrl_c(report: Report, shards: Path, work: Path) -> None:
    """Ctrl-C as a terminal sends it, to the whole foreground process group: one process, and torchrun
    (which forwards it to its ranks' sessions); both save and stop like SIGTERM."""
    _signal_launcher(report, "Ctrl-C, one process (loader workers on)", "ctrl_c", shards, work, (sys.executable, "-m"),
                     lambda proc: os.killpg(proc.p.pid, signal.SIGINT), sets=())
    _signal_launcher(report, "Ctrl-C to torchrun (2 ranks, loader workers on)", "ctrl_c_torchrun", shards, work,
                     torchrun(), lambda proc: os.killpg(proc.p.pid, signal.SIGINT))


def scenario_peer_killed(report: Report, shards: Path, work: Path) -> None:
    """SIGKILL one rank under torchrun: the survivor ends with the documented single line."""
    import psutil

    out = work / "peer"
    proc = Proc(train_cmd(shards, out, "train.ep_size=2", "train.steps=100000", launcher=torchrun()),
                work / "peer.log")
    try:
        wait_until(lambda: logged_steps(out) >= 2, "training to start", proc)
        ranks = psutil.Process(proc.p.pid).children()
        victim = max(ranks, key=lambda p: p.pid)
        t0 = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        proc.wait(90)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    output = proc.output
    rank_lines = [l for l in output.splitlines() if l.startswith("[rank")]
    ours = [l for l in output.splitlines() if l.startswith("[modsquad_ds.distributed]")]
    report.check("peer killed under torchrun", len(ours) == 1 and not rank_lines and "killed by signal" not in output,
                 ours[0] if ours else f"{len(rank_lines)} traceback lines", seconds, output)


def scenario_checkpoints(report: Report, shards: Path, work: Path) -> None:
    """Damaged files in complete checkpoints: fall back to the newest intact one, or one line."""
    base = work / "ckpt"
    # an invocation of 4 steps (train.stop_after) with train.log_every 10: shorter than one log window
    code, output, seconds = run(train_cmd(shards, base, "train.steps=100", "train.stop_after=4",
                                          "train.checkpoint_every=2", "train.log_every=10"), work / "ckpt.log")
    rows = [json.loads(l) for l in (base / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    loss = rows[-1].get("loss/total", float("nan")) if rows else float("nan")
    report.check("run shorter than train.log_every", code == 0 and loss == loss and "loss nan" not in output
                 and " 0.0 images/s" not in output,
                 next((l for l in output.splitlines() if l.startswith("stopped early")), f"exit {code}"), seconds, output)
    step4 = base / "checkpoints" / "step_00000004"
    scripts = sorted(p.name for folder in (step4, step4.parent) for p in folder.glob("zero_to_*.py"))
    has_manifest = (step4 / "manifest.json").is_file()
    report.check("zero_to_fp32.py not left in checkpoints", not scripts and has_manifest,
                 f"{step4.name}: {len(list(step4.iterdir()))} files, manifest.json {'present' if has_manifest else 'absent'}, "
                 f"DeepSpeed scripts: {scripts or 'none'}", 0.0)

    truncated = work / "ckpt_truncated"
    shutil.copytree(base, truncated)
    victim = truncated / "checkpoints" / "step_00000004" / "layer_1_expert_3_mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    code, output, seconds = run(train_cmd(shards, truncated, "train.steps=5", "train.checkpoint_every=2"),
                                work / "ckpt_truncated.log")
    skip = next((l for l in output.splitlines() if "skipped checkpoint" in l), "")
    report.check("truncated file in the latest checkpoint", code == 0 and "step_00000004" in skip
                 and victim.name in skip and "resumed from" in output and "step_00000002" in output,
                 skip.strip() or f"exit {code}", seconds, output)

    gone = work / "ckpt_gone"
    shutil.copytree(base, gone)
    for step in ("step_00000002", "step_00000004"):
        (gone / "checkpoints" / step / "mp_rank_00_model_states.pt").unlink()
    code, output, seconds = run(train_cmd(shards, gone, "train.steps=5"), work / "ckpt_gone.log")
    one_line_refusal(report, "file missing in every checkpoint", output, code, seconds, "mp_rank_00_model_states.pt")


def scenario_bad_samples(report: Report, shards: Path, work: Path) -> None:
    """One image of the wrong size per shard, a different member in each: every one skipped,
    counted, reported with its shard; the run ends normally."""
    bad = work / "bad_samples"
    shutil.copytree(shards, bad)
    domains = ["normal", "depth_zbuffer", "edge_texture", "rgb"]  # a label, the mask source, a 16-bit map, the input
    for i, domain in enumerate(domains):
        shrink_member(bad / f"train-{i:06d}.tar", domain)
    out = work / "bad_run"
    code, output, seconds = run(train_cmd(bad, out, "train.steps=4"), work / "bad_run.log")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    summary = next((l for l in output.splitlines() if l.startswith("warning:") and "skipped" in l), "")
    live = [l for l in output.splitlines() if "skipped a sample" in l]
    ok = (code == 0 and rows and rows[-1].get("data/skipped") == len(domains) and summary.startswith("warning: 4 ")
          and all(f"train-{i:06d}.tar (shape mismatch 1)" in summary for i in range(4)) and live)
    report.check("labels and images of the wrong size", ok, summary or f"exit {code}", seconds, output)


def scenario_shard_vanishes(report: Report, shards: Path, work: Path) -> None:
    """A shard deleted while the run trains: an error naming it at the next epoch, not a skip."""
    copy = work / "vanishing"
    shutil.copytree(shards, copy)
    out = work / "vanish_run"
    proc = Proc(train_cmd(copy, out, "train.steps=100000"), work / "vanish.log")
    try:
        wait_until(lambda: logged_steps(out) >= 1, "training to start", proc)
        t0 = time.monotonic()
        (copy / "train-000001.tar").unlink()
        code = proc.wait(120)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    output = proc.output
    lines = [l for l in output.splitlines() if "listed in the index but missing" in l]
    ok = code == 65 and len(lines) == 1 and "Traceback" not in output
    report.check("shard deleted during the run", ok, lines[0] if lines else f"exit {code}", seconds, output)


def scenario_make_shards_interrupt(report: Report, shards: Path, work: Path) -> None:
    """Ctrl-C (SIGINT to the whole foreground group, as a terminal sends it) and SIGTERM to the whole
    group (as Slurm's scancel and time limit send it) while shards are written.

    On a data set of its own, 400 views: the shared one's 36 were all written within ~0.1 s, and on a
    busy machine the interrupt sometimes landed after the last one (exit 0, nothing to test). Only a
    shard's temporary file says a shard is being written: the index is written through one too.
    """
    from data_tools.mini_taskonomy import generate

    raw = work / "many_views"
    generate(raw, buildings=4, points=10, views=10, resolution=32, seed=2, workers=2, progress=False)
    for case, sig, code_wanted, said in (("Ctrl-C in make_shards", signal.SIGINT, 130, "] interrupted:"),
                                         ("SIGTERM to make_shards", signal.SIGTERM, 143, "] stopped by SIGTERM:")):
        out = work / f"shards_{sig.name}"
        proc = Proc([sys.executable, "-m", "data_tools.make_shards", "--root", str(raw), "--out", str(out),
                     "--split", "train", "--samples-per-shard", "1", "--workers", "2", "--no-progress"],
                    work / f"make_shards_{sig.name}.log")
        try:
            wait_until(lambda: out.is_dir() and any(out.glob(".train-*.tmp")), "a shard being written", proc,
                       60, 0.005)
            t0 = time.monotonic()
            os.killpg(proc.p.pid, sig)
            code = proc.wait(60)
            seconds = time.monotonic() - t0
        finally:
            proc.kill()
        output = proc.output
        leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        tail = [line for line in output.splitlines() if said in line]
        ok = code == code_wanted and len(tail) == 1 and "Traceback" not in output and not leftovers
        report.check(case, ok, (tail[0] if tail else f"exit {code}") + (f"; left {leftovers}" if leftovers else ""),
                     seconds, output)

    # Ctrl-C in verify_shards, once its progress bar shows a shard checked, on the finished shards
    out = work / "shards_SIGINT"
    code, output, _ = run([sys.executable, "-m", "data_tools.make_shards", "--root", str(raw), "--out", str(out),
                           "--split", "train", "--samples-per-shard", "1", "--workers", "2", "--no-progress"],
                          work / "make_shards_resumed.log", timeout_s=120)
    assert code == 0, output[-2000:]
    proc = Proc([sys.executable, "-m", "data_tools.verify_shards", "--index", str(out / "train.index.json"),
                 "--decode", "--workers", "2"], work / "verify_shards.log")
    try:
        wait_until(lambda: re.search(r"verify: +\d+%\|.*\| *[1-9]\d*/400", proc.output), "a shard checked", proc,
                   60, 0.005)
        t0 = time.monotonic()
        os.killpg(proc.p.pid, signal.SIGINT)
        code = proc.wait(60)
        seconds = time.monotonic() - t0
    finally:
        proc.kill()
    output = proc.output
    said = [line for line in output.splitlines() if line.startswith("interrupted:")]
    report.check("Ctrl-C in verify_shards", code == 130 and len(said) == 1 and "Traceback" not in output,
                 said[0] if said else f"exit {code}", seconds, output)


SCENARIOS = {
    "preflight": scenario_preflight,
    "lock": scenario_lock_and_signals,
    "torchrun": scenario_sigterm_torchrun,
    "deepspeed": scenario_sigterm_deepspeed,
    "ctrl_c": scenario_ctrl_c,
    "peer": scenario_peer_killed,
    "ckpt": scenario_checkpoints,
    "samples": scenario_bad_samples,
    "vanish": scenario_shard_vanishes,
    "make_shards": scenario_make_shards_interrupt,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    if any(name not in SCENARIOS for name in names):  # before minutes of data generation; also --help
        print(f"{__doc__}\nscenarios: {', '.join(SCENARIOS)}")
        return 0 if names in (["-h"], ["--help"]) else 2
    report = Report()
    with tempfile.TemporaryDirectory(prefix="modsquad-faults-") as tmp:
        shards = make_data(Path(tmp) / "mini")
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            try:
                SCENARIOS[name](report, shards, work)
            except AssertionError as err:
                report.check(f"{name} (scenario)", False, str(err).splitlines()[0], 0.0)
            print(report.table().splitlines()[-1], flush=True)
    print("\n" + report.table())
    for row in report.failures():
        print(f"\nFAIL {row.case}: {row.outcome}")
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
