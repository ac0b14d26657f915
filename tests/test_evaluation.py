"""Evaluation: the lm-eval adapter against the core likelihood, harness runs on local fixture data with
hand-counted accuracies, ROUGE / exact match / generative perplexity against hand-computed values."""

import csv
import json
import math

import pytest
import torch
from lm_eval.api.instance import Instance

from a3lm import groups, sequence_logprobs
from a3lm.debug import tiny_a3_model, tiny_base_model
from a3lm.evaluation import A3LM
from a3lm.evaluation.genppl import judge_perplexity, unigram_entropy
from a3lm.evaluation.likelihood import request_generator
from a3lm.evaluation.lm_eval_adapter import cut_at_stop
from a3lm.evaluation.rocstories import CLOZE_FILE, find_stories_file, infill_batch, read_stories, rouge
from a3lm.evaluation.tasks import MissingDataError, run_harness_tasks
from a3lm.evaluation.triviaqa import exact_match
from a3lm.tokenizer import word_tokenizer

WORDS = [
    "the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "red", "good", "bad", "went", "home", "end",
    "question", "answer", "q", ":", "?", ".", ",", "who", "is", "paris", "france", "city", "one", "two",
    "three", "yes", "no",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model():
    return tiny_a3_model("llama", vocab_size=len(WORDS) + 4)


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return A3LM(model, tokenizer=tokenizer, batch_size=3)


def reference_logprob(model, tokenizer, context: str, continuation: str, order: str = "left-to-right", size: int = 1):
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
        group_ids = groups.infill(known, mask, size, order="random", generator=gen)
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


@pytest.mark.parametrize(("order", "size"), [("left-to-right", 1), ("left-to-right", 2), ("right-to-left", 1), ("random", 2)])
def test_adapter_loglikelihood_equals_sequence_logprobs(model, tokenizer, order, size):
    lm = A3LM(model, tokenizer=tokenizer, batch_size=3, order=order, group_size=size, seed=1234)
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True)
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
    [(_, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, ("the cat", continuation), 0)], disable_tqdm=True)
    assert tokenizer.encode(continuation, add_special_tokens=False) == ids[3:]
    assert greedy
    # generate_until's greedy left-to-right decoding (sampler + cache) follows the same argmax chain
    assert lm.generate(["the cat"], until=[], max_gen_toks=3) == [tokenizer.decode(ids[3:])]


def test_cut_at_stop_and_dynamic_generation(model, tokenizer):
    assert cut_at_stop("paris. france", [".", "\n"]) == "paris"
    assert cut_at_stop("a, b. c", [".", ","]) == "a"
    assert cut_at_stop("no stop", ["", "."]) == "no stop"
    lm = A3LM(model, tokenizer=tokenizer, gen_mode="dynamic", criterion="entropy", per_step=2, batch_size=2)
    reqs = [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 4}), i) for i, c in enumerate(["the cat", "a", "who is"])]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert len(out) == 3 and all(isinstance(t, str) and "." not in t for t in out)


def test_loglikelihood_rolling_windows(model, tokenizer):
    text = "the cat sat on mat"  # t0..t4
    t = tokenizer.encode(text, add_special_tokens=False)
    full = A3LM(model, tokenizer=tokenizer)
    [whole] = full.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    assert whole == pytest.approx(reference_logprob(model, tokenizer, "", text)[0], abs=1e-4)
    # max_length 4: windows [BOS] -> t0 t1, [BOS t1] -> t2 t3, [BOS t2 t3] -> t4 (every window fits 4 positions)
    short = A3LM(model, tokenizer=tokenizer, max_length=4)
    [windowed] = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
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
    results = run_harness_tasks(A3LM(model, tokenizer=tokenizer), ["piqa"], data_dir=tmp_path)
    assert results["piqa"]["acc"] == pytest.approx(4 / 6)
    assert results["piqa"]["acc_norm"] == pytest.approx(4 / 6)


