"""The benchmark scripts run end to end in their quick modes and write the rows they promise (no
timing is asserted: benchmarks print ratios, tests only keep them from rotting)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "bench_speculative.py": (["--samples", "2", "--ks", "2"], "--output"),
    "bench_sampling.py": (["--quick", "--repeats", "1", "--threads", "1", "--no-speculative"], "--output"),
    "bench_model.py": (["--quick"], "--output"),
    "bench_serve.py": (["--quick", "--requests", "4", "--tokens", "2"], "--output"),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_quick(script, tmp_path):
    args, output_flag = SCRIPTS[script]
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, output_flag, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows
    if (
        script == "bench_speculative.py"
    ):  # the oracle's acceptance is a probability, every forward commits >= 1
        assert all(
            0 <= r["oracle"]["acceptance"] <= 1 and r["oracle"]["tokens_per_forward"] >= 1 for r in rows
        )
    elif script == "bench_model.py":  # every A3 variant against the plain AR step, time and memory
        for r in rows:
            assert (
                set(r["time_ratio"]) == set(r["memory_ratio"]) >= {"a3 (own slot)", "a3 (no mlp recompute)"}
            )
            assert all(v > 0 for v in [*r["time_ratio"].values(), *r["memory_ratio"].values()])
    elif script == "bench_serve.py":  # the sequential baseline, then 1, 4, 16 clients as ratios to it
        assert [r["row"] for r in rows] == ["sequential", "1 concurrent", "4 concurrent", "16 concurrent"]
        assert all(
            r["tokens_per_s"] > 0 and r["throughput_ratio"] > 0 and r["p95_s"] >= r["p50_s"] > 0
            for r in rows[1:]
        )
    else:
        assert {r["row"] for r in rows} >= {"group-wise s=1 / AR", "group-wise s=4 / AR", "dynamic k=4 / AR"}
        assert all(r["ratio"] > 0 for r in rows)
