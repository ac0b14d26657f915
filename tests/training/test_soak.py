"""Soak: `a3lm train` killed with SIGKILL at random moments, again and again, ends bit for bit where an
uninterrupted run ends. Slow (minutes): `python -m pytest -m slow tests/test_soak.py`.

A3LM_SOAK_KILLS sets the number of kills (default 50). Each kill lands at a random moment: one in ten
during start-up, the others within 2.5 s of training (in a step, a checkpoint write, the final save).
When a run reaches its end before the kills are used up, it is checked and a new run starts in a new
folder.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

KILLS = int(os.environ.get("A3LM_SOAK_KILLS", "50"))
SETTINGS = [
    "model.hidden_size=32",
    "model.max_position_embeddings=32",
    "data.micro_batch_size=4",
    "data.seq_len=10",
    "data.synthetic_length=8",
    "curriculum.stage0_steps=30",
    "curriculum.stage1_steps=10",
    "curriculum.stage2_steps=20",
    "curriculum.stage3_steps=200",
    "curriculum.infill_share=0.25",
    "optim.warmup_steps=5",
    "checkpoint.keep=2",
    "log.every=1",
    "log.progress=false",
]


def _command(out: Path, every: int) -> list[str]:
    overrides = [x for s in [*SETTINGS, f"checkpoint.every={every}"] for x in ("-s", s)]
    return [sys.executable, "-m", "a3lm.cli", "train", "--output", str(out), *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _state(out: Path) -> tuple[dict, list[dict]]:
    weights = {name: load_file(str(out / name / "model.safetensors")) for name in ("final", "ar_final")}
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


def _same(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]) -> bool:
    for name in a[0]:
        wa, wb = a[0][name], b[0][name]
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return a[1] == b[1]


def _survives(proc: subprocess.Popen, out: Path, launched: float, rng: random.Random) -> bool:
    """Kill `proc` at a random moment: one time in ten during start-up, else within 2.5 s of training
    (steps, checkpoint writes, the final save). False when it was killed, True when it ended first."""
    if rng.random() < 0.1:
        deadline = time.monotonic() + rng.uniform(0.0, 3.0)
    else:  # training has begun once the metrics file changes after the launch
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and not (metrics.exists() and metrics.stat().st_mtime > launched):
            time.sleep(0.02)
        deadline = time.monotonic() + rng.uniform(0.0, 2.5)
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        return True
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return False


@pytest.mark.slow
def test_fifty_sigkills_at_random_moments_end_bit_identical(tmp_path):
    start = time.monotonic()
    # the checkpoint interval changes nothing that is computed: the reference saves rarely
    subprocess.run(_command(tmp_path / "reference", every=1000), env=_env(), check=True, capture_output=True)
    reference = _state(tmp_path / "reference")
    rng = random.Random(0)
    kills, rounds, out = 0, 0, None
    while kills < KILLS or out is not None:
        if out is None:
            rounds += 1
            out = tmp_path / f"run{rounds}"
        launched = time.time()
        log = tmp_path / "stderr.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(_command(out, every=3), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        if kills < KILLS and not _survives(proc, out, launched, rng):
            kills += 1
            continue
        proc.wait()
        assert proc.returncode == 0, log.read_text()[-2000:]
        assert _same(_state(out), reference), f"run {out} differs from the uninterrupted run"
        out = None
    wall = time.monotonic() - start
    print(
        f"\nsoak: {kills} SIGKILLs over {rounds} run(s), each bit-identical to the uninterrupted one; "
        f"{wall:.0f} s"
    )
