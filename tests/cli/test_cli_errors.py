"""Every bad input to the `a3lm` command is one line naming the problem (with --debug: the traceback)."""

import importlib
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from a3lm.cli import A3Typer, app

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def truncated_dir(model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("truncated")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _error(res) -> str:
    """The error line; asserts that it is the only trace of the failure (no traceback)."""
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


TINY_TRAIN = (
    "-s",
    "curriculum.stages=3",
    "-s",
    "curriculum.stage3_steps=1",
    "-s",
    "data.seq_len=8",
    "-s",
    "data.micro_batch_size=2",
    "-s",
    "log.progress=false",
)


# -- train -----------------------------------------------------------------------------------------


def test_train_on_a_missing_model_folder(tmp_path):
    res = _run("train", "--model", tmp_path / "no-such-model", "--output", tmp_path / "run")
    assert res.exit_code == 2
    assert (
        _error(res) == f"error: no model folder at {tmp_path / 'no-such-model'}: "
        "expected a save_pretrained directory (or a Hub id org/name)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("sample", "--prompt", "the", "--length", "4"),
        ("eval", "--tasks", "piqa"),
        ("nll", "--text", "fortunes:heldout"),
    ],
)
def test_model_commands_on_a_missing_or_empty_folder(command, tmp_path):
    missing, empty = tmp_path / "no-such-model", tmp_path / "empty"
    empty.mkdir()
    res = _run(command[0], "--model", missing, *command[1:])
    assert res.exit_code == 2
    assert (
        _error(res)
        == f"error: no model folder at {missing}: expected a save_pretrained directory (or a Hub id org/name)"
    )
    res = _run(command[0], "--model", empty, *command[1:])
    assert _error(res) == f"error: {empty} holds no config.json: not a Hugging Face model folder"


@pytest.mark.parametrize(
    "command", [("sample", "--prompt", "the", "--length", "4"), ("nll", "--text", "fortunes:heldout")]
)
def test_a_typo_under_a_local_folder_or_a_run_folder_is_named(command, tmp_path, monkeypatch):
    # "runs/typo" reads like a Hub id (org/name), but runs/ is here: no network request, one line
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a3" / "checkpoints").mkdir(parents=True)
    res = _run(command[0], "--model", "runs/typo", *command[1:])
    assert res.exit_code == 2
    assert (
        _error(res)
        == "error: no model folder at runs/typo: expected a save_pretrained directory (or a Hub id org/name)"
    )
    res = _run(command[0], "--model", "runs/a3", *command[1:])
    assert _error(res) == f"error: runs/a3 is a training run folder: its model is {Path('runs/a3/final')}"


def test_scale_without_a_cpu_preset_is_refused(tmp_path):
    res = _run("train", "--output", tmp_path / "run", "--scale", "0.5", "--show-config")
    assert res.exit_code == 2 and "--scale multiplies the cpu presets' steps, not 'tiny'" in _error(res)


def test_train_and_eval_on_a_truncated_safetensors_file(truncated_dir, tmp_path):
    res = _run("train", "--model", truncated_dir, "--output", tmp_path / "run", *TINY_TRAIN)
    assert res.exit_code == 2 and _error(res).startswith(f"error: corrupt checkpoint in {truncated_dir}: ")
    assert not (tmp_path / "run").exists()
    data = tmp_path / "data" / "piqa"
    data.mkdir(parents=True)
    (data / "validation.jsonl").write_text(
        json.dumps({"goal": "a", "sol1": "b", "sol2": "c", "label": 0}) + "\n"
    )
    res = _run(
        "eval",
        "--model",
        truncated_dir,
        "--tasks",
        "piqa",
        "--data-dir",
        tmp_path / "data",
        "--output",
        tmp_path / "r.json",
    )
    assert res.exit_code == 2 and _error(res).startswith(f"error: corrupt checkpoint in {truncated_dir}: ")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "data file {f} is empty"),
        (
            '{"text": "the cat"}\nnot json\n',
            "data file {f}: line 2 is not JSON (Expecting value): 'not json'",
        ),
        (
            '{"body": "the cat"}\n',
            "data '{f}' has no text field 'text'; its columns are ['body'] (set data.text_field)",
        ),
    ],
)
def test_train_on_bad_data_leaves_nothing_and_the_fixed_rerun_works(model_dir, tmp_path, content, message):
    data = tmp_path / "docs.jsonl"
    data.write_text(content)
    run = tmp_path / "run"
    args = ("train", "--model", model_dir, "--data", data, "--output", run, *TINY_TRAIN)
    res = _run(*args)
    assert res.exit_code == 2 and _error(res) == "error: " + message.format(f=data)
    assert not run.exists()  # no config.json left behind: the corrected command starts cleanly
    if content:
        return
    data.write_text("".join(json.dumps({"text": "the cat sat on the mat ."}) + "\n" for _ in range(4)))
    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert (run / "final" / "model.safetensors").is_file()


def test_a_failure_after_the_start_but_before_a_checkpoint_leaves_nothing(model_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "the cat sat"}) + "\n" + "{broken\n")
    run = tmp_path / "run"
    res = _run(
        "train",
        "--model",
        model_dir,
        "--data",
        data,
        "--output",
        run,
        *TINY_TRAIN[:-2],
        "-s",
        "data.micro_batch_size=8",
        "-s",
        "log.progress=false",
    )
    assert res.exit_code == 2
    assert _error(res).startswith(f"error: data file {data}: line 2 is not JSON (")
    assert not run.exists()


