"""Evaluation: the lm-eval adapter against the core likelihood, harness runs on local fixture data with
hand-counted accuracies, ROUGE / exact match / generative perplexity against hand-computed values."""

import csv
import json
import math
import re

import pytest
import torch
from lm_eval.api.instance import Instance

from a3lm import groups, sequence_logprobs
from a3lm.decoding.text import cut_at_stop
from a3lm.evaluation.continuations import request_generator
from a3lm.evaluation.genppl import judge_perplexity, unigram_entropy
from a3lm.evaluation.lm_eval_adapter import A3LM
from a3lm.evaluation.rocstories import CLOZE_FILE, find_stories_file, infill_batch, read_stories, rouge
from a3lm.evaluation.tasks import MissingDataError, run_harness
from a3lm.evaluation.triviaqa import exact_match
from a3lm.model.convert import model_fingerprint
from a3lm.model.debug import tiny_a3_model, tiny_base_model
from a3lm.tokenizer import word_tokenizer

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "a",
    "big",
    "red",
    "good",
    "bad",
    "went",
    "home",
    "end",
    "question",
    "answer",
    "q",
    ":",
    "?",
    ".",
    ",",
    "who",
    "is",
    "paris",
    "france",
    "city",
    "one",
    "two",
    "three",
    "yes",
    "no",
]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model():
    return tiny_a3_model("llama", vocab_size=len(WORDS) + 4)


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return A3LM(model, tokenizer=tokenizer, batch_size=3)


def reference_logprob(
    model, tokenizer, context: str, continuation: str, order: str = "left-to-right", size: int = 1
):
    """log p(continuation | context) built from the core only: the tokenizer (adds BOS), the group builders
    of a3lm.groups and sequence_logprobs; returns (total, greedy)."""
    ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
    n_ctx = len(tokenizer(context)["input_ids"]) if context else 1
    mask = torch.ones_like(ids)
    if order == "left-to-right":
        group_ids = groups.left_to_right(mask, size, n_lead=n_ctx)
    elif order == "right-to-left":
        group_ids = groups.right_to_left(mask, size, n_lead=n_ctx)
    else:
        known = torch.arange(ids.shape[1])[None] < n_ctx
        gen = request_generator(1234, ids[0, :n_ctx].tolist(), ids[0, n_ctx:].tolist())
        group_ids = groups.infill_groups(known, mask, size, order="random", generator=gen)
    target = ~(torch.arange(ids.shape[1])[None] < n_ctx)
    out = sequence_logprobs(model, ids, group_ids, mask, target)
    logits = model(input_ids=ids, group_ids=group_ids, attention_mask=mask).logits
    greedy = bool((logits.argmax(-1) == ids)[target].all())
    return float(out.total), greedy


PAIRS = [
    ("the cat", " sat on the mat"),
    ("a dog", " ran"),
    ("the big red dog went", " home . the end"),
    ("", "the cat sat"),
    ("who is", " paris ?"),
]


@pytest.mark.parametrize(
    ("order", "size"), [("left-to-right", 1), ("left-to-right", 2), ("right-to-left", 1), ("random", 2)]
)
def test_adapter_loglikelihood_equals_sequence_logprobs(model, tokenizer, order, size):
    lm = A3LM(model, tokenizer=tokenizer, batch_size=3, order=order, group_size=size, seed=1234)
    got = lm.loglikelihood(
        [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True
    )
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        ref, ref_greedy = reference_logprob(model, tokenizer, context, continuation, order, size)
        assert logprob == pytest.approx(ref, abs=1e-4), (context, continuation)
        assert greedy == ref_greedy


def test_greedy_continuation_is_greedy(model, tokenizer, lm):
    """is_greedy is True for the argmax continuation (a path where every token is the argmax)."""
    ids = tokenizer("the cat")["input_ids"]
    for _ in range(3):
        logits = model(input_ids=torch.tensor([ids + [0]])).logits  # row -1 predicts the appended slot
        ids = ids + [int(logits[0, -1].argmax())]
    continuation = " " + tokenizer.decode(ids[3:])
    [(_, greedy)] = lm.loglikelihood(
        [Instance("loglikelihood", {}, ("the cat", continuation), 0)], disable_tqdm=True
    )
    assert tokenizer.encode(continuation, add_special_tokens=False) == ids[3:]
    assert greedy
    # generate_until's greedy left-to-right decoding (sampler + cache) follows the same argmax chain
    assert lm.generate(["the cat"], until=[], max_gen_toks=3) == [tokenizer.decode(ids[3:])]


def test_cut_at_stop_and_dynamic_generation(model, tokenizer):
    assert cut_at_stop("paris. france", [".", "\n"]) == ("paris", True)
    assert cut_at_stop("a, b. c", [".", ","]) == ("a", True)
    assert cut_at_stop("no stop", ["", "."]) == ("no stop", False)
    lm = A3LM(model, tokenizer=tokenizer, gen_mode="dynamic", criterion="entropy", per_step=2, batch_size=2)
    reqs = [
        Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 4}), i)
        for i, c in enumerate(["the cat", "a", "who is"])
    ]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert len(out) == 3 and all(isinstance(t, str) and "." not in t for t in out)


