"""The real training command on one GPU (world size 1: NCCL refuses two ranks on one device) with
every shipped DeepSpeed config: it trains, and a run stopped and resumed equals the uninterrupted one;
a bf16 run tracks the fp32 run's losses.

Tolerances, stated: fp32 resumes to 1e-5 relative, not bit for bit: CUDA kernels may sum in another
order from one run to the next (atomics in index backward, split reductions). bf16 resumes to 1e-2
relative (the same reordering, rounded to 8 bits). A bf16 run stays within 5% of the fp32 run's
total loss at every logged step of 50 (the loss falls by far more than that over those steps).

A router fine-tuning (new tasks on the bf16 run's frozen backbone) runs where DeepSpeed keeps bf16
without ZeRO, the path every bf16 fine-tuning takes; the reader must find its fp32 masters. The
evaluation command runs on the bf16 run (its engine on CUDA, the checkpoint's module loaded into it).

One more launch is a rank that sees one GPU under another local rank (``srun --gpus-per-task 1``
gives local rank 3 a single device, 0): it must train there, not ask for ``cuda:3``. Another names
its GPU by UUID in ``CUDA_VISIBLE_DEVICES`` (MIG slices, PBS): with ``pynvml`` installed, DeepSpeed's
free-memory query at ZeRO 1's engine build used to fail on it (distributed/accelerator.py). One
validates during training, which must leave the training as it was.

The launches are independent single-GPU runs, so they go up to ``PARALLEL`` at a time (the GPU and
its 16 cores hold them easily): the GPU check has minutes, not the quarter of an hour the
launches take one after another. Each prints its exit status as it ends (run with ``-s``, as
benchmarks/gpu_check.sh does, a run cut at its deadline still says which launches finished).
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))  # the launch helpers

from _launch import REPO, Result, base_env, python, run  # noqa: E402
from data_tools import make_shards  # noqa: E402
from data_tools.mini_taskonomy import generate  # noqa: E402
from modsquad_ds.distributed.env import free_port  # noqa: E402
from modsquad_ds.export.reader import SOURCE_MASTER, load_checkpoint_weights  # noqa: E402
from modsquad_ds.finetune import is_task_specific  # noqa: E402

CONFIGS = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
FP32_RESUME_REL, BF16_RESUME_REL, BF16_TRACK_REL = 1e-5, 1e-2, 5e-2


def _env() -> dict[str, str]:
    # keep the caller's PYTHONPATH (on the GPU machine the carried wheels are on it: gpu_check.sh)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return base_env(DS_ACCELERATOR="cuda", PYTHONPATH=path, OMP_NUM_THREADS="4")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_mini")
    generate(root, buildings=4, points=3, views=4, resolution=32, seed=1, workers=4, progress=False)
    out = root / "shards"
    assert make_shards.main(["--root", str(root), "--out", str(out), "--split", "train",
                             "--split-csv", str(root / "splits" / "train_val_test_mini.csv"),
                             "--samples-per-shard", "8", "--no-progress"]) == 0
    return out


PARALLEL = 12


def _args(shards: Path, out: Path, ds_config: str, steps: int, *extra: str) -> list[str]:
    args = [python(), "-m", "modsquad_ds.train", "--config", "configs/demo.yaml"]
    for item in (f"data.shards_dir={shards}", "data.batch_size=4", "data.workers=1", f"train.steps={steps}",
                 "train.warmup_steps=2", "train.log_every=1", "train.ep_size=1", f"train.out_dir={out}",
                 f"train.ds_config=ds_configs/{ds_config}", *extra):
        args += ["--set", item]
    return args


def _run_all(commands: dict[str, list[str]], envs: dict[str, dict[str, str]] | None = None) -> dict[str, Result]:
    """Every command (with ``envs[name]`` over the common environment); an exit line as each ends."""
    envs = envs or {}
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {pool.submit(run, cmd, 300, {**_env(), **envs.get(name, {})}): name for name, cmd in commands.items()}
        results = {}
        for future in as_completed(futures):
            name = futures[future]
            results[name] = r = future.result()
            print(f"launch {name}: exit {r.returncode} after {r.seconds:.0f} s", flush=True)
        return results


# torchrun's variables for a rank with local rank 3 in a world of one, as srun --gpus-per-task 1
# starts the fourth task of a node (CUDA_VISIBLE_DEVICES: its one GPU)
LOCAL_RANK_3 = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
                "CUDA_VISIBLE_DEVICES": "0"}


def _uuid_of_the_gpu() -> str:
    """``CUDA_VISIBLE_DEVICES``'s UUID form of the GPU this process sees as device 0."""
    props = torch.cuda.get_device_properties(0)
    return ("MIG-" if "MIG" in props.name else "GPU-") + str(props.uuid)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> tuple[Path, dict[str, Result]]:
    """Every launch of this module, in two waves: the uninterrupted runs, the first halves of the
    stopped ones and the 50-step pair; then the resumed second halves."""
    root = tmp_path_factory.mktemp("cuda_runs")
    first = {f"{c}/whole": _args(shards, root / c / "whole", c, 6) for c in CONFIGS}
    first.update({f"{c}/parts": _args(shards, root / c / "parts", c, 6, "train.stop_after=3") for c in CONFIGS})
    first.update({f"track/{c}": _args(shards, root / "track" / c, c, 50, "train.log_every=5")
                  for c in ("zero1_fp32.json", "zero1_bf16.json")})
    first["local_rank3"] = _args(shards, root / "local_rank3", "zero1_bf16.json", 2)
    first["uuid_selector"] = _args(shards, root / "uuid_selector", "zero1_bf16.json", 2)
    first["validated"] = _args(shards, root / "validated", "zero1_fp32.json", 6, "train.eval_every=2",
                               "data.val_split=train", "moe.eval_noise=true")
    results = _run_all(first, {"local_rank3": {**LOCAL_RANK_3, "MASTER_PORT": str(free_port("127.0.0.1"))},
                               "uuid_selector": {"CUDA_VISIBLE_DEVICES": _uuid_of_the_gpu()}})
    second = {f"{c}/resumed": _args(shards, root / c / "parts", c, 6) for c in CONFIGS
              if results[f"{c}/parts"].returncode == 0}
    if results["zero1_bf16.json/whole"].returncode == 0:
        whole = root / "zero1_bf16.json" / "whole"
        second["finetune_bf16"] = _finetune_args(whole, root / "finetune_bf16")
        second["evaluate_bf16"] = [python(), "-m", "modsquad_ds.evaluate", "--run", str(whole), "--split", "train"]
    results.update(_run_all(second))
    return root, results


