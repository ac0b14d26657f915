"""A shared run folder runs no code; the run folder is locked; a torn metrics line does not block a resume."""

import hashlib
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from a3lm.training import checkpoint as ckpt
from a3lm.training.parts import rng_state
from a3lm.training.run import train
from a3lm.training.run_folder import RunFolderBusy
from a3lm.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_train import metrics, tiny_cfg  # noqa: E402


class Payload:
    """Unpickling this creates `marker` (what a hostile file would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def run_of_two_steps(tmp_path) -> tuple:
    cfg = tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=4)
    cfg.stop_after = 2
    last = train(cfg)
    return cfg, last


def test_state_files_round_trip_every_rng_bit_exactly(tmp_path):
    random.seed(3)
    np.random.seed(3)
    np.random.standard_normal()  # a cached gaussian in NumPy's state
    gen = torch.Generator().manual_seed(5)
    state = rng_state(gen) | {"nested": {"a": [1, 2.5, None, True, "x"], "t": (1, (2, 3))}}
    ckpt.save_state(state, tmp_path / "s.safetensors")
    back = ckpt.load_state(tmp_path / "s.safetensors")
    assert back["python"] == state["python"] and back["nested"] == state["nested"]
    assert all(torch.equal(back[k], state[k]) for k in ("torch", "groups"))
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][2:] == state["numpy"][2:]
    # a file that is not an a3lm state is refused, not guessed at
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors is not an a3lm state file"):
        ckpt.load_state(tmp_path / "other.safetensors")


def test_a_checkpoint_from_before_loads_its_pickled_state_through_weights_only(run_of_two_steps):
    cfg, last = run_of_two_steps
    trainer = Trainer(cfg)  # holds the run folder's lock until released (or it fits)
    want = trainer.rng.state_dict()
    trainer.lock.release()
    (last / "rng_rank0.safetensors").unlink()
    torch.save(want, last / "rng_rank0.pt")  # how a3lm wrote it before
    trainer = Trainer(cfg)
    got = trainer.rng.state_dict()
    trainer.lock.release()
    assert got["python"] == want["python"] and torch.equal(got["torch"], want["torch"])


def test_a_crafted_rng_state_runs_nothing(tmp_path, run_of_two_steps):
    cfg, last = run_of_two_steps
    marker = tmp_path / "pwned"
    (last / "rng_rank0.safetensors").unlink()
    (last / "rng_rank0.pt").write_bytes(pickle.dumps({"torch": Payload(marker)}))
    before = _files(tmp_path)
    refused = r"step_00000002 is unreadable \(UnpicklingError: Weights only load failed"
    with pytest.raises(OSError, match=refused):
        Trainer(cfg)
    assert not marker.exists()
    assert _files(tmp_path) == before  # nothing written outside (or inside) the output
    # the same payload under the new name: not a safetensors file at all
    (last / "rng_rank0.pt").rename(last / "rng_rank0.safetensors")
    with pytest.raises(OSError, match=r"step_00000002 is unreadable \(SafetensorError"):
        Trainer(cfg)
    assert not marker.exists()


def _set_digest(checkpoint: Path) -> None:
    """What a hostile folder can do too: record the digest of its own crafted metadata."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    data = (checkpoint / "state" / ".metadata").read_bytes()
    meta["state_files"]["sha256"][".metadata"] = hashlib.sha256(data).hexdigest()
    meta["state_files"]["sizes"][".metadata"] = len(data)
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def test_a_crafted_dcp_metadata_runs_nothing(tmp_path, run_of_two_steps):
    cfg, last = run_of_two_steps
    marker = tmp_path / "pwned"
    (last / "state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    before = _files(tmp_path)
    with pytest.raises(OSError, match=r"unreadable \(state/.metadata has \d+ bytes, \d+ when saved\)"):
        Trainer(cfg)
    meta = json.loads((last / "meta.json").read_text())
    meta["state_files"]["sizes"][".metadata"] = (last / "state" / ".metadata").stat().st_size
    (last / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        OSError,
        match=r"state/.metadata does not match the sha256 in meta.json: damaged or "
        "altered",
    ):
        Trainer(cfg)
    _set_digest(last)
    before = _files(tmp_path)
    refused = (
        r"is unreadable \(state/.metadata refers to (io|builtins).open, which a checkpoint's metadata "
        r"never holds: refusing to load it\); no earlier"
    )
    with pytest.raises(OSError, match=refused):
        Trainer(cfg)
    assert not marker.exists()
    assert _files(tmp_path) == before


def test_an_emptied_dcp_metadata_is_one_line_without_torch_tracebacks(run_of_two_steps, capfd):
    cfg, last = run_of_two_steps
    (last / "state" / ".metadata").write_bytes(b"")
    capfd.readouterr()
    with pytest.raises(
        OSError,
        match=r"is unreadable \(state/.metadata has 0 bytes, \d+ when saved\); "
        "no earlier",
    ):
        Trainer(cfg)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, run_of_two_steps):
    cfg, _ = run_of_two_steps
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as fh:
        fh.write('{"step": 3, "loss": 1.2')  # killed mid-append
    cfg.stop_after = None
    train(cfg)
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert path.read_text().endswith("\n")


def test_a_damaged_line_inside_metrics_is_named(tmp_path, run_of_two_steps):
    cfg, _ = run_of_two_steps
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    cfg.stop_after = None
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON .*: the file is damaged"):
        train(cfg)


HOLDER = """
import sys, time
from a3lm.training.run_folder import RunLock
lock = RunLock(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_train_on_the_same_folder_refuses_naming_the_holder(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=2)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = (
            rf"^run folder {tmp_path / 'run'} is in use by another a3lm train \(PID {holder.pid}\): "
            "wait for it to finish, or choose another --output$"
        )
        with pytest.raises(RunFolderBusy, match=busy):
            train(cfg)
        assert not (tmp_path / "run" / "config.json").exists()  # the refused start wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg) == tmp_path / "run" / "final"  # the kernel dropped the dead holder's lock


def test_a_run_config_that_is_not_json_is_named(tmp_path, run_of_two_steps):
    cfg, _ = run_of_two_steps
    (tmp_path / "run" / "config.json").write_text("{oops")
    with pytest.raises(
        ValueError,
        match=rf"^{tmp_path / 'run' / 'config.json'} is not JSON \(.*\): this run "
        "folder's config is damaged$",
    ):
        Trainer(cfg)