def test_simple_evaluate_siqa_matches_model_likelihoods(model, tokenizer, lm, tmp_path):
    """Expected answers from the core likelihood of each choice; labels agree with them in 2 of 4 docs."""
    docs = [
        {"context": "the cat sat", "question": "who is ?", "answerA": "the dog", "answerB": "a big red cat", "answerC": "home"},
        {"context": "a dog ran", "question": "who ran ?", "answerA": "yes", "answerB": "no", "answerC": "the end"},
        {"context": "paris is", "question": "a city ?", "answerA": "france", "answerB": "one two three", "answerC": "good"},
        {"context": "the end", "question": "is it ?", "answerA": "bad", "answerB": "yes", "answerC": "two"},
    ]
    for i, doc in enumerate(docs):
        context = f"Q: {doc['context']} {doc['question']}\nA:"  # the harness's siqa prompt
        lls = [reference_logprob(model, tokenizer, context, " " + doc[k])[0] for k in ("answerA", "answerB", "answerC")]
        best = max(range(3), key=lambda k: lls[k])
        doc["label"] = str(best + 1 if i < 2 else (best + 1) % 3 + 1)  # right, right, wrong, wrong
    write_jsonl(tmp_path / "siqa" / "validation.jsonl", docs)
    results = run_harness_tasks(lm, ["siqa"], data_dir=tmp_path)
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
    preds = [lm.generate([f"Question: {q}?\nAnswer:"], until=["\n", ".", ","], max_gen_toks=3)[0] for q in questions]
    docs = []
    for i, (q, pred) in enumerate(zip(questions, preds, strict=True)):
        aliases = [pred.strip().upper() + "!", "zzz"] if i < 3 else ["zzz"]
        docs.append({"question": q, "answer": {"aliases": aliases, "value": aliases[0]}})
    write_jsonl(tmp_path / "triviaqa" / "validation.jsonl", docs)
    short = A3LM(lm.model, tokenizer=lm.tokenizer, max_gen_toks=3)
    results = run_harness_tasks(short, ["triviaqa"], data_dir=tmp_path)
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


def test_read_both_story_layouts_and_infill_inputs(model, tokenizer, tmp_path):
    sentences = ["the cat sat .", "a dog ran .", "the dog went home .", "the cat sat on the mat .", "the end ."]
    write_csv(tmp_path / "roc.csv", ["storyid", "storytitle", *(f"sentence{i}" for i in range(1, 6))], [["s1", "t", *sentences]])
    header = ["InputStoryid", *(f"InputSentence{i}" for i in range(1, 5)), "RandomFifthSentenceQuiz1",
              "RandomFifthSentenceQuiz2", "AnswerRightEnding"]  # fmt: skip
    write_csv(tmp_path / "rocstories" / CLOZE_FILE, header, [["c1", *sentences[:4], "bad end .", sentences[4], "2"]])
    roc = read_stories(tmp_path / "roc.csv")
    cloze = read_stories(find_stories_file(tmp_path))
    assert roc[0].sentences == cloze[0].sentences == tuple(sentences)

    input_ids, known, mask = infill_batch(tokenizer, roc, blank_length=None)
    story = tokenizer(" ".join(sentences))["input_ids"]  # BOS + the whole story
    middle = tokenizer.encode(" " + sentences[2], add_special_tokens=False)
    n_prefix = 1 + len(tokenizer.encode(" ".join(sentences[:2]), add_special_tokens=False))
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
        run_harness_tasks(lm, ["piqa", "hellaswag", "winogrande"], data_dir=tmp_path)
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
    loaded = get_model("a3lm").create_from_arg_string(f"pretrained={model_dir},order=right-to-left,group_size=2")
    assert isinstance(loaded, A3LM) and (loaded.order, loaded.group_size) == ("right-to-left", 2)
    assert get_model("dummy").__name__ == "DummyLM"  # registering ours kept the harness's own models

    write_jsonl(data / "piqa" / "validation.jsonl", [{"goal": "the cat", "sol1": "sat", "sol2": "ran", "label": i % 2} for i in range(3)])
    sentences = ["the cat sat .", "a dog ran .", "the dog went home .", "the cat sat on the mat .", "the end ."]
    write_csv(data / "rocstories" / "stories.csv", ["storyid", "storytitle", *(f"sentence{i}" for i in range(1, 6))],
              [["s1", "t", *sentences], ["s2", "t", *sentences[::-1]]])  # fmt: skip
    out = tmp_path / "results.json"
    args = ["eval", "--model", str(model_dir), "--tasks", "piqa,rocstories,genppl", "--output", str(out),
            "--data-dir", str(data), "--judge", str(judge_dir), "--limit", "2", "--genppl-samples", "2",
            "--genppl-length", "6", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "piqa acc" in result.output and "gen-entropy ppl" in result.output
    saved = json.loads(out.read_text())
    tasks = {(r["task"], r["metric"]) for r in saved["results"]}
    assert {("piqa", "acc"), ("rocstories_group", "rougeL"), ("rocstories_dynamic", "rouge1"), ("genppl_random", "gen_ppl")} <= tasks
    assert all(r["model"] == str(model_dir) and "seed" in r["settings"] for r in saved["results"])
    assert saved["versions"]["lm_eval"] != "not installed"

    missing = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--tasks", "hellaswag", "--data-dir", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "hellaswag/validation.jsonl" in missing.output