def _finetune_args(source: Path, out: Path) -> list[str]:
    """Router fine-tuning of two tasks on a bf16 run (ZeRO 1 asked, ZeRO 0 run: finetune/source.py)."""
    args = [python(), "-m", "modsquad_ds.train", "--config", str(source / "config.yaml")]
    for item in (f"finetune.init_from={source}", "finetune.mode=routers", "tasks.names=[class_scene,normal]",
                 "train.steps=3", f"train.out_dir={out}"):
        args += ["--set", item]
    return args


def _ok(results: dict[str, Result], *names: str) -> None:
    for name in names:
        r = results.get(name)
        assert r is not None, f"{name} was not launched (its first half failed)"
        assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.output[-4000:]}"


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def _close(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * max(abs(b), 1e-12)


@pytest.mark.parametrize("ds_config", CONFIGS)
def test_trains_and_resumes_on_cuda(runs, ds_config):
    root, results = runs
    _ok(results, f"{ds_config}/whole", f"{ds_config}/parts", f"{ds_config}/resumed")
    whole, parts = root / ds_config / "whole", root / ds_config / "parts"
    expected, resumed = _losses(whole), _losses(parts)
    assert sorted(resumed) == sorted(expected) == list(range(1, 7))
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perf/max_memory_gib"] > 0 and 0.0 <= r["perf/data_wait_pct"] < 100.0 for r in rows)
    rel = BF16_RESUME_REL if "bf16" in ds_config else FP32_RESUME_REL
    for step in range(4, 7):
        assert _close(resumed[step], expected[step], rel), \
            f"{ds_config} step {step}: resumed {resumed[step]!r} vs uninterrupted {expected[step]!r}"


def test_a_task_that_sees_one_gpu_trains_on_it_whatever_its_local_rank(runs):
    root, results = runs
    _ok(results, "local_rank3")
    assert sorted(_losses(root / "local_rank3")) == [1, 2]


def test_a_gpu_named_by_uuid_trains_under_zero(runs):
    root, results = runs
    _ok(results, "uuid_selector")
    assert sorted(_losses(root / "uuid_selector")) == [1, 2]
    try:  # the launch's environment is this one's
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # trained, but not through the query that failed (benchmarks/gpu_wheels.sh carries it)
        pytest.skip(f"pynvml unusable here ({type(e).__name__}): DeepSpeed's NVML query was not exercised")


def test_validation_on_cuda_leaves_training_unchanged(runs):
    """Validation during training (its batches pinned, router noise on as moe.eval_noise asks): the
    losses of the same run without it, and the CUDA RNG state put back (train/trainer.py _validate)."""
    root, results = runs
    _ok(results, "validated", "zero1_fp32.json/whole")
    validated, plain = _losses(root / "validated"), _losses(root / "zero1_fp32.json" / "whole")
    assert sorted(validated) == sorted(plain) == list(range(1, 7))
    for step in plain:
        assert _close(validated[step], plain[step], FP32_RESUME_REL), f"step {step}: {validated[step]} vs {plain[step]}"
    evals = [json.loads(line) for line in (root / "validated" / "eval_during_training.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6]


def test_bf16_tracks_fp32_over_50_steps(runs):
    root, results = runs
    _ok(results, "track/zero1_fp32.json", "track/zero1_bf16.json")
    fp32, bf16 = _losses(root / "track" / "zero1_fp32.json"), _losses(root / "track" / "zero1_bf16.json")
    assert sorted(fp32) == sorted(bf16) and len(fp32) == 10
    for step in fp32:
        assert _close(bf16[step], fp32[step], BF16_TRACK_REL), f"step {step}: bf16 {bf16[step]} vs fp32 {fp32[step]}"
    assert fp32[50] < fp32[5] * (1 - 2 * BF16_TRACK_REL), "the run must learn for the comparison to mean anything"


def test_a_bf16_router_finetune_trains_on_cuda_and_keeps_its_fp32_masters(runs):
    root, results = runs
    _ok(results, "finetune_bf16")
    assert sorted(_losses(root / "finetune_bf16")) == [1, 2, 3]
    source, tuned = load_checkpoint_weights(root / "zero1_bf16.json" / "whole"), load_checkpoint_weights(root / "finetune_bf16")
    assert tuned.zero_stage == 0 and tuned.source.startswith(SOURCE_MASTER)
    for key, value in tuned.model.items():
        if is_task_specific(key):  # trained: fp32 masters, with bits bf16 cannot hold
            continue
        assert torch.equal(value, source.model[key].bfloat16().float()), key  # frozen, as the bf16 module held it
    assert any(not torch.equal(v, v.bfloat16().float()) for k, v in tuned.model.items() if is_task_specific(k))


def test_the_evaluation_command_runs_on_cuda(runs, shards):
    root, results = runs
    _ok(results, "evaluate_bf16")
    saved = json.loads((root / "zero1_bf16.json" / "whole" / "eval" / "train_step_00000006.json").read_text())
    assert saved["samples"] == json.loads((shards / "train.index.json").read_text())["num_samples"]
    assert len(saved["tasks"]) == 13
    assert all(math.isfinite(v) for metrics in saved["tasks"].values() for v in metrics.values())