def test_loglikelihood_rolling_windows(model, tokenizer):
    text = "the cat sat on mat"  # t0..t4
    t = tokenizer.encode(text, add_special_tokens=False)
    full = A3LM(model, tokenizer=tokenizer)
    [whole] = full.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    assert whole == pytest.approx(reference_logprob(model, tokenizer, "", text)[0], abs=1e-4)
    # max_length 4: windows [BOS] -> t0 t1, [BOS t1] -> t2 t3, [BOS t2 t3] -> t4 (every window fits
    # 4 positions)
    short = A3LM(model, tokenizer=tokenizer, max_length=4)
    [windowed] = short.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True
    )
    dec = tokenizer.decode
    expected = (
        reference_logprob(model, tokenizer, "", dec(t[:2]))[0]
        + reference_logprob(model, tokenizer, dec(t[1:2]), " " + dec(t[2:4]))[0]
        + reference_logprob(model, tokenizer, dec(t[2:4]), " " + dec(t[4:]))[0]
    )
    assert windowed == pytest.approx(expected, abs=1e-4)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def unigram_model(tokenizer, favourite: str):
    """A model that ignores its input: zero lm_head weights plus a bias making `favourite` likely."""
    model = tiny_a3_model("llama", vocab_size=len(WORDS) + 4)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.convert_tokens_to_ids(favourite)] = 5.0
    model.lm_head = head
    return model


def test_simple_evaluate_piqa_matches_hand_count(tokenizer, tmp_path):
    """Every "good good" answer beats "bad bad" (acc and acc_norm); labels point at it in 4 of 6 docs."""
    model = unigram_model(tokenizer, "good")
    good_index = [0, 1, 0, 1, 1, 0]
    labels = [0, 1, 1, 1, 0, 0]  # right where good_index == label: docs 0, 1, 3, 5
    docs = []
    for g, label in zip(good_index, labels, strict=True):
        sols = ["good good", "bad bad"] if g == 0 else ["bad bad", "good good"]
        docs.append({"goal": "the cat sat", "sol1": sols[0], "sol2": sols[1], "label": label})
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", docs)
    results = run_harness(A3LM(model, tokenizer=tokenizer), ["piqa"], data_dir=tmp_path)[0]
    assert results["piqa"]["acc"] == pytest.approx(4 / 6)
    assert results["piqa"]["acc_norm"] == pytest.approx(4 / 6)


def test_simple_evaluate_siqa_matches_model_likelihoods(model, tokenizer, lm, tmp_path):
    """Expected answers from the core likelihood of each choice; labels agree with them in 2 of 4 docs."""
    docs = [
        {
            "context": "the cat sat",
            "question": "who is ?",
            "answerA": "the dog",
            "answerB": "a big red cat",
            "answerC": "home",
        },
        {
            "context": "a dog ran",
            "question": "who ran ?",
            "answerA": "yes",
            "answerB": "no",
            "answerC": "the end",
        },
        {
            "context": "paris is",
            "question": "a city ?",
            "answerA": "france",
            "answerB": "one two three",
            "answerC": "good",
        },
        {"context": "the end", "question": "is it ?", "answerA": "bad", "answerB": "yes", "answerC": "two"},
    ]
    for i, doc in enumerate(docs):
        context = f"Q: {doc['context']} {doc['question']}\nA:"  # the harness's siqa prompt
        lls = [
            reference_logprob(model, tokenizer, context, " " + doc[k])[0]
            for k in ("answerA", "answerB", "answerC")
        ]
        best = max(range(3), key=lambda k: lls[k])
        doc["label"] = str(best + 1 if i < 2 else (best + 1) % 3 + 1)  # right, right, wrong, wrong
    write_jsonl(tmp_path / "siqa" / "validation.jsonl", docs)
    results = run_harness(lm, ["siqa"], data_dir=tmp_path)[0]
    assert results["siqa"]["acc"] == pytest.approx(0.5)


def test_exact_match_hand_values():
    assert exact_match("Paris", ["paris"]) == 1.0
    assert exact_match("  Paris.\n", ["Paris, France", "paris"]) == 1.0  # whitespace, case, punctuation
    assert exact_match("Paris France", ["Paris, France"]) == 1.0
    assert exact_match("Paris is", ["paris"]) == 0.0
    assert exact_match("", ["paris"]) == 0.0


def test_triviaqa_from_local_file(lm, tmp_path):
    """Greedy answers (what the adapter generates) are right for the docs whose aliases hold them."""
    questions = ["who is paris", "the big red dog", "a cat", "is it one"]
    preds = [
        lm.generate([f"Question: {q}?\nAnswer:"], until=["\n", ".", ","], max_gen_toks=3)[0]
        for q in questions
    ]
    docs = []
    for i, (q, pred) in enumerate(zip(questions, preds, strict=True)):
        aliases = [pred.strip().upper() + "!", "zzz"] if i < 3 else ["zzz"]
        docs.append({"question": q, "answer": {"aliases": aliases, "value": aliases[0]}})
    write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", docs)
    short = A3LM(lm.model, tokenizer=lm.tokenizer, max_gen_toks=3)
    results = run_harness(short, ["triviaqa"], data_dir=tmp_path)[0]
    assert results["triviaqa"]["exact_match"] == pytest.approx(3 / 4)


