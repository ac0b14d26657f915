"""`a3lm eval`: every benchmark of the paper for one or more models, a table and a results JSON."""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .lm_eval_adapter import A3LM
from .tasks import HARNESS_TASKS, MissingDataError, run_harness_tasks

ALL_TASKS = ("hellaswag", "piqa", "winogrande", "siqa", "triviaqa", "rocstories", "genppl")
VERSIONED = ("a3lm", "torch", "transformers", "lm_eval", "rouge_score", "datasets", "tokenizers")


@dataclass
class EvalConfig:
    """Settings shared by every model of one `a3lm eval` run (all recorded in the JSON)."""

    tasks: list[str]
    order: str = "left-to-right"
    group_size: int = 1
    batch_size: int = 16
    limit: int | None = None
    num_fewshot: int | None = None
    data_dir: str | None = None
    device: str | None = None
    seed: int = 1234
    # TriviaQA: greedy generation of at most this many tokens, left-to-right groups of gen_group_size
    max_gen_toks: int = 32
    gen_group_size: int = 1
    # ROCStories: group-wise (infill_group_size, left to right) and dynamic (criterion, per_step) infilling
    infill_group_size: int = 1
    infill_criterion: str = "confidence"
    infill_per_step: int = 1
    blank_length: int | None = None
    # generative perplexity: genppl_samples samples of genppl_length tokens per mode, judged by `judge`
    judge: str | None = None
    genppl_modes: list[str] = field(default_factory=lambda: ["random", "confidence", "entropy"])
    genppl_samples: int = 16
    genppl_length: int = 128
    genppl_per_step: int = 1
    genppl_temperature: float = 1.0

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError(f"no tasks given: --tasks takes a comma-separated list of {', '.join(ALL_TASKS)}")
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
        if "genppl" in self.tasks and not self.judge:
            raise ValueError("genppl needs an AR judge: pass --judge PATH (any Hugging Face causal LM)")
        if "rocstories" in self.tasks and not self.data_dir:
            from .rocstories import CLOZE_FILE

            raise MissingDataError(
                f"rocstories reads local CSVs only: pass --data-dir DATA_DIR with DATA_DIR/rocstories/{CLOZE_FILE}"
            )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def evaluate_model(model_path: str, cfg: EvalConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run cfg.tasks on one model. Returns (records, outputs): one record per (task, metric) with the
    settings that produced it, and the generated text (ROCStories infills, genppl samples)."""
    cfg.validate()
    lm = A3LM(
        pretrained=model_path,
        order=cfg.order,
        group_size=cfg.group_size,
        batch_size=cfg.batch_size,
        device=cfg.device,
        seed=cfg.seed,
        max_gen_toks=cfg.max_gen_toks,
        gen_group_size=cfg.gen_group_size,
    )
    records: list[dict[str, Any]] = []
    outputs: dict[str, Any] = {}

    def add(task: str, metrics: dict[str, float], settings: dict[str, Any]) -> None:
        for metric, value in metrics.items():
            records.append({"model": model_path, "task": task, "metric": metric, "value": value, "settings": settings})

    harness = [t for t in cfg.tasks if t in HARNESS_TASKS]
    if harness:
        results = run_harness_tasks(lm, harness, cfg.limit, cfg.data_dir, cfg.num_fewshot, cfg.seed)
        for task in harness:
            settings = lm.settings() | {"num_fewshot": cfg.num_fewshot or 0, "limit": cfg.limit}
            if task != "triviaqa":  # scoring tasks: the generation settings play no part
                settings = {k: v for k, v in settings.items() if not k.startswith(("gen_", "max_gen", "criterion", "per_step", "use_cache"))}
            add(task, results[task], settings)

    if "rocstories" in cfg.tasks:
        from .rocstories import evaluate_rocstories, find_stories_file, read_stories

        path = find_stories_file(cfg.data_dir)  # type: ignore[arg-type]
        stories = read_stories(path)[: cfg.limit]
        modes = {
            "group": {"group_size": cfg.infill_group_size, "order": "left-to-right"},
            "dynamic": {"criterion": cfg.infill_criterion, "per_step": cfg.infill_per_step},
        }
        for mode, kwargs in modes.items():
            scores, predictions = evaluate_rocstories(
                lm.model, lm.tokenizer, stories, mode=mode, blank_length=cfg.blank_length,
                batch_size=cfg.batch_size, seed=cfg.seed, **kwargs,
            )  # fmt: skip
            settings = {"model": model_path, "data": str(path), "num_stories": len(stories), "mode": mode,
                        "temperature": 0.0, "blank_length": cfg.blank_length or "reference", "seed": cfg.seed,
                        "rouge": "F1 x100, rouge-score, use_stemmer", **kwargs}  # fmt: skip
            add(f"rocstories_{mode}", scores, settings)
            outputs[f"rocstories_{mode}"] = predictions

    if "genppl" in cfg.tasks:
        from .genppl import evaluate_genppl, load_judge

        judge, judge_tokenizer = load_judge(cfg.judge, lm.device)  # type: ignore[arg-type]
        results, samples = evaluate_genppl(
            lm.model, lm.tokenizer, judge, judge_tokenizer, cfg.genppl_modes, cfg.genppl_samples,
            cfg.genppl_length, cfg.genppl_per_step, cfg.genppl_temperature, cfg.batch_size, cfg.seed,
        )  # fmt: skip
        for mode, metrics in results.items():
            settings = {"model": model_path, "judge": cfg.judge, "mode": "dynamic", "criterion": mode,
                        "num_samples": cfg.genppl_samples, "length": cfg.genppl_length,
                        "per_step": cfg.genppl_per_step, "temperature": cfg.genppl_temperature, "seed": cfg.seed}  # fmt: skip
            add(f"genppl_{mode}", metrics, settings)
            outputs[f"genppl_{mode}"] = samples[mode]
    return records, outputs


# metrics shown in the table, in the paper's order; the JSON holds every metric (stderr included)
TABLE_METRICS = ("acc", "acc_norm", "exact_match", "rouge1", "rouge2", "rougeL", "gen_ppl", "unigram_entropy")
SHORT = {"acc_norm": "acc_n", "exact_match": "em", "rouge1": "R1", "rouge2": "R2", "rougeL": "RL", "gen_ppl": "ppl", "unigram_entropy": "H"}


def format_table(records: list[dict[str, Any]]) -> str:
    """One row per model, one column per (task, metric), as in the paper's tables (accuracies x100)."""
    columns: list[tuple[str, str]] = []
    for r in records:
        key = (r["task"], r["metric"])
        if r["metric"] in TABLE_METRICS and key not in columns:
            columns.append(key)
    models = list(dict.fromkeys(r["model"] for r in records))
    value = {(r["model"], r["task"], r["metric"]): r["value"] for r in records}

    def cell(model: str, task: str, metric: str) -> str:
        v = value.get((model, task, metric))
        if v is None:
            return "-"
        return f"{100 * v:.1f}" if metric in ("acc", "acc_norm", "exact_match") else f"{v:.2f}"

    header = ["model", *(f"{t.replace('rocstories_', 'roc-').replace('genppl_', 'gen-')} {SHORT.get(m, m)}" for t, m in columns)]
    rows = [[Path(m).name or m, *(cell(m, t, k) for t, k in columns)] for m in models]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))  # noqa: E731
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, rows)])


def run(models: list[str], cfg: EvalConfig, output: str | Path | None = None) -> dict[str, Any]:
    """Evaluate every model, write the results JSON (when `output`), return it."""
    cfg.validate()
    records: list[dict[str, Any]] = []
    outputs: dict[str, Any] = {}
    for model_path in models:
        model_records, model_outputs = evaluate_model(model_path, cfg)
        records += model_records
        outputs[model_path] = model_outputs
    result = {
        "config": asdict(cfg),
        "models": models,
        "versions": package_versions(),
        "table": format_table(records),
        "results": records,
        "outputs": outputs,
    }
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2, default=str))
    return result
