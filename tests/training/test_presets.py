"""The paper's recipe presets: they build, their numbers are the documented ones, a scaled-down
copy trains."""

import dataclasses
from pathlib import Path

import pytest

from a3lm.data.loader import SYNTHETIC, mixture_parts
from a3lm.data.synthetic import default_hmm
from a3lm.model.debug import tiny_base_model
from a3lm.tokenizer import word_tokenizer
from a3lm.training.config import (
    ABLATION_TOKENS,
    PAPER_MIXTURE,
    PAPER_MODELS,
    PAPER_ROWS_PER_STEP,
    PAPER_TOKENS,
    TrainConfig,
    gpu_hours,
    make_config,
    paper_presets,
    preset_gpus,
)
from a3lm.training.run import train

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def _model_of(name: str):
    return next(m for m in PAPER_MODELS if name == m.key or name.startswith(m.key + "-"))


def recipe_row(name: str, cfg: TrainConfig) -> str:
    """The docs table's row of preset `name`, computed from the preset."""
    m, cur, o = _model_of(name), cfg.curriculum, cfg.optim
    tokens = cur.total_steps * PAPER_ROWS_PER_STEP * cfg.data.seq_len
    stages = (
        f"{cur.stage1_steps}/{cur.stage2_steps}/{cur.stage3_steps}"
        if cur.stages == [1, 2, 3]
        else (f"-/-/{cur.stage3_steps}")
    )
    how = f"LoRA r{cfg.lora.rank}, 1 GPU" if cfg.lora.enabled else f"FSDP2 + ckpt, {preset_gpus(cfg)} GPUs"
    micro = f"{cfg.data.micro_batch_size}x{o.grad_accum}x{preset_gpus(cfg)}"
    return (
        f"| `{name}` | {m.hub_id} | {tokens / 1e9:.2f}B | {cur.total_steps} | {stages} | {micro} | "
        f"{o.lr:g} | {how} | {gpu_hours(m, cfg):,.0f} |"
    )


def command_line(name: str, cfg: TrainConfig) -> str:
    gpus = preset_gpus(cfg)
    return f"torchrun --nproc-per-node {gpus} -m a3lm.cli train --preset {name} --output runs/{name}"


def test_every_paper_preset_builds_with_the_papers_budget():
    table = paper_presets()
    assert len(table) == 4 * len(PAPER_MODELS)
    for name, preset in table.items():
        cfg = make_config(preset=name)  # validates
        assert cfg == preset
        cur = cfg.curriculum
        rows = cfg.data.micro_batch_size * cfg.optim.grad_accum * preset_gpus(cfg)
        assert rows == PAPER_ROWS_PER_STEP and cfg.data.seq_len == 2048
        budget = ABLATION_TOKENS if "-2b" in name else PAPER_TOKENS
        assert abs(cur.total_steps * rows * cfg.data.seq_len - budget) / budget < 1e-4, name
        assert cfg.data.source == PAPER_MIXTURE and cfg.model.path == _model_of(name).hub_id
        parts = mixture_parts(cfg.data.source, cfg.data.name)  # the mixture parser reads it
        assert [(p.source, p.name, p.weight) for p in parts] == [
            ("HuggingFaceFW/fineweb", "sample-10BT", 0.7),
            ("cerebras/SlimPajama-627B", None, 0.3),
        ]
        assert cfg.model.gradient_checkpointing and cfg.precision == "bf16"
        if name.endswith("-lora"):
            assert cfg.lora.rank == 64 and cfg.parallel == "ddp"
        else:
            assert not cfg.lora.enabled and cfg.parallel == "fsdp"
        if name.endswith("stage3-only"):  # the ablation's control: as many steps, stage 3 alone
            whole = table[name.removesuffix("-stage3-only")].curriculum
            assert cur.stages == [3] and cur.total_steps == whole.total_steps
        else:
            assert cur.stages == [1, 2, 3] and cur.stage1_steps < cur.stage2_steps < cur.stage3_steps


def test_the_docs_table_and_command_lines_are_the_presets():
    if not DOCS.is_file():
        pytest.fail(f"{DOCS} is missing")
    text = " ".join(DOCS.read_text().split())  # prose may wrap anywhere
    assert f"`{PAPER_MIXTURE}`" in text
    for name, cfg in paper_presets().items():
        assert recipe_row(name, cfg) in text, f"docs/training.md lacks or misstates: {recipe_row(name, cfg)}"
        assert command_line(name, cfg) in text, name


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
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
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.2-1b-lora", "qwen3-0.6b-2b-stage3-only"])
def test_a_scaled_down_copy_of_a_preset_trains_a_few_steps(tmp_path, base_dir, name):
    """The recipe as it is (schedule shape, LoRA, checkpointing, accumulation), on a tiny model and the
    synthetic corpus, 4 steps, on the CPU."""
    cfg = paper_presets()[name]
    cur = cfg.curriculum
    small = dataclasses.replace(
        cfg,
        output=str(tmp_path / name),
        device="cpu",
        precision="fp32",
        model=dataclasses.replace(cfg.model, path=str(base_dir)),
        data=dataclasses.replace(
            cfg.data, source=SYNTHETIC, seq_len=10, micro_batch_size=2, synthetic_length=8
        ),
        curriculum=dataclasses.replace(
            cur, stage1_steps=1, stage2_steps=1, stage3_steps=2 if cur.stages != [3] else 4
        ),
        optim=dataclasses.replace(cfg.optim, grad_accum=2, warmup_steps=1),
    )
    small.log.progress = False
    final = train(small)
    assert (final / "model.safetensors").is_file()
    assert (tmp_path / name / "adapter").is_dir() == name.endswith("-lora")