def test_rouge_hand_values():
    # unigrams: the, cat, on, mat shared (4 of 6 each side); bigrams: "the cat" (1 of 5); LCS the cat on mat
    one = rouge(["the cat lay on a mat"], ["the cat sat on the mat"], use_stemmer=False)
    assert one == pytest.approx({"rouge1": 200 / 3, "rouge2": 20.0, "rougeL": 200 / 3})
    # precision 1, recall 2/6 -> F1 0.5; bigram P 1 R 1/5 -> F1 1/3; plus an exact match (100 each)
    two = rouge(["the cat", "a dog ran"], ["the cat sat on the mat", "a dog ran"], use_stemmer=False)
    assert two == pytest.approx({"rouge1": 75.0, "rouge2": (100 / 3 + 100) / 2, "rougeL": 75.0})


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


SENTENCES = ("the cat sat .", "a dog ran .", "the dog went home .", "the cat sat on the mat .", "the end .")
STORY_HEADER = ["storyid", "storytitle", *(f"sentence{i}" for i in range(1, 6))]


def write_two_stories(data):
    """data/rocstories/stories.csv: SENTENCES as one story, and reversed as a second."""
    write_csv(
        data / "rocstories" / "stories.csv",
        STORY_HEADER,
        [["s1", "t", *SENTENCES], ["s2", "t", *SENTENCES[::-1]]],
    )


def test_read_both_story_layouts_and_infill_inputs(model, tokenizer, tmp_path):
    write_csv(
        tmp_path / "roc.csv",
        STORY_HEADER,
        [["s1", "t", *SENTENCES]],
    )
    header = [
        "InputStoryid",
        *(f"InputSentence{i}" for i in range(1, 5)),
        "RandomFifthSentenceQuiz1",
        "RandomFifthSentenceQuiz2",
        "AnswerRightEnding",
    ]
    write_csv(
        tmp_path / "rocstories" / CLOZE_FILE, header, [["c1", *SENTENCES[:4], "bad end .", SENTENCES[4], "2"]]
    )
    roc = read_stories(tmp_path / "roc.csv")
    cloze = read_stories(find_stories_file(tmp_path))
    assert roc[0].sentences == cloze[0].sentences == SENTENCES

    input_ids, known, mask = infill_batch(tokenizer, roc, blank_length=None)
    story = tokenizer(" ".join(SENTENCES))["input_ids"]  # BOS + the whole story
    middle = tokenizer.encode(" " + SENTENCES[2], add_special_tokens=False)
    n_prefix = 1 + len(tokenizer.encode(" ".join(SENTENCES[:2]), add_special_tokens=False))
    assert input_ids[0][known[0]].tolist() == story[:n_prefix] + story[n_prefix + len(middle) :]
    assert int((~known[0] & mask[0].bool()).sum()) == len(middle)
    assert int((~infill_batch(tokenizer, roc, blank_length=9)[1][0]).sum()) == 9


def test_judge_perplexity_equals_judge_loss(tokenizer):
    judge = tiny_base_model("llama", seed=1, vocab_size=len(WORDS) + 4)
    texts = ["the cat sat on the mat .", "a dog ran home"]
    losses, counts = [], []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])  # BOS first, as the judge scores
        with torch.no_grad():
            losses.append(float(judge(input_ids=ids, labels=ids).loss))
        counts.append(ids.shape[1] - 1)
    assert judge_perplexity(judge, tokenizer, texts[:1]) == pytest.approx(math.exp(losses[0]), rel=1e-5)
    pooled = math.exp(sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts))
    assert judge_perplexity(judge, tokenizer, texts, batch_size=2) == pytest.approx(pooled, rel=1e-5)


