import subprocess
import sys


def test_info_prints_the_table_and_runs_a_step():
    out = subprocess.run([sys.executable, "-m", "modsquad_ds.info", "--presets", "tiny", "small"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line.split() for line in out.splitlines()]
    rows = [r for r in rows if len(r) > 2 and r[0] in ("tiny", "small") and r[1] in ("Mod-Squad", "dense")]
    assert [(r[0], r[1]) for r in rows] == [("tiny", "Mod-Squad"), ("tiny", "dense"),
                                            ("small", "Mod-Squad"), ("small", "dense")]
    small_moe, small_dense = float(rows[2][2]), float(rows[3][3])
    assert small_moe > 40 and small_dense > 20
    assert "parameter tensors got gradients" in out


def test_info_rejects_a_bad_override_with_the_key():
    result = subprocess.run([sys.executable, "-m", "modsquad_ds.info", "--presets", "tiny",
                             "--set", "moe.mlp.top_k=99"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "moe.mlp.top_k" in result.stderr


def test_info_fidelity_switches_on_tiny():
    from modsquad_ds.info import closest_to_paper, fidelity_rows

    rows = {label: (params, gflops) for label, params, gflops in fidelity_rows("tiny", [])}
    base, wide = rows["as configured"], rows["moe.wide_dense_attention=true"]
    # tiny: d=64, 4 heads; wide heads double qkv and proj of the 2 blocks with an MoE MLP:
    # (64*384 + 384) + (128*64 + 64) - (64*192 + 192) - (64*64 + 64) = 16,576 parameters per block
    assert round((wide[0] - base[0]) * 1e6) == 2 * 16_576
    assert wide[1] > base[1]
    assert round((rows["model.class_head=mean_patch"][0] - base[0]) * 1e6) == 2 * 64 * 2  # two class heads' norms
    assert closest_to_paper(list((k, *v) for k, v in rows.items()))[0] in rows