# -- eval ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, problem",
    [
        ("", " is empty"),
        (
            '{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "a",\n',
            ": line 2 is not JSON (Expecting",
        ),
        (
            '{"goal": "a", "sol1": "b", "label": 0}\n',
            ": line 1 lacks field(s) sol2 (piqa reads goal, sol1, sol2, label)",
        ),
    ],
)
def test_eval_on_a_bad_validation_file(model_dir, tmp_path, content, problem):
    path = tmp_path / "data" / "piqa" / "validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    res = _run(
        "eval",
        "--model",
        model_dir,
        "--tasks",
        "piqa",
        "--data-dir",
        tmp_path / "data",
        "--output",
        tmp_path / "r.json",
    )
    assert res.exit_code == 2
    assert _error(res).startswith(f"error: benchmark file {path}{problem}")
    assert not (tmp_path / "r.json").exists()


def test_eval_without_tasks(model_dir):
    res = _run("eval", "--model", model_dir, "--tasks", "")
    assert res.exit_code == 2 and _error(res).startswith(
        "error: no tasks given: --tasks takes a comma-separated list of hellaswag"
    )


def test_lm_eval_adapter_falls_back_to_the_cpu(model_dir):
    from a3lm.evaluation.lm_eval_adapter import A3LM

    if torch.cuda.is_available():
        pytest.skip("the fallback is for machines without CUDA; this one has it")
    with pytest.warns(UserWarning, match="asked for, but this machine has no CUDA: running on the CPU"):
        lm = A3LM(pretrained=str(model_dir), device="cuda")
    assert lm.device.type == "cpu"


def test_lm_eval_entry_point_names_the_adapter():
    from a3lm.evaluation.lm_eval_adapter import A3LM

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["lm_eval.models"]["a3lm"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is A3LM


# -- sample / infill -------------------------------------------------------------------------------


def test_sample_without_length_fits_the_model(model_dir):
    res = _run("sample", "--model", model_dir, "--prompt", "the cat", "--temperature", "0", "--show-order")
    assert res.exit_code == 0, res.output
    # 24 positions: BOS + 2 prompt tokens + 21 generated (the picture shows every position)
    first = next(ln for ln in res.stdout.splitlines() if ln.split(":")[0].split() == ["step", "0"])
    assert first.split(":", 1)[1].split().count("_") == 21


def test_sample_reports_a_bad_option_before_the_length(model_dir):
    res = _run("sample", "--model", model_dir, "--order", "zigzag", "--length", "500")
    assert res.exit_code == 2 and _error(res).startswith("error: unknown order 'zigzag'")


def test_words_outside_the_vocabulary_are_named(model_dir):
    res = _run("sample", "--model", model_dir, "--prompt", "The cat Sat", "--length", "2")
    assert res.exit_code == 0, res.output
    assert "warning: not in the model's vocabulary, read as <unk>: 'The', 'Sat'" in res.output
    res = _run("infill", "--model", model_dir, "--text", "the Cat [BLANK:2] on the mat")
    assert "warning: not in the model's vocabulary, read as <unk>: 'Cat'" in res.output


# -- the mechanism -------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    res = _run("train", "--model", tmp_path / "nothing", "--debug")
    assert res.exit_code != 0 and isinstance(res.exception, FileNotFoundError)


def test_every_command_of_an_a3_app_gets_one_line_errors():
    """A command added later (convert, nll, ...) needs nothing of its own."""
    demo = A3Typer()

    @demo.command()
    def broken(n: int = 1) -> None:
        raise RuntimeError(f"boom {n}")

    @demo.command()
    def other() -> None:
        raise KeyError("no such key 'x'")

    runner = CliRunner()
    res = runner.invoke(demo, ["broken", "--n", "3"])
    assert res.exit_code == 1
    assert _error(res) == "error: RuntimeError: boom 3 (rerun with --debug for the traceback)"
    res = runner.invoke(demo, ["other"])
    assert res.exit_code == 2 and _error(res) == "error: no such key 'x'"
    res = runner.invoke(demo, ["broken", "--debug"])
    assert isinstance(res.exception, RuntimeError)
    assert "--debug" in runner.invoke(demo, ["broken", "--help"]).output


def test_lm_eval_command_reads_local_data(tmp_path):
    import yaml

    from a3lm.evaluation.__main__ import local_data_args

    path = tmp_path / "data" / "piqa" / "validation.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"goal": "a", "sol1": "b", "sol2": "c", "label": 0}) + "\n")
    argv = ["--model", "a3lm", "--data_dir", str(tmp_path / "data"), "--tasks", "piqa"]
    out = local_data_args(argv, str(tmp_path / "yamls"))
    assert out == ["--model", "a3lm", "--tasks", "piqa", "--include_path", str(tmp_path / "yamls")]
    config = yaml.safe_load((tmp_path / "yamls" / "piqa.yaml").read_text())
    assert config["task"] == "piqa" and config["dataset_kwargs"]["data_files"]["validation"] == str(path)
    path.write_text("")
    with pytest.raises(ValueError, match=f"benchmark file {path} is empty"):
        local_data_args(argv, str(tmp_path / "yamls"))
