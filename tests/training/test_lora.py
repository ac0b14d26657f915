"""LoRA through peft: what trains, what a checkpoint holds, bit-exact resume, the merged final model and
the peft adapter beside it, FSDP2 with adapters."""

import json
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from a3lm.cli import app
from a3lm.data.loader import DataConfig
from a3lm.data.synthetic import default_hmm
from a3lm.model.debug import tiny_base_model
from a3lm.model.modeling import A3ForCausalLM
from a3lm.tokenizer import word_tokenizer
from a3lm.training import checkpoint as ckpt
from a3lm.training.callbacks import Callback
from a3lm.training.config import (
    CheckpointConfig,
    LogConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    make_config,
)
from a3lm.training.curriculum import CurriculumConfig
from a3lm.training.run import train
from a3lm.training.trainer import Trainer

LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny plain Llama with the synthetic corpus's word tokenizer, saved as a model folder; its LM head
    tied to the embeddings, as in SmolLM2 and Llama-3.2."""
    path = tmp_path_factory.mktemp("base")
    tok = word_tokenizer(default_hmm(0).words, model_max_length=32)
    tiny_base_model(
        "llama",
        seed=3,
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        max_position_embeddings=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora_cfg(out: Path, base: Path, rank: int = 4, **curriculum) -> TrainConfig:
    cur = {"stages": [1, 2, 3], "stage1_steps": 2, "stage2_steps": 2, "stage3_steps": 3}
    cur.update(curriculum)
    return TrainConfig(
        output=str(out),
        model=ModelConfig(path=str(base)),
        data=DataConfig(micro_batch_size=4, seq_len=10, synthetic_length=8),
        curriculum=CurriculumConfig(infill_share=0.25, **cur),
        optim=OptimConfig(warmup_steps=1, lr=1e-2),
        lora=LoRAConfig(rank=rank, dropout=0.1),  # dropout on: its draws must resume exactly too
        checkpoint=CheckpointConfig(every=3, keep=2),
        log=LogConfig(every=1, progress=False),
    )


def _metrics(out: Path) -> list[dict]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


def _batch(n: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 20, (n, length), generator=gen)
    ids[:, 0] = 1
    group_ids = torch.stack([torch.randperm(length - 1, generator=gen) + 1 for _ in range(n)])
    group_ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), group_ids], dim=1)
    return {"input_ids": ids, "group_ids": group_ids, "attention_mask": torch.ones_like(ids)}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


# -- configuration ------------------------------------------------------------------------------------


def test_lora_settings_from_overrides_and_typed_options():
    cfg = make_config(
        preset="tiny",
        overrides=["lora.rank=16", "lora.target_modules=q_proj,v_proj", "curriculum.stages=1,2,3"],
    )
    assert cfg.lora.rank == 16 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.scale_alpha == 32
    assert TrainConfig().lora.rank == 0 and not TrainConfig().lora.enabled  # off by default
    res = CliRunner().invoke(app, ["train", "--lora.rank", "-1", "--output", "unused"])
    assert res.exit_code != 0 and "lora.rank must be >= 0" in res.output
    with pytest.raises(ValueError, match="drop stage 0"):
        make_config(preset="tiny", overrides=["lora.rank=8"])  # the tiny preset pretrains (stage 0)
    with pytest.raises(ValueError, match="lora.dropout"):
        make_config(preset="tiny", overrides=["lora.rank=8", "curriculum.stages=3", "lora.dropout=1"])
    with pytest.raises(ValueError, match="set lora.rank > 0"):
        make_config(preset="tiny", overrides=["lora.load_in_4bit=true"])


def test_a_target_module_the_decoder_lacks_is_one_clear_error(tmp_path, base_dir):
    cfg = lora_cfg(tmp_path / "run", base_dir)
    cfg.lora.target_modules = ["q_proj", "qkv_proj"]
    with pytest.raises(ValueError, match=r"names no module \['qkv_proj'\].*down_proj"):
        Trainer(cfg)


def test_4bit_is_refused_in_one_line(tmp_path, base_dir):
    cfg = lora_cfg(tmp_path / "run", base_dir)
    cfg.lora.load_in_4bit = True
    with pytest.raises(ValueError, match="lora.load_in_4bit") as err:
        Trainer(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


# -- what trains --------------------------------------------------------------------------------------


def test_only_the_adapters_and_the_query_vector_train(tmp_path, base_dir):
    trainer = Trainer(lora_cfg(tmp_path / "run", base_dir))
    model = trainer.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "query_embed" in trainable and all("lora_" in n for n in trainable - {"query_embed"})
    adapted = {n.split(".")[-4] for n in trainable if "lora_A" in n}
    assert adapted == LINEARS  # every linear layer of the decoder's blocks; never embeddings or lm_head
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    policy = trainer.cfg.curriculum
    from a3lm.training.curriculum import policy_at

    trainer.gradients.accumulate(
        [trainer.loader.next_batch()], policy_at(policy, 4), trainer.group_gen, trainer.step
    )
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None for n in frozen_before)  # frozen weights get no gradient at all
    assert all(grads[n] is not None for n in trainable)
    # peft starts B at zero (the adapted model is the base): A's gradient B^T dL/dy is then zero too
    assert all(grads[n].abs().sum() > 0 for n in trainable if "lora_A" not in n)
    assert all(grads[n].abs().sum() == 0 for n in trainable if "lora_A" in n)
    model.zero_grad(set_to_none=True)
    trainer.fit()
    for n, p in trainer.model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]), n


# -- checkpoints and resume ---------------------------------------------------------------------------


def test_lora_checkpoints_hold_what_trains_and_resume_bit_exactly(tmp_path, base_dir):
    full = train(lora_cfg(tmp_path / "full", base_dir))
    parts = tmp_path / "parts"
    cfg = lora_cfg(parts, base_dir)
    cfg.stop_after = 2
    assert ckpt.step_of(train(cfg)) == 2

    class CtrlCAt(Callback):
        def on_step_end(self, trainer, metrics):
            if trainer.step == 5:
                signal.raise_signal(signal.SIGINT)

    cfg.stop_after = None
    with pytest.raises(KeyboardInterrupt, match="rerun the same command"):
        train(cfg, callbacks=[CtrlCAt()])
    assert train(cfg) == parts / "final"

    assert _metrics(tmp_path / "full") == _metrics(parts)  # identical losses, every step
    for name in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(parts / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # a checkpoint holds the adapters, the query vector and their AdamW moments: nothing frozen
    from torch.distributed.checkpoint import FileSystemReader

    last = ckpt.latest_checkpoint(parts / "checkpoints")
    keys = set(FileSystemReader(str(last / "state")).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert "query_embed" in model_keys and all("lora_" in k for k in model_keys - {"query_embed"})
    moments = {k for k in keys if k.startswith("optimizer.state.")}
    assert moments and all("lora_" in k or "query_embed" in k for k in moments)
    assert full == tmp_path / "full" / "final"


# -- the final folder: merged A3 model, peft adapter beside it ----------------------------------------


def test_final_is_a_merged_a3_model_and_the_adapter_loads_in_peft(tmp_path, base_dir):
    from peft import PeftModel

    trainer = Trainer(lora_cfg(tmp_path / "run", base_dir, stages=[3], stage3_steps=4))
    final = trainer.fit()
    batch = _batch()
    trained = _logits(trainer.model, batch)
    merged = A3ForCausalLM.from_pretrained(final)
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain A3 checkpoint
    got = _logits(merged, batch)
    assert torch.allclose(got, trained, atol=1e-5), (got - trained).abs().max()
    untrained = _logits(A3ForCausalLM.from_pretrained(base_dir), batch)
    assert (untrained - trained).abs().max() > 1e-2  # training moved the model: the check can fail

    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base_dir)
    peft_model = PeftModel.from_pretrained(A3ForCausalLM.from_pretrained(base_dir), str(adapter))
    via_peft = _logits(peft_model, batch)
    assert torch.allclose(via_peft, got, atol=1e-5), (via_peft - got).abs().max()


def test_commands_open_the_merged_final_model(tmp_path, base_dir):
    final = train(lora_cfg(tmp_path / "run", base_dir, stages=[3], stage3_steps=2))
    text = tmp_path / "held_out.txt"
    words = default_hmm(0).words
    text.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(8)))
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "nll",
            "--model",
            str(final),
            "--text",
            str(text),
            "--seq-len",
            "10",
            "--rows",
            "4",
            "--output",
            str(tmp_path / "nll.json"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "nll.json").read_text())
    assert results and "left" in res.output.lower()
    res = runner.invoke(
        app, ["sample", "--model", str(final), "--prompt", words[0], "--length", "4", "--seed", "0"]
    )
    assert res.exit_code == 0, res.output


# -- FSDP2 with adapters ------------------------------------------------------------------------------


def _fsdp_worker(rank: int, world: int, port: int, out: str, base: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    cfg = _sharded_cfg(Path(out), Path(base), world)
    cfg.stop_after = 2  # stop mid run, then resume in a new trainer (same process group)
    Trainer(cfg).fit()
    cfg.stop_after = None
    trainer = Trainer(cfg)
    assert trainer.step == 2
    trainer.fit()
    torch.distributed.destroy_process_group()


def _sharded_cfg(out: Path, base: Path, world: int) -> TrainConfig:
    """Stages 1-2 (fixed groupings: the steps do not depend on the world size); 8 rows per step."""
    cfg = lora_cfg(out, base, stages=[1, 2], stage1_steps=2, stage2_steps=2)
    cfg.lora.dropout = 0.0  # dropout draws differ with the split of rows over processes
    cfg.parallel = "fsdp"
    cfg.optim.grad_accum = 2 // world
    return cfg


@pytest.mark.slow  # about a minute on 2 shared cores (two processes spawned)
def test_fsdp_with_lora_trains_the_model_one_process_trains(tmp_path, base_dir):
    import torch.multiprocessing as mp

    reference = train(_sharded_cfg(tmp_path / "one", base_dir, 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_fsdp_worker, args=(2, port, str(tmp_path / "two"), str(base_dir)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("fsdp workers still running after 240 s (hung collective?)")
    shards = ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints") / "state"
    assert {p.name for p in shards.iterdir()} >= {"__0_0.distcp", "__1_0.distcp"}
    assert [x["loss"] for x in _metrics(tmp_path / "two")] == pytest.approx(
        [x["loss"] for x in _metrics(tmp_path / "one")], abs=1e-5
    )
    for name in ("final/model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(reference.parent / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
