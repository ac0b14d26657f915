"""The ground-truth demo: does the curriculum learn any-order conditionals? Checked against the truth.

    run_demo(DemoConfig(output="runs/demo")) -> DemoResult      (`a3lm demo`)

On the seeded HMM corpus (`synthetic.default_hmm`) every conditional p(x_G | x_{G<k}) is computable
exactly (`exact.py`), so a trained model's NLL per token under any factorization can be put next to
the floor it should reach. The demo, from nothing and offline:

1. corpus + word tokenizer; a held-out set of documents [BOS w_1..w_L EOS] drawn from its own seed;
2. stage 0: a tiny Llama pretrained as a plain AR model           -> <output>/ar
   then, from that checkpoint and with the same step budget:
   the curriculum, stages 1 -> 2 -> 3                            -> <output>/curriculum
   the ablation, stage 3 only (the paper's "no curriculum" row)   -> <output>/ablation
   each run evaluated on the held-out set at a few steps (NLL per word for every factorization);
3. table (markdown + JSON) and a plot of NLL per word vs step for every factorization;
4. generations of every decoding mode, each with its exact log-probability under the source.

Scores are per *word* (BOS is context, EOS is certain under the source and is left out); every
factorization scores the same words with the same group ids for the model and the truth. The run
folders keep the trainer's checkpoints and the demo's evaluations, so rerunning the same command
after an interruption resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from a3lm.data import synthetic
from a3lm.demo import exact
from a3lm.demo.config import EVALS_FILE, RUNS, DemoConfig, run_config, run_dir
from a3lm.demo.generate import Generation, generate_all, oracle_stats
from a3lm.demo.report import summarize, write_report
from a3lm.demo.truth import (
    HeldOut,
    _eval_steps,
    _load_evals,
    build_table,
    held_out_set,
    model_token_logprobs,
    verdict,
)
from a3lm.evaluation.nll import a3_nlls, ar_nll
from a3lm.files import CHECKPOINTS_DIR, FINAL_DIR, append_jsonl, write_json_atomic
from a3lm.model.modeling import A3ForCausalLM
from a3lm.quiet import quiet_transformers
from a3lm.tokenizer import word_tokenizer
from a3lm.training import checkpoint as ckpt
from a3lm.training.callbacks import Callback
from a3lm.training.config import (
    TrainConfig,
)
from a3lm.training.curriculum import describe, policy_at
from a3lm.training.run import train
from a3lm.training.trainer import Trainer

# -- the demo ----------------------------------------------------------------------------------------


@dataclass
class DemoResult:
    output: Path
    table: list[dict]
    markdown: str
    wall_time_s: float
    files: dict[str, str] = field(default_factory=dict)


def _free(cfg: DemoConfig) -> dict[str, Any]:
    """Fields that may change when resuming: they do not change what is computed."""
    return {"output": cfg.output, "progress": cfg.progress, "threads": cfg.threads}


def _done_steps(run_dir: Path) -> int:
    latest = ckpt.latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    return 0 if latest is None else ckpt.step_of(latest)


def _open_output(cfg: DemoConfig) -> Path:
    """cfg.output, refused if it holds a demo of another configuration; the configuration recorded."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file: the demo writes a folder of runs and results")
    out.mkdir(parents=True, exist_ok=True)
    demo_json = out / "demo_config.json"
    if demo_json.exists():
        try:
            saved = json.loads(demo_json.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{demo_json} is not JSON ({e}): delete it or choose another --output") from e
        if not isinstance(saved, dict) or saved | _free(cfg) != asdict(cfg):
            raise ValueError(
                f"{out} holds a demo with a different configuration ({demo_json}); choose another --output"
            )
    write_json_atomic(demo_json, asdict(cfg))
    return out


def _train_all(
    cfg: DemoConfig, configs: dict[tuple[int, str], TrainConfig], held: HeldOut, bar: Any
) -> tuple[dict, dict]:
    """Every run in order (each seed: AR, then the curriculum and the ablation from it);
    returns ({seed: {run: curve}}, {seed: {run: wall seconds}})."""
    curves: dict[int, dict[str, dict[int, dict[str, float]]]] = {s: {} for s in cfg.seed_list}
    train_wall: dict[int, dict[str, float]] = {s: {} for s in cfg.seed_list}
    for (s, run), tcfg in configs.items():
        t0 = time.perf_counter()
        curves[s][run] = _train_run(
            run, tcfg, cfg, held, bar, seed_note=f"seed {s}: " if cfg.seeds > 1 else ""
        )
        train_wall[s][run] = time.perf_counter() - t0
    return curves, train_wall


def _final_model(cfg: DemoConfig, seed: int, run: str) -> A3ForCausalLM:
    return A3ForCausalLM.from_pretrained(run_dir(cfg, seed, run) / FINAL_DIR)


def _generations(
    cfg: DemoConfig, hmm: synthetic.HMM, tokenizer: Any, held: HeldOut, bar: Any
) -> tuple[dict[str, Any], list[Generation]]:
    """Every decoding mode's statistics from the first seed's models and the oracle; the curriculum's
    examples."""
    gens: dict[str, Any] = {}
    shown: list[Generation] = []
    for run in ("curriculum", "ablation"):
        model = _final_model(cfg, cfg.seed, run).eval()
        stats, examples = generate_all(
            model, hmm, tokenizer, held.ids, cfg, on_mode=lambda m, r=run: bar.set_description(f"{r}: {m}")
        )
        gens[run] = stats
        if run == "curriculum":
            shown = examples
    bar.set_description("oracle decoding")
    gens["oracle"] = oracle_stats(hmm, held.words, cfg)
    return gens, shown


def run_steps(cfg: DemoConfig) -> dict[str, Any]:
    """The step counts the runs train (scaled): stage 0, each curriculum stage, the ablation."""
    cur = run_config(cfg, "curriculum", cfg.seed).curriculum
    return {
        "ar": run_config(cfg, "ar", cfg.seed).curriculum.total_steps,
        "curriculum": [e - b for _, b, e in cur.spans()],
        "ablation": run_config(cfg, "ablation", cfg.seed).curriculum.total_steps,
    }


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run (or resume) the whole demo; writes results.md, results.json and nll_vs_step.png in cfg.output."""
    from tqdm.auto import tqdm

    cfg.validate()
    t_start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = _open_output(cfg)
    # 1. the source, its tokenizer and the held-out set
    hmm = synthetic.default_hmm(cfg.hmm_seed)
    tokenizer = word_tokenizer(hmm.words, model_max_length=cfg.train.model.max_position_embeddings)
    held = held_out_set(cfg, hmm, tokenizer)
    # 2. training runs, one progress bar over all of them
    configs = {(s, r): run_config(cfg, r, s) for s in cfg.seed_list for r in RUNS}
    totals = {k: c.curriculum.total_steps for k, c in configs.items()}
    done = sum(min(_done_steps(Path(c.output)), totals[k]) for k, c in configs.items())
    bar = tqdm(
        total=sum(totals.values()), initial=done, unit="step", dynamic_ncols=True, disable=not cfg.progress
    )
    with quiet_transformers(reports=False), bar:
        curves, train_wall = _train_all(cfg, configs, held, bar)
        # 3. the table: every seed's final models on every factorization, per document
        bar.set_description("final evaluation")
        lps = {
            (s, r): model_token_logprobs(_final_model(cfg, s, r), held.ids, held.facts)
            for s in cfg.seed_list
            for r in ("curriculum", "ablation")
        }
        table = build_table(
            cfg, held, lps, [curves[s]["ar"][totals[(s, "ar")]]["left-to-right"] for s in cfg.seed_list]
        )
        # 4. generations of every decoding mode from the first seed's models, and with the oracle
        gens, shown = _generations(cfg, hmm, tokenizer, held, bar)
    result_json = {
        "config": asdict(cfg),
        "steps": run_steps(cfg),
        "source": {
            "states": len(hmm.states),
            "words": len(hmm.words),
            "length": cfg.length,
            "heldout_docs": cfg.eval_docs,
            "entropy_per_word": float(-exact.joint_logprob(hmm, held.words).mean()) / cfg.length,
        },
        "table": table,
        "verdict": verdict(cfg, held, lps),
        "curves": {
            str(s): {r: {str(k): v for k, v in sorted(c.items())} for r, c in runs.items()}
            for s, runs in curves.items()
        },
        "stage_boundaries": {
            "curriculum": [e for _, _, e in configs[(cfg.seed, "curriculum")].curriculum.spans()][:-1]
        },
        "generation_stats": gens,
        "generations": [asdict(g) for g in shown],
        "wall_time_s": time.perf_counter() - t_start,
        "train_wall_s": {str(s): w for s, w in train_wall.items()},
        "resumed_from_steps": done,  # > 0: wall_time_s covers only this invocation
        "summary": summarize(table, cfg.too_short),
    }
    md, files = write_report(out, result_json)
    return DemoResult(
        output=out,
        table=result_json["table"],
        markdown=md,
        wall_time_s=result_json["wall_time_s"],
        files=files,
    )


class Evaluations(Callback):
    """The held-out NLL per word of one run at a few steps, appended to <run>/demo_evals.jsonl: a
    resumed run keeps the evaluations it has and makes only those still due."""

    def __init__(
        self, run: str, tcfg: TrainConfig, cfg: DemoConfig, held: HeldOut, on_start: Callable[[], None]
    ):
        self.run, self.held, self.length, self.on_start = run, held, cfg.length, on_start
        self.want = _eval_steps(tcfg.curriculum.total_steps, cfg.eval_points)
        self.path = Path(tcfg.output) / EVALS_FILE
        self.evals = _load_evals(self.path)

    def evaluate(self, model: nn.Module, step: int) -> None:
        if step not in self.want or step in self.evals:
            return
        self.on_start()
        if self.run == "ar":
            nll = {"left-to-right": ar_nll(model, self.held.ids, self.length)}
        else:
            nll = a3_nlls(model, self.held.ids, self.held.facts)
        self.evals[step] = nll
        append_jsonl(self.path, {"step": step, "nll": nll})

    def on_fit_start(self, trainer: Trainer) -> None:
        self.evaluate(trainer.model, trainer.step)  # step 0, or a resumed step that is due

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.evaluate(trainer.model, trainer.step)

    def curve(self) -> dict[int, dict[str, float]]:
        """{step: {order: NLL per word}} at the wanted steps."""
        return {k: v for k, v in sorted(self.evals.items()) if k in self.want}


class SharedBar(Callback):
    """One progress bar over every run of the demo: the run's label, its stage and loss."""

    def __init__(self, bar: Any, label: str):
        self.bar, self.label = bar, label

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_description(
            f"{self.label}: {describe(policy_at(trainer.cfg.curriculum, trainer.step - 1))}"
        )
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}")


RUN_LABELS = {"ar": "pretraining", "curriculum": "curriculum", "ablation": "ablation (stage 3 only)"}


def _train_run(
    run: str, tcfg: TrainConfig, cfg: DemoConfig, held: HeldOut, bar: Any, seed_note: str = ""
) -> dict[int, dict[str, float]]:
    """Train (or resume) one run, evaluating at a few steps; returns {step: {order: NLL per word}}."""
    label = seed_note + RUN_LABELS[run]
    evals = Evaluations(run, tcfg, cfg, held, on_start=lambda: bar.set_description(f"{label}: evaluating"))
    bar.set_description(f"{label}: starting")
    final = train(tcfg, callbacks=[SharedBar(bar, label), evals])  # train()'s clean-up on failure included
    if (
        tcfg.curriculum.total_steps not in evals.evals
    ):  # finished before this process (killed before its evaluation)
        evals.evaluate(A3ForCausalLM.from_pretrained(final).eval(), tcfg.curriculum.total_steps)
    return evals.curve()