def test_unigram_entropy_hand_values():
    assert unigram_entropy([5, 5, 5, 5]) == 0.0
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def test_missing_data_names_the_files(lm, tmp_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", [{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}])
    with pytest.raises(MissingDataError) as err:
        run_harness(lm, ["piqa", "hellaswag", "winogrande"], data_dir=tmp_path)[0]
    message = str(err.value)
    assert str(tmp_path / "hellaswag" / "validation.jsonl") in message
    assert str(tmp_path / "winogrande" / "validation.jsonl") in message
    assert "piqa" not in message  # present: not reported
    with pytest.raises(MissingDataError, match=CLOZE_FILE):
        find_stories_file(tmp_path)


def test_registered_and_cli_eval(model, tokenizer, tmp_path):
    from lm_eval.api.registry import get_model
    from typer.testing import CliRunner

    from a3lm.cli import app

    model_dir, judge_dir, data = tmp_path / "model", tmp_path / "judge", tmp_path / "data"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tiny_base_model("llama", seed=1, vocab_size=len(WORDS) + 4).save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    loaded = get_model("a3lm").create_from_arg_string(
        f"pretrained={model_dir},order=right-to-left,group_size=2"
    )
    assert isinstance(loaded, A3LM) and (loaded.order, loaded.group_size) == ("right-to-left", 2)
    assert get_model("dummy").__name__ == "DummyLM"  # registering ours kept the harness's own models

    write_jsonl(
        data / "piqa" / "validation.jsonl",
        [{"goal": "the cat", "sol1": "sat", "sol2": "ran", "label": i % 2} for i in range(3)],
    )
    write_two_stories(data)
    out = tmp_path / "results.json"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--tasks",
        "piqa,rocstories,genppl",
        "--output",
        str(out),
        "--data-dir",
        str(data),
        "--judge",
        str(judge_dir),
        "--limit",
        "2",
        "--genppl-samples",
        "2",
        "--genppl-length",
        "6",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "piqa acc" in result.output and "gen-entropy ppl" in result.output
    saved = json.loads(out.read_text())
    tasks = {(r["task"], r["metric"]) for r in saved["results"]}
    assert {
        ("piqa", "acc"),
        ("rocstories_group", "rougeL"),
        ("rocstories_dynamic", "rouge1"),
        ("genppl_random", "gen_ppl"),
    } <= tasks
    assert all(r["model"] == str(model_dir) and "seed" in r["settings"] for r in saved["results"])
    assert saved["versions"]["lm_eval"] != "not installed"

    missing = CliRunner().invoke(
        app, ["eval", "--model", str(model_dir), "--tasks", "hellaswag", "--data-dir", str(tmp_path / "none")]
    )
    assert missing.exit_code == 2 and "hellaswag/validation.jsonl" in missing.output


# -- the base row, decoding options, generations, names, stderr ------------------------------------

HELLASWAG_ENDINGS = ["sat on the mat .", "ran home", "big red dog", "yes no", "the end ."]


def write_likelihood_fixtures(data):
    """PIQA and HellaSwag validation files in the hub's fields (what the harness's yamls read)."""
    piqa = [
        {"goal": g, "sol1": a, "sol2": b, "label": i % 2}
        for i, (g, a, b) in enumerate(
            [
                ("the cat", "sat on the mat", "ran home"),
                ("a dog", "went home", "is paris"),
                ("who is", "paris ?", "the end"),
                ("the big red", "dog ran", "cat"),
                ("yes", "no", "one two three"),
                ("the end", ".", "good bad"),
            ]
        )
    ]
    hellaswag = [
        {
            "ctx_a": a,
            "ctx_b": b,
            "ctx": f"{a} {b}",
            "activity_label": label,
            "endings": HELLASWAG_ENDINGS[i % 2 : i % 2 + 4],
            "label": str(i % 4),
        }
        for i, (a, b, label) in enumerate(
            [
                ("the cat", "sat", "cat"),
                ("a dog", "ran", "dog"),
                ("who is", "the", "city"),
                ("the big", "red", "home"),
            ]
        )
    ]
    write_jsonl(data / "piqa" / "validation.jsonl", piqa)
    write_jsonl(data / "hellaswag" / "validation.jsonl", hellaswag)
    questions = ["who is paris", "the big red dog", "a cat"]
    write_jsonl(
        data / "triviaqa" / "validation.jsonl",
        [{"question": q, "answer": {"aliases": ["paris"], "value": "paris"}} for q in questions],
    )


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-base"
    tiny_base_model("llama", vocab_size=len(WORDS) + 4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_base_row_equals_lm_eval_hf(base_dir, tmp_path):
    """The AR base under our adapter gives lm-eval's own `hf` model's numbers on the same local files:
    every log-likelihood, acc and acc_norm, and the TriviaQA generations (greedy)."""
    from lm_eval.models.huggingface import HFLM

    from a3lm.evaluation.lm_eval_adapter import BaseLM

    class HF(HFLM):  # the harness's hf model generates 256 tokens: more than the tiny model's 128 positions
        @property
        def max_gen_toks(self) -> int:
            return 8

    write_likelihood_fixtures(tmp_path)
    ours = BaseLM(str(base_dir), batch_size=4, device="cpu", max_gen_toks=8)
    theirs = HF(pretrained=str(base_dir), batch_size=4, device="cpu")
    requests = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)]
    for (a, a_greedy), (b, b_greedy) in zip(
        ours.loglikelihood(requests, disable_tqdm=True), theirs.loglikelihood(requests), strict=True
    ):
        assert a == pytest.approx(b, abs=1e-5) and a_greedy == b_greedy
    (our_metrics, our_samples), (hf_metrics, hf_samples) = (
        run_harness(lm, ["piqa", "hellaswag", "triviaqa"], data_dir=tmp_path) for lm in (ours, theirs)
    )
    for task in ("piqa", "hellaswag"):
        assert our_metrics[task]["acc"] == hf_metrics[task]["acc"]
        assert our_metrics[task]["acc_norm"] == hf_metrics[task]["acc_norm"]
    assert [s["resps"] for s in our_samples["triviaqa"]] == [s["resps"] for s in hf_samples["triviaqa"]]
    # per-document scores too: the harness logs each choice's log-likelihood
    for task in ("piqa", "hellaswag"):
        for a, b in zip(our_samples[task], hf_samples[task], strict=True):
            assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-5)


def test_ar_model_scores_left_to_right_only(base_dir):
    from a3lm.evaluation.lm_eval_adapter import BaseLM

    with pytest.raises(ValueError, match="left to right"):
        BaseLM(str(base_dir), order="right-to-left")


