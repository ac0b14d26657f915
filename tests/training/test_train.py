import hashlib
import json
import math
import re
import shutil
import signal
import socket
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemWriter

from a3lm.data.config import DataConfig
from a3lm.data.loader import build_loader
from a3lm.files import TMP_PREFIX
from a3lm.training import build
from a3lm.training import checkpoint as ckpt
from a3lm.training.callbacks import Callback
from a3lm.training.config import (
    CheckpointConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    make_config,
)
from a3lm.training.curriculum import CurriculumConfig, draw_group_ids, policy_at, rank_generator
from a3lm.training.optim import Schedule, lr_factor
from a3lm.training.overrides import apply_overrides
from a3lm.training.run import train
from a3lm.training.run_folder import final_model_dir
from a3lm.training.step import NonFiniteLossError
from a3lm.training.trainer import Trainer


def tiny_cfg(out: Path, **curriculum) -> TrainConfig:
    cur = {"stages": [0, 1, 2, 3], "stage0_steps": 3, "stage1_steps": 2, "stage2_steps": 2, "stage3_steps": 3}
    cur.update(curriculum)
    return TrainConfig(
        output=str(out),
        model=ModelConfig(hidden_size=32, num_hidden_layers=2, max_position_embeddings=32),
        data=DataConfig(micro_batch_size=4, seq_len=10, synthetic_length=8),
        curriculum=CurriculumConfig(infill_share=0.25, **cur),
        optim=OptimConfig(warmup_steps=1, lr=3e-3),
        checkpoint=CheckpointConfig(every=4, keep=2),
        log=LogConfig(every=1, progress=False),
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


# -- configuration -----------------------------------------------------------------------------------


def test_lr_schedule_values():
    cfg = OptimConfig(warmup_steps=4, min_lr_ratio=0.1, decay="cosine")
    assert [lr_factor(s, 20, cfg) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, 20, cfg) == pytest.approx(1.0)
    assert lr_factor(19, 20, cfg) == pytest.approx(0.1)
    assert lr_factor(4 + 15 // 2, 20, cfg) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15))
    )
    lin = OptimConfig(warmup_steps=0, min_lr_ratio=0.0, decay="linear")
    assert [lr_factor(s, 5, lin) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor(3, 5, OptimConfig(warmup_steps=0, decay="constant")) == 1.0


def test_stage_schedule_restarts_warmup_and_decay_at_every_stage():
    cfg = OptimConfig(warmup_steps=1, min_lr_ratio=0.1, decay="linear", stage_schedule=True)
    sched = Schedule(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 2.0, 9, cfg, segments=[2, 3, 4]
    )
    lrs = []
    for _ in range(9):
        lrs.append(sched.lr())
        sched.step()
    # stage of 2: warmup then the end (0.1); stages of 3 and 4: warmup, then linear decay to 0.1
    assert lrs == pytest.approx([1.0, 2.0, 1.0, 2.0, 0.2, 1.0, 2.0, 1.1, 0.2])
    with pytest.raises(ValueError, match="do not add up"):
        Schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1.0, 9, cfg, segments=[2, 3])


def test_stage_schedule_resumes_mid_stage_bit_exactly(tmp_path):
    def cfg_at(out: Path) -> TrainConfig:
        cfg = tiny_cfg(out, stages=[1, 2, 3], stage1_steps=2, stage2_steps=3, stage3_steps=3)
        cfg.optim.stage_schedule, cfg.optim.warmup_steps = True, 1
        return cfg

    full = train(cfg_at(tmp_path / "full"))
    cfg = cfg_at(tmp_path / "parts")
    cfg.stop_after = 3  # mid stage 2
    train(cfg)
    cfg.stop_after = None
    parts = train(cfg)
    a, b = weights(full), weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = metrics(tmp_path / "full")
    assert logged == metrics(tmp_path / "parts")
    # each stage starts with its own warmup step at half the peak LR
    assert [m["lr"] for m in logged if m["step"] in (1, 3, 6)] == pytest.approx([1.5e-3] * 3)


def test_presets_and_overrides():
    cfg = make_config(
        preset="tiny",
        overrides=[
            "optim.lr=1e-4",
            "curriculum.stages=0,3",
            "log.wandb=true",
            "stop_after=7",
            "model.tokenizer=none",
            "data.source=synthetic",
        ],
    )
    assert (
        cfg.optim.lr == 1e-4
        and cfg.curriculum.stages == [0, 3]
        and cfg.log.wandb is True
        and cfg.stop_after == 7
    )
    assert make_config().curriculum.stages == [0, 1, 2, 3]  # no model: the embedded default
    assert make_config(model="some/llama", data="x.jsonl").curriculum.stages == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        apply_overrides(TrainConfig(), ["optim.lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(TrainConfig(), ["optim.lr"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config(preset="huge")
    with pytest.raises(ValueError, match="stage 2 is listed but has 0 steps"):
        make_config(overrides=["curriculum.stage2_steps=0"])
    with pytest.raises(ValueError, match="group size >= 1"):
        make_config(overrides=["curriculum.stage3_max_size=0"])


def test_overrides_are_read_by_the_field_type():
    from a3lm.training.overrides import parse_as

    cfg = apply_overrides(
        TrainConfig(),
        [
            "curriculum.stages=[1, 3]",
            "model.tokenizer=null",
            "stop_after=none",
            "data.name=sample-10BT",
            "model.path=123",
            "optim.grad_clip=0",
        ],
    )
    assert cfg.curriculum.stages == [1, 3] and cfg.model.tokenizer is None and cfg.stop_after is None
    assert cfg.data.name == "sample-10BT" and cfg.model.path == "123" and cfg.optim.grad_clip == 0.0
    assert (
        parse_as(int | None, "7") == 7
        and parse_as(list[int], "0,3") == [0, 3]
        and parse_as(bool, "Yes") is True
    )
    for item, message in [
        ("data.micro_batch_size=x", "bad value for data.micro_batch_size: expected an integer, got 'x'"),
        ("log.wandb=maybe", "bad value for log.wandb: expected a boolean (true/false), got 'maybe'"),
        ("curriculum.stages=1,b", "bad value for curriculum.stages: expected an integer, got 'b'"),
        ("optimm.lr=1", "unknown config section 'optimm.lr'"),
        ("optim=1", "'optim' is a section"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            apply_overrides(TrainConfig(), [item])


def test_cli_typed_options_and_overrides_set_the_same_config():
    from typer.testing import CliRunner

    from a3lm.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train",
            "--show-config",
            "--optim.lr",
            "3e-4",
            "--curriculum.stages",
            "1,3",
            "--log.progress",
            "false",
            "-s",
            "optim.lr=5e-4",
            "--model.tokenizer",
            "none",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert (
        cfg["optim"]["lr"] == 5e-4
        and cfg["curriculum"]["stages"] == [1, 3]
        and cfg["log"]["progress"] is False
    )
    assert cfg["model"]["tokenizer"] is None  # `-s` applies last
    res = runner.invoke(app, ["train", "--show-config", "--data.micro_batch_size", "x"])
    assert (
        res.exit_code == 2
        and "error: bad value for --data.micro_batch_size: expected an integer, got 'x'" in res.output
    )
    res = runner.invoke(app, ["train", "--show-config", "-s", "optim.lrr=1"])
    assert res.exit_code == 2 and "error: unknown config key 'optim.lrr'" in res.output


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append(("fit_start", trainer.step))

    def on_phase_start(self, trainer):
        self.events.append((f"phase_start {trainer.phase.kind}", trainer.step))

    def on_step_end(self, trainer, metrics):
        assert metrics["step"] == trainer.step and "tokens_per_s" in metrics
        self.events.append(("step", trainer.step))

    def on_save(self, trainer, path):
        assert path.is_dir() and ckpt.step_of(path) == trainer.step
        self.events.append(("save", trainer.step))

    def on_fit_end(self, trainer):
        self.events.append(("fit_end", trainer.step))


def test_callbacks_see_every_phase_step_and_save(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", stages=[0, 1], stage0_steps=2, stage1_steps=2)
    cfg.checkpoint.every = 3
    rec = Recorder()
    train(cfg, callbacks=[rec])
    assert rec.events == [
        ("fit_start", 0),
        ("phase_start ar", 0),
        ("step", 1),
        ("step", 2),
        ("save", 2),
        ("phase_start a3", 2),
        ("step", 3),
        ("save", 3),
        ("step", 4),
        ("save", 4),
        ("fit_end", 4),
    ]


def test_metrics_log_resumes_from_checkpoints_with_or_without_its_state(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=4)
    cfg.stop_after = 2
    last = train(cfg)
    assert ckpt.load_state(last / "metrics_rank0.safetensors") == {"through": 2}
    # a kill after step 3 was logged but before its checkpoint; a checkpoint from before the metrics
    # log had a state: the resumed step stands in
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")
    (last / "metrics_rank0.safetensors").unlink()
    cfg.stop_after = None
    train(cfg)
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 for m in metrics(tmp_path / "run"))


def _weights_of_seed(out: Path, seed: int) -> dict[str, torch.Tensor]:
    cfg = tiny_cfg(out, stages=[0, 3], stage0_steps=1, stage3_steps=2)
    cfg.seed = seed
    return weights(train(cfg))


def test_seed_reseeds_the_init_groupings_and_data_unless_set(tmp_path):
    a, b, c = (
        _weights_of_seed(tmp_path / "a", 0),
        _weights_of_seed(tmp_path / "b", 0),
        _weights_of_seed(tmp_path / "c", 1),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1 and a[k].std() > 0)
    saved = json.loads((tmp_path / "c" / "config.json").read_text())  # the seeds the run used
    assert (saved["model"]["init_seed"], saved["curriculum"]["seed"], saved["data"]["synthetic_seed"]) == (
        1,
        1,
        1,
    )
    cfg = TrainConfig(seed=3, model=ModelConfig(init_seed=0), curriculum=CurriculumConfig(seed=5)).seeded()
    assert (cfg.model.init_seed, cfg.curriculum.seed, cfg.data.synthetic_seed) == (
        0,
        5,
        3,
    )  # explicit ones stay
    tok = build.load_tokenizer(TrainConfig())
    rows = [build_loader(TrainConfig(seed=s).seeded().data, tok).next_batch()["input_ids"] for s in (0, 1)]
    assert not torch.equal(*rows)  # the synthetic corpus too


def test_wandb_runs_get_their_own_id_kept_on_resume(tmp_path, monkeypatch):
    inits = []

    class Run:
        def log(self, metrics, step=None) -> None: ...
        def finish(self) -> None: ...

    stub = types.ModuleType("wandb")
    stub.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    for seed in (0, 1):  # runs/x/seed<k>/curriculum: folders of the same name
        cfg = tiny_cfg(tmp_path / f"seed{seed}" / "curriculum", stages=[1], stage1_steps=2)
        cfg.seed, cfg.log.wandb, cfg.stop_after = seed, True, 1
        train(cfg)
        cfg.stop_after = None
        train(cfg)  # resumed: the same wandb run
    ids = [kw["id"] for kw in inits]
    assert ids[0] == ids[1] != ids[2] == ids[3] and all(kw["resume"] == "allow" for kw in inits)
    assert (tmp_path / "seed1" / "curriculum" / "wandb_id").read_text().strip() == ids[2]


def test_a_model_from_scratch_takes_the_tokenizers_special_ids(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from a3lm.model.debug import tiny_byte_bpe

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tiny_byte_bpe(),
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("the cat sat on the mat.\na big dog ran.\n")
    cfg = tiny_cfg(tmp_path / "run", stages=[0, 1], stage0_steps=1, stage1_steps=1)
    cfg.model.tokenizer, cfg.data.source = str(tmp_path / "tok"), str(tmp_path / "a.txt")
    saved = json.loads((train(cfg) / "config.json").read_text())["text_config"]
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 0, 2)
    assert saved["vocab_size"] == len(tok)


# -- the loop --------------------------------------------------------------------------------------


def _held_out_loss(trainer: Trainer) -> float:
    """Stage-3 loss on fixed rows and groupings (not the training stream)."""
    from a3lm.data import synthetic

    corpus = synthetic.SyntheticCorpus(synthetic.default_hmm(0), 8, seed=123)
    words = torch.stack([corpus[i] for i in range(64)])
    ids = torch.cat([torch.full((64, 1), 1), words + 4, torch.full((64, 1), 2)], dim=1)
    mask = torch.ones_like(ids)
    gids = draw_group_ids(
        policy_at(trainer.cfg.curriculum, trainer.total_steps - 1), mask, rank_generator(99, 0)
    )
    with torch.no_grad():
        return float(trainer.model(input_ids=ids, group_ids=gids, attention_mask=mask, labels=ids).loss)


def test_a_few_steps_lower_the_loss(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", stages=[3], stage3_steps=12)
    cfg.optim.lr = 1e-2
    trainer = Trainer(cfg)
    before = _held_out_loss(trainer)
    trainer.fit()
    after = _held_out_loss(trainer)
    assert after < before - 0.3, (before, after)  # 3.86 -> 3.37 measured


def test_resume_equals_uninterrupted_and_final_models_open(tmp_path):
    full = train(tiny_cfg(tmp_path / "full"))
    # the same run, stopped mid stage 0, at the stage 0 -> 1 boundary, then Ctrl-C mid stage 3
    parts = tmp_path / "parts"
    cfg = tiny_cfg(parts)
    cfg.stop_after = 2
    assert ckpt.step_of(train(cfg)) == 2
    cfg.stop_after = 3
    assert ckpt.step_of(train(cfg)) == 3
    assert (parts / "ar_final").is_dir()

    class CtrlCAt(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.step == 8:
                signal.raise_signal(signal.SIGINT)

    cfg.stop_after = None
    with pytest.raises(KeyboardInterrupt, match="rerun the same command"):
        train(cfg, callbacks=[CtrlCAt()])
    assert ckpt.step_of(ckpt.latest_checkpoint(parts / "checkpoints")) == 8
    assert train(cfg) == parts / "final"

    for name in ("final", "ar_final"):
        a, b = weights(tmp_path / "full" / name), weights(parts / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert metrics(tmp_path / "full") == metrics(
        parts
    )  # losses, lrs, stages, tokens: identical, no duplicates
    assert [m["stage"] for m in metrics(parts)] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert len(ckpt.list_checkpoints(parts / "checkpoints")) == 2  # keep = 2

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from a3lm import A3ForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(full), A3ForCausalLM)
    assert isinstance(AutoModelForCausalLM.from_pretrained(full.parent / "ar_final"), LlamaForCausalLM)
    assert AutoTokenizer.from_pretrained(full).decode([1, 4, 5]) == "<bos> the a"
    # rerunning a finished run does nothing and returns the final model
    assert train(tiny_cfg(tmp_path / "full")) == full


def _dying_write(self, plan, planner):
    """torch.distributed.checkpoint's writer, killed halfway through the checkpoint's shards."""
    Path(self.path, "__0_0.distcp").write_bytes(b"\x00partial")
    raise OSError("killed")


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=6)
    cfg.stop_after = 2
    train(cfg)
    monkeypatch.setattr(FileSystemWriter, "write_data", _dying_write)
    cfg.stop_after = 4
    with pytest.raises(OSError, match=r"could not write checkpoint .*step_00000004: rank 0: OSError: killed"):
        train(cfg)
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(root)] == [2]
    assert any(p.name.startswith(TMP_PREFIX) for p in root.iterdir())  # the half-written one, ignored
    resumed = Trainer(cfg)
    assert resumed.step == 2
    assert ckpt.step_of(resumed.fit()) == 4
    assert not any(p.name.startswith(TMP_PREFIX) for p in root.iterdir())  # cleaned up

    # the helper on its own: a write that fails midway never replaces anything
    def half(folder: Path) -> None:
        (folder / "a").write_text("x")
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        ckpt.save(tmp_path / "solo", 5, half)
    assert ckpt.latest_checkpoint(tmp_path / "solo") is None


def test_a_damaged_checkpoint_is_one_clear_error_naming_the_previous_one(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=6)
    cfg.checkpoint.every, cfg.stop_after = 2, 4
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    second, first = root / ckpt.checkpoint_name(4), root / ckpt.checkpoint_name(2)
    shard = next((second / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(
        OSError,
        match=rf"^checkpoint {re.escape(str(second))} is unreadable "
        rf"\(state/{shard.name} has \d+ bytes, \d+ when saved\); delete it to "
        rf"resume from the previous checkpoint {re.escape(str(first))}$",
    ):
        Trainer(cfg)
    shutil.rmtree(second)
    (first / "data_rank0.safetensors").unlink()
    with pytest.raises(
        OSError,
        match=r"step_00000002 is unreadable \(FileNotFoundError: "
        r".*data_rank0.safetensors\); no earlier checkpoint is kept: delete it "
        "to start the run over$",
    ):
        Trainer(cfg)
    (first / "meta.json").write_text("")
    with pytest.raises(
        OSError, match=r"step_00000002 is unreadable \(meta.json is not JSON: Expecting value"
    ):
        Trainer(cfg)


def test_a_failed_first_save_leaves_no_run_folder(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=2)
    cfg.checkpoint.every = 1
    monkeypatch.setattr(FileSystemWriter, "write_data", _dying_write)  # e.g. a full disk
    with pytest.raises(OSError, match=r"could not write checkpoint .*step_00000001: rank 0: OSError: killed"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    cfg.optim.lr = 1e-4  # the corrected command is not refused as "a different run"
    assert train(cfg) == tmp_path / "run" / "final"


def test_non_finite_loss_stops_without_stepping(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path / "run", stages=[1], stage1_steps=3))
    with torch.no_grad():
        trainer.model.model.embed_tokens.weight[5:] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step 0 .*did not step"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert not trainer.optimizer.state  # AdamW never stepped
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_bad_inputs_are_clear_errors(tmp_path):
    cfg = tiny_cfg(tmp_path / "a")
    cfg.data.seq_len = 40
    with pytest.raises(ValueError, match="seq_len 40 exceeds the model's maximum of 32"):
        Trainer(cfg)
    Trainer(tiny_cfg(tmp_path / "b"))
    other = tiny_cfg(tmp_path / "b")
    other.optim.lr = 0.5
    other.log.every = 7  # logging may change between a run and its resumption; the learning rate may not
    with pytest.raises(ValueError, match=r"holds a different run .*optim.lr: 0.003 \(saved\) vs 0.5"):
        Trainer(other)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no a3lm run"):
        Trainer(tiny_cfg(tmp_path / "c"))
    cfg = tiny_cfg(tmp_path / "d")
    cfg.data.source = str(tmp_path / "missing.jsonl")
    cfg.model.tokenizer = None
    with pytest.raises(ValueError, match="needs the synthetic data"):
        Trainer(cfg)


def test_cli_train_runs_and_reports_bad_input(tmp_path):
    from typer.testing import CliRunner

    from a3lm.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train",
            "--output",
            str(tmp_path / "bad"),
            "--data",
            str(tmp_path / "nope.txt"),
            "-s",
            "model.tokenizer=unused",
        ],
    )
    assert res.exit_code == 2 and "nope.txt' does not exist" in res.output
    assert not (tmp_path / "bad").exists()  # nothing written: the corrected command starts cleanly
    res = runner.invoke(
        app,
        [
            "train",
            "--output",
            str(tmp_path / "run"),
            "-s",
            "curriculum.stages=1,3",
            "-s",
            "curriculum.stage1_steps=1",
            "-s",
            "curriculum.stage3_steps=1",
            "-s",
            "data.micro_batch_size=2",
            "-s",
            "model.hidden_size=16",
            "-s",
            "log.progress=false",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["curriculum"]["stages"] == [1, 3]


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    a = tiny_cfg(tmp_path / "a", stages=[1, 3], stage1_steps=1, stage3_steps=1)
    b = tiny_cfg(tmp_path / "b", stages=[1, 3], stage1_steps=1, stage3_steps=1)
    b.model.gradient_checkpointing = True
    trainer = Trainer(b)
    assert trainer.model.model.gradient_checkpointing  # the decoder layers recompute in the backward
    wa, wb = weights(train(a)), weights(trainer.fit())
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    a = tiny_cfg(tmp_path / "a", stages=[1, 3], stage1_steps=1, stage3_steps=2)
    b = tiny_cfg(tmp_path / "b", stages=[1, 3], stage1_steps=1, stage3_steps=2)
    b.data.micro_batch_size, b.optim.grad_accum = 2, 2  # the same rows and groupings, in two halves
    wa, wb = weights(train(a)), weights(train(b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for key in ("loss", "grad_norm"):  # the gradient itself, not only its direction (AdamW ignores scale)
        assert [m[key] for m in ma] == pytest.approx([m[key] for m in mb], rel=1e-5), key


# -- data parallel -------------------------------------------------------------------------------------


def _as_rank(rank: int, world: int, port: int) -> None:
    """In a spawned worker: one thread, and the environment torchrun would give rank `rank` of `world`."""
    import os

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )


def _dist_worker(rank: int, world: int, port: int, out: str, parallel: str) -> None:
    _as_rank(rank, world, port)
    cfg = tiny_cfg(Path(out), stages=[0, 3], stage0_steps=2, stage3_steps=3)
    cfg.parallel = parallel
    cfg.stop_after = 3  # stop mid stage 3, then resume in a new trainer (in the same process group:
    Trainer(cfg).fit()  # `train()` would tear it down, and re-joining on the same port can hang)
    cfg.stop_after = None
    trainer = Trainer(cfg)
    assert trainer.step == 3
    trainer.fit()
    params = trainer.model.parameters()
    if parallel == "fsdp":
        params = (p.full_tensor() for p in params)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
    draws = draw_group_ids(
        policy_at(cfg.curriculum, 4), torch.ones(4, 10, dtype=torch.long), trainer.group_gen
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps({"params": digest, "groups": draws.tolist()}))
    torch.distributed.destroy_process_group()


def _spawn(out: Path, parallel: str) -> tuple[dict, dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_dist_worker, args=(2, port, str(out), parallel), nprocs=2, join=False)
    deadline = time.monotonic() + 240  # a collective that hangs fails the test instead of blocking CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{parallel} workers still running after 240 s (hung collective?)")
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def test_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    r0, r1 = _spawn(out, "ddp")
    assert r0["params"] == r1["params"]  # gradients were averaged: replicas stayed identical
    assert r0["groups"] != r1["groups"]  # each rank its own grouping stream
    last = ckpt.latest_checkpoint(out / "checkpoints")
    per_rank = {f"{part}_rank{r}.safetensors" for part in ("data", "rng") for r in (0, 1)}
    assert {p.name for p in last.iterdir()} >= per_rank
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4, 5]
    assert m[-1]["tokens"] == 5 * 2 * 4 * 10  # steps x ranks x rows x seq_len
    assert (out / "final" / "model.safetensors").exists() and (
        out / "ar_final" / "model.safetensors"
    ).exists()

    # FSDP (sharded) trains the same model: same data, groupings and updates up to float rounding
    fsdp = tmp_path / "fsdp"
    _spawn(fsdp, "fsdp")
    for name in ("ar_final", "final"):
        a, b = weights(out / name), weights(fsdp / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    assert [x["loss"] for x in metrics(fsdp)] == pytest.approx([x["loss"] for x in m], abs=1e-5)


def test_a_run_folder_from_before_a_new_option_still_resumes(tmp_path):
    cfg = tiny_cfg(tmp_path / "old", stages=[0], stage0_steps=6)
    cfg.stop_after = 4  # a checkpoint at step 4
    Trainer(cfg).fit()
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    del saved["parallel"]  # written by a version that did not have this option
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    cfg.stop_after = None
    resumed = Trainer(cfg)  # the missing field takes its default: the same run, resumed
    assert resumed.step == 4 and resumed.cfg.parallel == TrainConfig().parallel
    resumed.fit()
    whole = tiny_cfg(tmp_path / "whole", stages=[0], stage0_steps=6)
    train(whole)
    for name, value in weights(final_model_dir(tmp_path / "whole")).items():
        assert torch.equal(weights(final_model_dir(tmp_path / "old"))[name], value), name


# -- sharded checkpoints: resharding resume, interrupted sharded save -----------------------------------


def _reshard_cfg(out: Path, world: int) -> TrainConfig:
    """Stages 0-2 (no random groupings: the steps do not depend on the world size); 8 rows per step."""
    cfg = tiny_cfg(out, stages=[0, 1, 2], stage0_steps=2, stage1_steps=2, stage2_steps=2)
    cfg.parallel = "fsdp"
    cfg.optim.grad_accum = 2 // world  # micro-batches of 4 rows: 4 x 2 x 1 = 4 x 1 x 2 rows per step
    return cfg


def _reshard_worker(rank: int, world: int, port: int, tmp: str) -> None:
    _as_rank(rank, world, port)
    tmp = Path(tmp)
    cfg = _reshard_cfg(tmp / "two_to_one", world)
    cfg.stop_after = 3  # on 2 processes to step 3 (mid A3 phase); the parent finishes it on 1
    Trainer(cfg).fit()
    Trainer(_reshard_cfg(tmp / "one_to_two", world)).fit()  # the parent ran steps 1-3 on 1 process

    # interrupted sharded save: rank 1 dies while writing its shards of step 4
    cfg = _reshard_cfg(tmp / "interrupted", world)
    cfg.stop_after = 2
    Trainer(cfg).fit()
    cfg.stop_after = 4
    real = FileSystemWriter.write_data
    if rank == 1:
        FileSystemWriter.write_data = _dying_write
    try:
        Trainer(cfg).fit()
        error = None
    except OSError as e:  # DCP's CheckpointException, re-raised naming the checkpoint
        error = str(e)
    FileSystemWriter.write_data = real
    steps = [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp / "interrupted" / "checkpoints")]
    resumed = Trainer(cfg)
    start = resumed.step
    resumed.fit()
    Path(tmp, f"interrupted_rank{rank}.json").write_text(
        json.dumps({"error": error, "steps": steps, "start": start})
    )
    torch.distributed.destroy_process_group()


def test_sharded_checkpoints_resume_on_another_number_of_processes(tmp_path):
    import torch.multiprocessing as mp

    reference = train(_reshard_cfg(tmp_path / "reference", 1))  # uninterrupted, 1 process
    cfg = _reshard_cfg(tmp_path / "one_to_two", 1)
    cfg.stop_after = 3
    train(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_reshard_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("workers still running after 300 s (hung collective?)")
    # each rank wrote its own shards of the step-3 checkpoint; 1 process resumes from them
    shards = tmp_path / "two_to_one" / "checkpoints" / ckpt.checkpoint_name(3) / "state"
    assert {p.name for p in shards.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    resumed = Trainer(_reshard_cfg(tmp_path / "two_to_one", 1))
    assert resumed.step == 3
    resumed.fit()

    ref = metrics(tmp_path / "reference")
    for run in ("two_to_one", "one_to_two"):
        m = metrics(tmp_path / run)
        assert [x["step"] for x in m] == [1, 2, 3, 4, 5, 6] and [x["tokens"] for x in m] == [
            x["tokens"] for x in ref
        ]
        # the same rows every step (data neither repeated nor skipped): the same losses up to float rounding
        assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in ref], abs=1e-5), run
        a, b = weights(reference), weights(tmp_path / run / "final")
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), run

    for r in (0, 1):
        got = json.loads((tmp_path / f"interrupted_rank{r}.json").read_text())
        assert "OSError: killed" in got["error"]  # every rank learns that the save failed
        assert got["steps"] == [2] and got["start"] == 2  # the previous checkpoint stayed the latest
    done = ckpt.list_checkpoints(tmp_path / "interrupted" / "checkpoints")
    assert [ckpt.step_of(p) for p in done] == [2, 4]
    assert not any(p.name.startswith(TMP_PREFIX) for p in done[0].parent.iterdir())
