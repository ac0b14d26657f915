"""Bad and hostile input (issue: trust and bad input): each one clear line, nothing run, nothing lost."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from a3lm.cli import app
from a3lm.evaluation.rocstories import read_stories
from a3lm.evaluation.runner import EvalConfig, Row, data_fingerprint, finished_rows, run
from a3lm.evaluation.tasks import MissingDataError
from a3lm.files import append_jsonl, atomic_write, read_jsonl


def _error(*args) -> str:
    """The one error line of a failing command (no traceback, no other error line)."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- writes that cannot be redirected --------------------------------------------------------------


def test_atomic_write_does_not_follow_planted_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in (".out.json.tmp", ".out.json.tmp.0", "out.json.tmp"):  # every name an older writer used
        (out / name).symlink_to(victim)
    atomic_write(out / "out.json", "{}\n")
    assert victim.read_text() == "precious" and (out / "out.json").read_text() == "{}\n"
    # the target itself a symlink: replaced by the file, never written through
    (out / "link.json").symlink_to(victim)
    atomic_write(out / "link.json", "new")
    assert victim.read_text() == "precious" and not (out / "link.json").is_symlink()
    left = sorted(p.name for p in out.iterdir() if not p.is_symlink())
    assert left == ["link.json", "out.json"]  # no temporary file left behind
    with pytest.raises(IsADirectoryError, match=r"output .*out is a folder: give a file name"):
        atomic_write(out, "x")