def test_eval_decoding_configs(tmp_path):
    """The CLI builds the two DecodingConfigs once: a bad combination fails before any model loads,
    and the JSON records the options that act in each mode."""
    from typer.testing import CliRunner

    from a3lm.cli import app
    from a3lm.decoding.config import DecodingConfig
    from a3lm.evaluation.lm_eval_adapter import describe_decoding

    missing_model = str(tmp_path / "no-model")
    for flags, message in (
        (["--criterion", "entropy", "--threshold", "0.9"], "threshold compares a probability"),
        (["--speculative", "2", "--gen-group-size", "2"], "speculative"),
        (["--speculative", "2", "--speculative-schedule", "eager"], "unknown speculative_schedule"),
        (["--genppl-modes", "group,sideways"], "unknown genppl mode"),
    ):
        result = CliRunner().invoke(app, ["eval", "--model", missing_model, "--tasks", "piqa", *flags])
        assert result.exit_code == 2 and message in result.output, result.output
    config = DecodingConfig(dynamic=True, criterion="margin", threshold=0.8, temperature=0.5)
    assert describe_decoding(config) == {
        "mode": "dynamic",
        "criterion": "margin",
        "per_step": 1,
        "threshold": 0.8,
        "temperature": 0.5,
        "top_k": None,
        "top_p": None,
        "use_cache": True,
    }
    assert describe_decoding(DecodingConfig(order="random", speculative=3))["speculative"] == 3
    assert (
        describe_decoding(DecodingConfig(speculative=3, speculative_schedule="heuristic"))[
            "speculative_schedule"
        ]
        == "heuristic"
    )


def test_row_names(tmp_path):
    from a3lm.evaluation.runner import make_rows
    from a3lm.files import model_name

    (tmp_path / "myrun" / "final").mkdir(parents=True)
    (tmp_path / "myrun" / "checkpoints" / "step_00000100").mkdir(parents=True)
    assert model_name(str(tmp_path / "myrun" / "final")) == "myrun"
    assert model_name(str(tmp_path / "myrun" / "final") + "/") == "myrun"
    assert model_name(str(tmp_path / "myrun" / "checkpoints" / "step_00000100")) == "myrun/step_00000100"
    assert model_name(str(tmp_path / "SmolLM2-135M.Q4_1.gguf")) == "SmolLM2-135M.Q4_1"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    rows = make_rows(
        [str(tmp_path / "myrun" / "final")], ["left-to-right", "random"], base="HuggingFaceTB/SmolLM2-135M"
    )
    assert [r.label for r in rows] == [
        "HuggingFaceTB/SmolLM2-135M (AR)",
        "myrun [left-to-right]",
        "myrun [random]",
    ]
    with pytest.raises(ValueError, match="--name"):
        make_rows(["a/final", "b/final"], ["left-to-right"], names=["x", "x"])


def test_no_git_noise_and_single_pretrained(lm, tmp_path, monkeypatch, capfd, caplog):
    """Outside a git checkout the harness's commit lookup prints git's "fatal: ..." on stderr; a run
    through run_harness does not. The harness's own messages name the model once."""
    import lm_eval.loggers.utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "no-git"))  # git finds no repository, wherever tmp is
    lm_eval.loggers.utils.get_git_commit_hash()
    assert "fatal" in capfd.readouterr().err  # the noise this test is about is there without the fix
    write_jsonl(
        tmp_path / "piqa" / "validation.jsonl",
        [{"goal": "the cat", "sol1": "sat", "sol2": "ran", "label": 0}],
    )
    instruct = A3LM(lm.model, tokenizer=lm.tokenizer)
    instruct.model_path = str(
        tmp_path / "tiny-Instruct"
    )  # the harness warns about instruct models without a chat template
    with caplog.at_level("WARNING", logger="lm_eval"):
        run_harness(instruct, ["piqa"], data_dir=tmp_path)[0]
    assert "fatal" not in capfd.readouterr().err
    assert f"pretrained={tmp_path / 'tiny-Instruct'}" in caplog.text
    assert "pretrained=pretrained=" not in caplog.text


