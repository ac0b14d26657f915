"""Instruction data: chat rendering, loss masks, one example per row, and stage 1 == causal SFT."""

import json

import pytest
import torch

from a3lm.data import synthetic
from a3lm.data.config import DataConfig
from a3lm.data.loader import build_loader
from a3lm.model.debug import tiny_base_model
from a3lm.model.modeling import A3ForCausalLM
from a3lm.tokenizer import word_tokenizer
from a3lm.training.curriculum import CurriculumConfig, draw_group_ids, policy_at

HMM = synthetic.default_hmm(0)
TOK = word_tokenizer([*HMM.words, "user", "assistant", "system", ":"])
TOK.chat_template = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
RECORDS = [
    {"messages": [{"role": "user", "content": "the cat sees"}, {"role": "assistant", "content": "a dog"}]},
    {"prompt": "she runs", "response": "it sleeps near the river"},
    {
        "messages": [
            {"role": "system", "content": "every old farmer"},
            {"role": "user", "content": "a bird"},
            {"role": "assistant", "content": "sings"},
        ]
    },
]


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def test_rows_are_one_rendered_example_each_with_answer_targets(chat_file):
    loader = build_loader(DataConfig(source=chat_file, format="chat", seq_len=32, micro_batch_size=3), TOK)
    batch = loader.next_batch()
    prompts = [
        "user : the cat sees <eos> assistant :",
        "user : she runs <eos> assistant :",
        "system : every old farmer <eos> user : a bird <eos> assistant :",
    ]
    answers = ["a dog <eos>", "it sleeps near the river <eos>", "sings <eos>"]
    N = max(1 + len(ids(p)) + len(ids(a)) for p, a in zip(prompts, answers, strict=True))
    assert batch["input_ids"].shape == (3, N)  # padded to the longest row, not to seq_len
    for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        row, k = [BOS, *ids(prompt), *ids(answer)], 1 + len(ids(prompt))
        n = len(row)
        assert batch["input_ids"][b, :n].tolist() == row
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (N - n)
        assert batch["known_mask"][b].tolist() == [True] * k + [False] * (N - k)
        assert batch["labels"][b].tolist() == [-100] * k + row[k:] + [-100] * (N - n)  # the answer only
    assert loader.source_tokens == [int(batch["attention_mask"].sum()) - 3]  # BOS and padding are no source's


def test_long_examples_are_cut_or_skipped_and_bad_records_are_clear_errors(chat_file, tmp_path):
    # seq_len 9: the first prompt (BOS + 8 tokens) fills the row, the second (BOS + 7) leaves 1 answer token
    loader = build_loader(DataConfig(source=chat_file, format="chat", seq_len=9, micro_batch_size=1), TOK)
    row = loader.next_batch()
    assert row["input_ids"][0].tolist() == [BOS, *ids("user : she runs <eos> assistant : it")]
    assert row["labels"][0].tolist()[-2:] == [-100, *ids("it")]
    with pytest.raises(ValueError, match="has a prompt of data.seq_len=4 tokens or more"):
        build_loader(
            DataConfig(source=chat_file, format="chat", seq_len=4, micro_batch_size=1), TOK
        ).next_batch()
    bad = tmp_path / "bad.jsonl"
    for record, message in (
        ({"text": "the cat"}, "record 0 .* has neither chat 'messages' nor 'prompt'"),
        ({"messages": [{"role": "user", "content": "a"}]}, "last message must be the assistant"),
    ):
        bad.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=message):
            build_loader(DataConfig(source=str(bad), format="chat", seq_len=16), TOK).next_batch()
    with pytest.raises(ValueError, match="this tokenizer has none"):
        build_loader(
            DataConfig(source=chat_file, format="chat", seq_len=16), word_tokenizer(HMM.words)
        ).next_batch()


def _sft_batch(chat_file: str):
    loader = build_loader(DataConfig(source=chat_file, format="chat", seq_len=32, micro_batch_size=3), TOK)
    return loader.next_batch()


def _models():
    base = tiny_base_model(
        "llama", vocab_size=len(TOK), bos_token_id=BOS, eos_token_id=EOS, pad_token_id=TOK.pad_token_id
    )
    return base.eval(), A3ForCausalLM.from_base(base).eval()