def test_nll_with_a_planted_temp_symlink_leaves_the_victim(model_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".out.json.tmp").symlink_to(victim)
    (tmp_path / "held.txt").write_text("the cat sat on the mat .\n" * 10)
    res = CliRunner().invoke(
        app,
        [
            "nll",
            "--model",
            str(model_dir),
            "--text",
            str(tmp_path / "held.txt"),
            "--seq-len",
            "6",
            "--rows",
            "2",
            "--output",
            str(tmp_path / "out" / "out.json"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert victim.read_text() == "precious"
    assert json.loads((tmp_path / "out" / "out.json").read_text())["results"][0]["kind"] == "A3"


def test_jsonl_logs_drop_a_torn_last_line_and_append_after_it(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "nl')
    assert read_jsonl(path) == [{"step": 1}]
    append_jsonl(path, {"step": 2})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}] and path.read_text().endswith("}\n")


# -- remote code and sizes -------------------------------------------------------------------------


def test_a_folder_with_its_own_code_is_refused(base_dir, tmp_path):
    folder = _copy(base_dir, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    line = _error("convert", folder, tmp_path / "out")
    assert line == (
        f"error: {folder}: this folder asks to run its own code; a3lm does not "
        "(config.json has an auto_map naming Python files)"
    )
    assert "trust_remote_code" not in line
    line = _error("train", "--model", folder, "--output", tmp_path / "run", "-s", "log.progress=false")
    assert "this folder asks to run its own code; a3lm does not" in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_an_a3_config_without_text_config_builds_nothing(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path / "no_text")
    (folder / "config.json").write_text(json.dumps({"model_type": "a3", "architectures": ["A3ForCausalLM"]}))
    line = _error("sample", "--model", folder)
    assert line == (
        f"error: {folder / 'config.json'} is an A3 config without text_config (the decoder's "
        "config, with its model_type): refusing to build a default decoder in its place"
    )
    from a3lm.model.config import A3Config

    with pytest.raises(ValueError, match="the A3 config is an A3 config without text_config"):
        A3Config.from_dict({"model_type": "a3"})


@pytest.mark.parametrize("blank", ["20000000", "99999999999999999999"])
def test_huge_blanks_are_refused_before_anything_is_built(model_dir, blank):
    line = _error("infill", "--model", model_dir, "--text", f"the [BLANK:{blank}] mat")
    assert line == f"error: the blanks need {blank} tokens; the model has 24 positions"


@pytest.mark.parametrize("option", ["--prompt", "--text"])
def test_text_that_is_not_utf8_is_named(model_dir, option):
    command = "sample" if option == "--prompt" else "infill"
    text = "the cat \udcff [BLANK:2]"  # argv bytes that are not UTF-8 arrive as surrogates
    line = _error(command, "--model", model_dir, option, text)
    what = "the prompt" if option == "--prompt" else "the text"
    assert line == f"error: {what} is not valid UTF-8 (byte b'\\xff' at character 8)"


def test_nan_temperature_is_refused(model_dir):
    assert (
        _error("sample", "--model", model_dir, "--temperature", "nan")
        == "error: temperature must be a finite number >= 0 (0 = greedy), got nan"
    )


def test_an_unknown_order_offers_only_what_the_cli_takes(model_dir):
    line = _error("sample", "--model", model_dir, "--order", "zigzag")
    assert line == (
        "error: unknown order 'zigzag'; choose one of left-to-right, right-to-left, random, random-blocks"
    )


def test_a_model_folder_without_its_tokenizer(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path / "no_tok")
    for f in folder.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    assert _error("sample", "--model", folder) == (
        f"error: {folder} holds no tokenizer (tokenizer.json or tokenizer_config.json): save the tokenizer "
        "beside the weights (tokenizer.save_pretrained)"
    )


def test_weights_that_disagree_with_the_config(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    line = _error("sample", "--model", folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    assert line.startswith(f"error: the weights in {weights} do not fit {config}: ")
    assert "by the config" in line


def test_a_truncated_gguf_header(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    line = _error("convert", tmp_path / "bad.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    assert line.startswith(f"error: {bad} is not a readable GGUF file (truncated or damaged: ")
    assert "error: error" not in line


# -- nll and eval: sizes, outputs, results files -----------------------------------------------------


def test_nll_bad_sizes_and_outputs_are_refused_before_work(model_dir, tmp_path):
    assert (
        _error("nll", "--model", model_dir, "--batch-size", "0", "--output", tmp_path / "x.json")
        == "error: --batch-size must be >= 1, got 0"
    )
    assert (
        _error("nll", "--model", model_dir, "--output", tmp_path)
        == f"error: --output {tmp_path} is a folder: give a file name (e.g. {tmp_path / 'results.json'})"
    )
    (tmp_path / "other.json").write_text("[1, 2]")
    assert (
        _error("nll", "--model", model_dir, "--output", tmp_path / "other.json")
        == f"error: {tmp_path / 'other.json'} exists and is not an a3lm nll results file: choose another "
        "--output, or delete it"
    )
    assert (tmp_path / "other.json").read_text() == "[1, 2]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--limit", "-1"], "--limit must be >= 1 (examples per task), got -1"),
    ],
)
def test_eval_bad_sizes_before_loading(model_dir, tmp_path, args, message):
    line = _error("eval", "--model", model_dir, "--tasks", "piqa", "--output", tmp_path / "r.json", *args)
    assert line == f"error: {message}"


def test_eval_output_folder_and_foreign_results_files_are_refused(model_dir, tmp_path):
    assert _error("eval", "--model", model_dir, "--tasks", "piqa", "--output", tmp_path).startswith(
        f"error: --output {tmp_path} is a folder"
    )
    foreign = tmp_path / "r.json"
    for content in ('["a", "list"]', "not json", '{"config": {}}'):
        foreign.write_text(content)
        assert _error("eval", "--model", model_dir, "--tasks", "piqa", "--output", foreign).startswith(
            f"error: {foreign} exists and is not an a3lm eval results file: choose another --output, or "
            "delete it"
        )
        assert foreign.read_text() == content


def test_eval_says_when_a_config_change_discards_rows(tmp_path):
    out = tmp_path / "r.json"
    row = Row("m", "a3", "m")
    out.write_text(
        json.dumps(
            {
                "config": {"batch_size": 16},
                "rows": [{"label": row.label, "path": "m"}],
                "results": [],
                "outputs": {row.label: {}},
            }
        )
    )
    with pytest.warns(
        UserWarning,
        match=r"r.json was written with other settings \(batch_size\): its 1 "
        r"finished row\(s\) are discarded and evaluated again",
    ):
        assert finished_rows(out, {"batch_size": 8}, [row], {"m": {}}) == ([], {})


def test_eval_fingerprints_the_task_data(tmp_path):
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "validation.jsonl").write_text('{"goal": "a"}\n')
    cfg = EvalConfig(tasks=["piqa"], data_dir=str(data))
    before = data_fingerprint(cfg)
    assert list(before) == ["piqa/validation.jsonl"]
    (data / "piqa" / "validation.jsonl").write_text('{"goal": "ab"}\n')
    assert data_fingerprint(cfg) != before  # a changed file: another config, so rows are scored again


STORY_HEADER = (
    "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
    "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("x,a,b,c,d,e,f,3\n", "line 2: AnswerRightEnding must be 1 or 2, got '3'"),
        ("x,a,b,c\n", "line 2: no InputSentence4 (the row has fewer columns than the header)"),
        ("", "holds no stories (a header and no rows)"),
    ],
)
def test_story_cloze_csv_problems_are_named(tmp_path, body, message):
    path = tmp_path / "s.csv"
    path.write_text(STORY_HEADER + body)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} {re.escape(message)}$"):
        read_stories(path)


def test_a_bad_story_csv_stops_eval_before_the_first_task(model_dir, tmp_path):
    cloze = tmp_path / "data" / "rocstories" / "cloze_test_val__spring2016.csv"
    cloze.parent.mkdir(parents=True)
    cloze.write_text(STORY_HEADER + "x,a,b,c,d,e,f,3\n")
    cfg = EvalConfig(tasks=["piqa", "rocstories"], data_dir=str(tmp_path / "data"))
    with pytest.raises(MissingDataError, match="AnswerRightEnding must be 1 or 2, got '3'"):  # with piqa's
        run([str(model_dir)], cfg, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_nll_keeps_every_finished_model_and_resumes(model_dir, base_dir, tmp_path, monkeypatch):
    from a3lm.evaluation import nll

    (tmp_path / "held.txt").write_text("the cat sat on the mat .\n" * 10)
    args = [
        "nll",
        "--base",
        str(base_dir),
        "--model",
        str(model_dir),
        "--text",
        str(tmp_path / "held.txt"),
        "--seq-len",
        "6",
        "--rows",
        "2",
        "--output",
        str(tmp_path / "n.json"),
        "--no-progress",
    ]

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(nll, "a3_nlls", killed)
    assert CliRunner().invoke(app, args).exit_code == 130
    first = json.loads((tmp_path / "n.json").read_text())["results"]
    assert [r["kind"] for r in first] == ["base AR"]  # the base's score survived the kill
    monkeypatch.undo()
    monkeypatch.setattr(nll, "ar_nll", killed)  # the rerun must not score the base again
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    done = json.loads((tmp_path / "n.json").read_text())["results"]
    assert [r["kind"] for r in done] == ["base AR", "A3"] and done[0]["nll"] == first[0]["nll"]


# -- demo ----------------------------------------------------------------------------------------------


def test_demo_output_file_and_zero_threads(tmp_path):
    (tmp_path / "f").write_text("")
    assert (
        _error("demo", "--quick", "--output", tmp_path / "f")
        == f"error: --output {tmp_path / 'f'} is a file: the demo writes a folder of runs and results"
    )
    assert (
        _error("demo", "--quick", "--threads", "0", "--output", tmp_path / "d")
        == "error: --threads must be >= 1 (or left out for torch's default), got 0"
    )


# -- the lm-eval entry point ---------------------------------------------------------------------------


def test_the_lm_eval_entry_point_reports_one_line(tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1"}
    missing = tmp_path / "MISSING"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "a3lm.evaluation",
            "--model",
            "a3lm",
            "--model_args",
            f"pretrained={missing}",
            "--tasks",
            "piqa",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 2 or res.returncode == 1
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: no model folder at {missing}: expected a save_pretrained directory (or a Hub id org/name)"
    )