def test_cli_base_and_a3_rows_with_every_generation(model, tokenizer, base_dir, tmp_path):
    """One table: the base row, an A3 row per scoring order, the differences; every option and every
    generation (TriviaQA answers, ROCStories fills, genppl samples) lands in the JSON."""
    from typer.testing import CliRunner

    from a3lm.cli import app

    run_dir, data = tmp_path / "myrun" / "final", tmp_path / "data"
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
    write_likelihood_fixtures(data)
    write_two_stories(data)
    out = tmp_path / "results.json"
    args = [
        "eval",
        "--model",
        str(run_dir),
        "--base",
        str(base_dir),
        "--order",
        "left-to-right,random",
        "--tasks",
        "piqa,triviaqa,rocstories,genppl",
        "--output",
        str(out),
        "--data-dir",
        str(data),
        "--judge",
        str(base_dir),
        "--limit",
        "3",
        "--max-gen-toks",
        "4",
        "--gen-group-size",
        "2",
        "--criterion",
        "margin",
        "--per-step",
        "2",
        "--genppl-modes",
        "group,entropy",
        "--genppl-samples",
        "2",
        "--genppl-length",
        "6",
        "--genppl-temperature",
        "0.7",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    table = saved["table"].splitlines()
    assert [line.split(" | ")[0].strip() for line in table[2:]] == [
        "tiny-base (AR)",
        "myrun [left-to-right]",
        "- base",
        "myrun [random]",
        "- base",
    ]
    value = {(r["row"], r["task"], r["metric"]): r["value"] for r in saved["results"]}
    # each difference row is A3 minus base, column by column
    header = [c.strip() for c in table[0].split(" | ")]
    for col, (task, metric) in (
        (header.index("piqa acc"), ("piqa", "acc")),
        (header.index("gen-group ppl"), ("genppl_group", "gen_ppl")),
    ):
        base_value = value[("tiny-base (AR)", task, metric)]
        for diff_line, row in ((table[4], "myrun [left-to-right]"), (table[6], "myrun [random]")):
            diff = value[(row, task, metric)] - base_value
            assert diff_line.split(" | ")[col].strip() == (
                f"{100 * diff:+.1f}" if metric == "acc" else f"{diff:+.2f}"
            )
    # options round-trip into the JSON: the random row generates in random order, groups of 2
    trivia = {
        r["row"]: r["settings"]["decoding"]
        for r in saved["results"]
        if r["task"] == "triviaqa" and r["metric"] == "exact_match"
    }
    assert trivia["myrun [random]"] == {
        "mode": "group",
        "order": "random",
        "group_size": 2,
        "temperature": 0.0,
        "top_k": None,
        "top_p": None,
        "use_cache": True,
    }
    assert trivia["myrun [left-to-right]"]["order"] == "left-to-right"
    roc = {
        r["row"]: r["settings"]
        for r in saved["results"]
        if r["task"] == "rocstories_dynamic" and r["metric"] == "rouge1"
    }
    assert roc["myrun [random]"]["decoding"] == {
        "mode": "dynamic",
        "criterion": "margin",
        "per_step": 2,
        "threshold": None,
        "temperature": 0.0,
        "top_k": None,
        "top_p": None,
        "use_cache": True,
    }
    gen = {(r["row"], r["task"]): r["settings"] for r in saved["results"] if r["metric"] == "gen_ppl"}
    assert gen[("myrun [random]", "genppl_entropy")]["decoding"]["criterion"] == "entropy"
    assert gen[("myrun [random]", "genppl_entropy")]["decoding"]["temperature"] == 0.7
    assert gen[("myrun [random]", "genppl_group")]["decoding"] | {} == {
        "mode": "group",
        "order": "random",
        "group_size": 2,
        "temperature": 0.7,
        "top_k": None,
        "top_p": None,
        "use_cache": True,
    }
    assert ("tiny-base (AR)", "genppl_group") in gen and ("tiny-base (AR)", "genppl_entropy") not in gen
    assert (
        saved["config"]["decoding"]["group_size"] == 2 and saved["config"]["dynamic"]["criterion"] == "margin"
    )
    assert saved["config"]["genppl_modes"] == ["group", "entropy"]
    # every generation with its prompt and score; empty answers counted
    for row in ("tiny-base (AR)", "myrun [left-to-right]", "myrun [random]"):
        outputs = saved["outputs"][row]
        answers = outputs["triviaqa"]
        assert len(answers) == 3 and all(
            a["prompt"].startswith("Question: ") and "exact_match" in a for a in answers
        )
        assert value[(row, "triviaqa", "empty")] == sum(a["answer"] == "" for a in answers)
        assert value[(row, "triviaqa", "exact_match")] == pytest.approx(
            sum(a["exact_match"] for a in answers) / 3
        )
        fills = outputs["rocstories_ar" if "AR" in row else "rocstories_group"]
        assert [f["reference"] for f in fills] == ["the dog went home ."] * 2 and all(
            "[BLANK:" in f["prompt"] for f in fills
        )
        assert value[
            (row, "rocstories_ar" if "AR" in row else "rocstories_group", "rouge1")
        ] == pytest.approx(sum(f["rouge1"] for f in fills) / 2)
        samples = outputs["genppl_group"]
        nll, n = sum(s["judge_nll"] for s in samples), sum(s["judge_tokens"] for s in samples)
        assert len(samples) == 2 and value[(row, "genppl_group", "gen_ppl")] == pytest.approx(
            math.exp(nll / n), rel=1e-5
        )
    assert "trivia" not in table[0] or "triviaqa empty" in table[0]

    bad = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(run_dir),
            "--tasks",
            "piqa",
            "--gen-order",
            "sideways",
            "--data-dir",
            str(data),
        ],
    )
    assert bad.exit_code == 2 and "unknown order 'sideways'" in bad.output