def test_every_grouping_keeps_the_prompt_first_and_examples_apart(chat_file):
    batch = _sft_batch(chat_file)
    _, a3 = _models()
    cur = CurriculumConfig(
        stages=[1, 2, 3],
        stage1_steps=1,
        stage2_steps=2,
        stage3_steps=3,
        stage2_max_size=3,
        stage3_max_size=3,
        infill_share=0.4,
        block_share=0.3,
    )
    gen = torch.Generator().manual_seed(0)
    mask, known = batch["attention_mask"], batch["known_mask"]
    for step in range(cur.total_steps):
        for draw in range(4):
            g = draw_group_ids(policy_at(cur, step), mask, gen, known)
            for b in range(3):
                k = int(known[b].sum())
                assert g[b, :k].tolist() == list(range(k))  # BOS and prompt: left-to-right singletons, first
                answer = g[b][mask[b].bool() & ~known[b]]
                assert bool((answer >= k).all()) and bool((g[b][~mask[b].bool()] == -1).all())
            if draw == 0 and step in (0, cur.total_steps - 1):
                _check_rows_alone_equal_rows_together(a3, batch, g)


def _check_rows_alone_equal_rows_together(a3, batch, g):
    """Isolation: a row's logits are the same alone as beside the other examples (no packing)."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        together = a3(input_ids=batch["input_ids"], group_ids=g, attention_mask=mask).logits
        for b in range(mask.shape[0]):
            n = int(mask[b].sum())
            alone = a3(input_ids=batch["input_ids"][b : b + 1, :n], group_ids=g[b : b + 1, :n]).logits
            torch.testing.assert_close(together[b, 1:n], alone[0, 1:n], atol=1e-5, rtol=1e-5)


def test_left_to_right_sft_is_the_causal_sft_loss(chat_file):
    batch = _sft_batch(chat_file)
    base, a3 = _models()
    stage1 = policy_at(CurriculumConfig(stages=[1], stage1_steps=1), 0)
    g = draw_group_ids(stage1, batch["attention_mask"], torch.Generator(), batch["known_mask"])
    with torch.no_grad():
        out = a3(
            input_ids=batch["input_ids"],
            group_ids=g,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        # the base model's own loss, labels -100 on BOS, prompt and padding (HF shifts them)
        ref = base(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert int(out.num_targets) == int((batch["labels"] != -100).sum()) == 3 + 6 + 2
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


def test_a_run_on_a_chat_mixture_resumes_exactly_and_logs_tokens_per_source(chat_file, tmp_path):
    from a3lm.training.config import CheckpointConfig, LogConfig, ModelConfig, OptimConfig, TrainConfig
    from a3lm.training.run import train

    TOK.save_pretrained(tmp_path / "tok")
    other = tmp_path / "more.jsonl"
    other.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n"
            for p, r in (("a cat", "the dog runs"), ("she sleeps", "a bird sings"))
        )
    )
    source = f"{chat_file}:0.5,{other}:0.5"

    def cfg(out):
        return TrainConfig(
            output=str(out),
            model=ModelConfig(tokenizer=str(tmp_path / "tok"), hidden_size=32, max_position_embeddings=32),
            data=DataConfig(source=source, format="chat", seq_len=24, micro_batch_size=2),
            curriculum=CurriculumConfig(
                stages=[0, 1, 3], stage0_steps=1, stage1_steps=2, stage3_steps=2, infill_share=0.5
            ),
            optim=OptimConfig(warmup_steps=1),
            checkpoint=CheckpointConfig(every=2),
            log=LogConfig(every=1, progress=False),
        )

    full = train(cfg(tmp_path / "full"))
    parts = cfg(tmp_path / "parts")
    parts.stop_after = 3
    train(parts)
    parts.stop_after = None
    assert train(parts) == tmp_path / "parts" / "final"
    from safetensors.torch import load_file

    a, b = (
        load_file(str(full / "model.safetensors")),
        load_file(str(tmp_path / "parts/final/model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [
        json.loads(ln)
        for name in ("full", "parts")
        for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    strip = [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]
    assert strip[:5] == strip[5:]
    last = lines[4]
    assert set(last["source_tokens"]) == {chat_file, str(other)} and min(last["source_tokens"].values()) > 0
    assert sum(last["source_tokens"].values()) == last["tokens"] - 5 * 2  # every real token but the rows' BOS