def test_base_rocstories_continues_the_prefix_greedily(tokenizer):
    """The AR base fills the blank with its greedy continuation of sentences 1-2 (a token-by-token
    argmax loop over full forwards here), cut to the blank's length."""
    from a3lm.evaluation.rocstories import Story, evaluate_rocstories

    base = tiny_base_model("llama", seed=3, vocab_size=len(WORDS) + 4)
    stories = [
        Story("a", ("the cat sat .", "a dog ran .", "the dog went home .", "the end .", "yes .")),
        Story("b", ("who is paris ?", "a big city .", "one two .", "no .", "the end .")),
    ]
    _, records = evaluate_rocstories(base, tokenizer, stories, batch_size=2, progress=False)
    for story, record in zip(stories, records, strict=True):
        ids = tokenizer(" ".join(story.sentences[:2]))["input_ids"]
        n = len(tokenizer.encode(" " + story.sentences[2], add_special_tokens=False))
        fill = []
        for _ in range(n):
            with torch.no_grad():
                token = int(base(input_ids=torch.tensor([ids + fill])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            fill.append(token)
        assert record["prediction"] == tokenizer.decode(fill, skip_special_tokens=True).strip()
        assert (
            record["prompt"] == f"{' '.join(story.sentences[:2])} [BLANK:{n}] {' '.join(story.sentences[3:])}"
        )


def test_rerun_keeps_finished_rows(base_dir, tmp_path, monkeypatch):
    """The JSON is written after every row; a rerun of the same config evaluates only the rows that
    are not in it, and a changed config starts afresh."""
    from a3lm.evaluation import runner

    write_likelihood_fixtures(tmp_path)
    cfg = runner.EvalConfig(tasks=["piqa"], limit=2, data_dir=str(tmp_path), device="cpu")
    out = tmp_path / "results.json"
    first = runner.run([], cfg, out, base=str(base_dir))
    assert first["complete"] and json.loads(out.read_text())["table"] == first["table"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished row was evaluated again")

    with monkeypatch.context() as m:
        m.setattr(runner, "evaluate_row", fail)
        again = runner.run([], cfg, out, base=str(base_dir))
    assert again["results"] == first["results"] and again["table"] == first["table"]
    calls = []
    real = runner.evaluate_row
    monkeypatch.setattr(runner, "evaluate_row", lambda *a, **k: calls.append(a[0].label) or real(*a, **k))
    runner.run(
        [],
        runner.EvalConfig(tasks=["piqa"], limit=1, data_dir=str(tmp_path), device="cpu"),
        out,
        base=str(base_dir),
    )
    assert calls == ["tiny-base (AR)"]


def _evaluate_row_calls(monkeypatch) -> list[str]:
    """The labels of the rows runner.run evaluates (not reused from its JSON), in order."""
    from a3lm.evaluation import runner

    calls: list[str] = []
    real = runner.evaluate_row
    monkeypatch.setattr(runner, "evaluate_row", lambda *a, **k: calls.append(a[0].label) or real(*a, **k))
    return calls


def test_rerun_evaluates_a_changed_model_again(tokenizer, tmp_path, monkeypatch):
    """A row is reused only while the model's files are those it was evaluated with: new weights at the
    same path are evaluated again (with a warning) and give a fresh run's numbers."""
    from a3lm.evaluation import runner

    write_likelihood_fixtures(tmp_path)
    model_dir, out = tmp_path / "run" / "final", tmp_path / "results.json"
    cfg = runner.EvalConfig(tasks=["piqa", "hellaswag"], data_dir=str(tmp_path), device="cpu")
    tiny_a3_model("llama", seed=0, vocab_size=len(WORDS) + 4).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    calls = _evaluate_row_calls(monkeypatch)
    first = runner.run([str(model_dir)], cfg, out)
    assert runner.run([str(model_dir)], cfg, out)["results"] == first["results"] and calls == [
        "run [left-to-right]"
    ]

    changed = tiny_a3_model("llama", seed=5, vocab_size=len(WORDS) + 4)
    with torch.no_grad():
        changed.lm_head.weight.mul_(40)
    changed.save_pretrained(model_dir)
    with pytest.warns(UserWarning, match=r"run \[left-to-right\]: the model files at .* changed since"):
        rerun = runner.run([str(model_dir)], cfg, out)
    assert calls == ["run [left-to-right]"] * 2
    fresh = runner.run([str(model_dir)], cfg, tmp_path / "fresh.json")
    assert rerun["results"] == fresh["results"] != first["results"]
    saved = json.loads(out.read_text())["rows"][0]["fingerprint"]
    assert saved == model_fingerprint(str(model_dir)) and set(saved) == {"config.json", "model.safetensors"}


def test_missing_stories_or_judge_fail_before_any_task(model, tokenizer, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from a3lm.cli import app
    from a3lm.evaluation import runner

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_likelihood_fixtures(tmp_path / "data")
    calls = _evaluate_row_calls(monkeypatch)
    out = tmp_path / "r.json"
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--data-dir",
        str(tmp_path / "data"),
        "--output",
        str(out),
        "--device",
        "cpu",
    ]
    for extra, message in (
        (
            ["--tasks", "piqa,rocstories"],
            "missing ROCStories data: put the Story Cloze validation CSV at "
            f"{tmp_path / 'data' / 'rocstories' / CLOZE_FILE}",
        ),
        (
            ["--tasks", "piqa,genppl", "--judge", str(tmp_path / "no-judge")],
            f"error: genppl judge (--judge): no model file or folder at {tmp_path / 'no-judge'}",
        ),
        (["--tasks", "piqa,genppl", "--judge", "./no-judge"], "no model file or folder at ./no-judge"),
    ):
        result = CliRunner().invoke(app, args + extra)
        assert result.exit_code == 2 and message in result.output, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        app, args[:3] + ["--data-dir", str(empty), "--tasks", "piqa,hellaswag,rocstories"]
    )
    assert result.exit_code == 2, result.output
    for named in (
        empty / "piqa" / "validation.jsonl",
        empty / "hellaswag" / "validation.jsonl",
        "missing ROCStories data",
    ):
        assert str(named) in result.output  # every missing file at once
    assert calls == [] and not out.exists()
    runner.EvalConfig(
        tasks=["genppl"], judge="HuggingFaceTB/SmolLM2-135M"
    ).validate()  # a Hub id: checked at load time


@pytest.mark.parametrize(
    "task, doc, problem",
    [
        (
            "winogrande",
            {"sentence": "the _ sat", "option1": "cat", "option2": "dog", "answer": 1},
            'has answer 1: winogrande expects "1" or "2" (a string)',
        ),
        (
            "winogrande",
            {"sentence": "the cat sat", "option1": "cat", "option2": "dog", "answer": "1"},
            "has no _ in its sentence",
        ),
        (
            "siqa",
            {"context": "a", "question": "b", "answerA": "x", "answerB": "y", "answerC": "z", "label": "B"},
            'has label "B": siqa expects "1", "2" or "3" (or an int)',
        ),
        (
            "hellaswag",
            {
                "ctx_a": "a",
                "ctx_b": "b",
                "ctx": "a b",
                "activity_label": "c",
                "endings": ["w", "x", "y", "z"],
                "label": 4,
            },
            "has label 4: hellaswag expects 0..3 (an int or a digit string)",
        ),
        (
            "piqa",
            {"goal": "a", "sol1": "b", "sol2": "c", "label": "1"},
            'has label "1": piqa expects 0 or 1 (an int)',
        ),
        (
            "piqa",
            {"goal": "a", "sol1": "b", "sol2": "c", "label": True},
            "has label true: piqa expects 0 or 1",
        ),
        ("triviaqa", {"question": "who", "answer": "paris"}, "has no answer.aliases list"),
    ],
)
def test_bad_label_values_name_the_file_and_line(tmp_path, task, doc, problem):
    from a3lm.evaluation.tasks import HARNESS_TASKS, check_local_file

    path = tmp_path / task / "validation.jsonl"
    path.parent.mkdir()
    path.write_text("\n" + json.dumps(doc) + "\n")  # the document on line 2
    with pytest.raises(
        ValueError, match=f"^benchmark file {re.escape(str(path))}: line 2 {re.escape(problem)}"
    ):
        check_local_file(HARNESS_TASKS[task], path)


@pytest.mark.parametrize(
    "task, field, values",
    [
        ("hellaswag", "label", [0, 3, "2"]),
        ("piqa", "label", [0, 1]),
        ("winogrande", "answer", ["1", "2"]),
        ("siqa", "label", [1, "3"]),
    ],
)
def test_label_values_the_harness_reads_pass(tmp_path, task, field, values):
    from a3lm.evaluation.tasks import HARNESS_TASKS, check_local_file

    base = {f: "the _ x" for f in HARNESS_TASKS[task].required} | {"endings": ["w", "x", "y", "z"]}
    write_jsonl(tmp_path / "v.jsonl", [base | {field: v} for v in values])
    check_local_file(HARNESS_TASKS[task], tmp_path / "v.jsonl")


@pytest.mark.parametrize(
    "decoding",
    [dict(order="random"), dict(order="random-blocks", group_size=2), dict(order="random", speculative=2)],
)
def test_random_order_generation_is_batch_independent(tokenizer, decoding):
    """Greedy TriviaQA answers and ROCStories fills in a random order: each request's order comes from
    its own tokens, so the batch size changes nothing."""
    from a3lm.decoding.config import DecodingConfig
    from a3lm.evaluation.rocstories import Story, evaluate_rocstories

    sharp = tiny_a3_model("llama", vocab_size=len(WORDS) + 4)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(30)  # argmax ties far from float noise
    config = DecodingConfig(temperature=0.0, **decoding)
    prompts = [
        "Question: who is paris?\nAnswer:",
        "a",
        "the big red dog went home . the cat sat on",
        "the dog",
    ]
    reqs = [
        Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 5}), i)
        for i, p in enumerate(prompts)
    ]
    answers = [
        A3LM(sharp, tokenizer=tokenizer, batch_size=n, decoding=config).generate_until(
            reqs, disable_tqdm=True
        )
        for n in (1, 4)
    ]
    assert answers[0] == answers[1] and len(set(answers[0])) > 1
    S = ["the cat sat .", "a big dog ran home .", "the mat is red .", "who is paris ?", "the end ."]
    stories = [Story(str(i), tuple(S[(i + k) % 5] for k in range(5))) for i in range(4)]
    fills = [
        [
            r["prediction"]
            for r in evaluate_rocstories(sharp, tokenizer, stories, config, batch_size=n, progress=False)[1]
        ]
        for n in (1, 3)
    ]
    assert fills[0] == fills[1]
