"""`a3lm eval`: every benchmark of the paper for the AR base and its A3 adaptations, one table and a
results JSON.

Every row goes through the same prompts, BOS convention and data files: the base (any Hugging Face
causal LM, or a GGUF file) is scored left to right as lm-eval's `hf` model scores it, each A3 model
once per scoring order; under each A3 row, its difference from the base.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from a3lm.decoding.config import DecodingConfig
from a3lm.evaluation.genppl import DEFAULT_MODES, GENPPL_MODES, evaluate_genppl, load_judge, mode_config
from a3lm.evaluation.lm_eval_adapter import A3LM, BaseLM, describe_decoding, load_base_model, load_model
from a3lm.evaluation.rocstories import evaluate_rocstories, find_stories_file, read_stories
from a3lm.evaluation.tasks import HARNESS_TASKS, MissingDataError, missing_files_message, run_harness
from a3lm.files import check_output_file, model_name, write_json_atomic
from a3lm.groups import ORDERS, check_order
from a3lm.model.convert import ConversionError, model_fingerprint, resolve_source

ALL_TASKS = ("hellaswag", "piqa", "winogrande", "siqa", "triviaqa", "rocstories", "genppl")
VERSIONED = ("a3lm", "torch", "transformers", "lm_eval", "rouge_score", "datasets", "tokenizers")


@dataclass
class EvalConfig:
    """Settings shared by every model of one `a3lm eval` run (all recorded in the JSON).

    orders: scoring orders of the likelihood tasks, one A3 row each (groups of group_size).
    decoding, dynamic: the two DecodingConfigs of the generative tasks, built once (by the CLI):
    `decoding` group-wise (or speculative) in an order, `dynamic` resampling by a criterion. With
    follow_order, `decoding`'s order is each row's scoring order. gen_mode: TriviaQA's (group: the
    first, dynamic: the second); infill_modes: the ROCStories runs; genppl_modes: "group" (the first)
    or a criterion (the second with that criterion), at genppl_temperature.
    """

    tasks: list[str]
    orders: list[str] = field(default_factory=lambda: ["left-to-right"])
    group_size: int = 1
    batch_size: int = 16
    limit: int | None = None
    num_fewshot: int | None = None
    data_dir: str | None = None
    device: str | None = None
    seed: int = 1234
    max_gen_toks: int = 32  # TriviaQA: tokens generated before the stop strings cut
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(temperature=0.0))
    dynamic: DecodingConfig = field(default_factory=lambda: DecodingConfig(dynamic=True, temperature=0.0))
    follow_order: bool = True
    gen_mode: str = "group"
    infill_modes: list[str] = field(default_factory=lambda: ["group", "dynamic"])
    blank_length: int | None = None
    # generative perplexity: genppl_samples samples of genppl_length tokens per mode, judged by `judge`
    judge: str | None = None
    genppl_modes: list[str] = field(default_factory=lambda: list(DEFAULT_MODES))
    genppl_samples: int = 16
    genppl_length: int = 128
    genppl_temperature: float = 1.0

    def validate(self) -> None:
        for name in ("batch_size", "group_size", "max_gen_toks", "genppl_samples", "genppl_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 (examples per task), got {self.limit}")
        if not self.tasks:
            raise ValueError(
                f"no tasks given: --tasks takes a comma-separated list of {', '.join(ALL_TASKS)}"
            )
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(ALL_TASKS)}")
        if not self.orders:
            raise ValueError(
                f"no scoring order given: --order takes a comma-separated list of {', '.join(ORDERS)}"
            )
        for order in self.orders:
            check_order(order, named=True)
        for name, modes, allowed in (
            ("gen mode", [self.gen_mode], ("group", "dynamic")),
            ("infill mode", self.infill_modes, ("group", "dynamic")),
            ("genppl mode", self.genppl_modes, GENPPL_MODES),
        ):
            if not modes or any(m not in allowed for m in modes):
                raise ValueError(f"unknown {name} in {modes}; choose from {', '.join(allowed)}")
        if self.decoding.dynamic or not self.dynamic.dynamic:
            raise ValueError(
                "EvalConfig.decoding is the group-wise config and EvalConfig.dynamic the dynamic one"
            )
        for (
            mode
        ) in self.genppl_modes:  # each mode's config is valid (e.g. a threshold needs confidence / margin)
            mode_config(mode, self.decoding, self.dynamic, self.genppl_temperature)
        self._check_generative_inputs()

    def _check_generative_inputs(self) -> None:
        """The judge and every local data file exist, before any task runs (a late failure loses the
        earlier tasks' results); all missing files are named at once. A judge that reads as a Hub id is
        left to load time (no network here)."""
        if "genppl" in self.tasks:
            if not self.judge:
                raise ValueError("genppl needs an AR judge: pass --judge PATH (any Hugging Face causal LM)")
            try:
                resolve_source(self.judge)
            except ConversionError as err:
                raise ValueError(f"genppl judge (--judge): {err}") from err
        if "rocstories" in self.tasks and not self.data_dir:
            from a3lm.evaluation.rocstories import CLOZE_FILE

            raise MissingDataError(
                "rocstories reads local CSVs only: "
                f"pass --data-dir DATA_DIR with DATA_DIR/rocstories/{CLOZE_FILE}"
            )
        if self.data_dir:
            self._check_local_files()

    def _check_local_files(self) -> None:
        harness = [HARNESS_TASKS[t] for t in self.tasks if t in HARNESS_TASKS]
        problems = [message] if (message := missing_files_message(harness, self.data_dir)) else []
        if "rocstories" in self.tasks:
            try:
                read_stories(find_stories_file(self.data_dir))  # its layout and every row, before any task
            except (MissingDataError, ValueError) as err:
                problems.append(str(err))
        if problems:
            raise MissingDataError("\n".join(problems))

    def row_decoding(self, order: str) -> DecodingConfig:
        """The group-wise config of the A3 row scored in `order`."""
        return DecodingConfig.build(self.decoding, order=order) if self.follow_order else self.decoding


@dataclass(frozen=True)
class Row:
    """One table row: a model (path), its kind (a3 / base), its readable name, the scoring order."""

    path: str
    kind: str
    name: str
    order: str = "left-to-right"

    @property
    def label(self) -> str:
        return f"{self.name} (AR)" if self.kind == "base" else f"{self.name} [{self.order}]"


def data_fingerprint(cfg: EvalConfig) -> dict[str, list[int]]:
    """{file: [size, mtime_ns]} of every local data file the tasks read (DATA_DIR/<task>/...): a rerun
    after a data file changed evaluates again instead of reusing rows scored on the old data."""
    if not cfg.data_dir:
        return {}
    root = Path(cfg.data_dir)
    folders = [root / t for t in cfg.tasks if (root / t).is_dir()]
    files = sorted(f for folder in folders for f in folder.rglob("*") if f.is_file())
    return {str(f.relative_to(root)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_lm(row: Row, cfg: EvalConfig, loaded: dict[str, tuple[Any, Any]] | None = None) -> A3LM:
    """The harness model of one row; `loaded` keeps each model loaded once across its rows."""
    loaded = {} if loaded is None else loaded
    if row.path not in loaded:
        load = load_base_model if row.kind == "base" else load_model
        loaded[row.path] = load(row.path, cfg.device)
    model, tokenizer = loaded[row.path]
    common = {
        "tokenizer": tokenizer,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "max_gen_toks": cfg.max_gen_toks,
    }
    if row.kind == "base":  # the base samples as the A3 rows do: same temperature, top-k, top-p
        d = cfg.decoding
        lm = BaseLM(
            model, decoding=DecodingConfig(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p), **common
        )
    else:
        decoding = cfg.dynamic if cfg.gen_mode == "dynamic" else cfg.row_decoding(row.order)
        lm = A3LM(model, order=row.order, group_size=cfg.group_size, decoding=decoding, **common)
    lm.model_path = row.path
    return lm


@dataclass
class RowResults:
    """What one row's tasks produce: a record per (task, metric) with the settings that produced it,
    and every generation with its prompt and score, by task."""

    row: Row
    records: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def add(
        self, task: str, metrics: dict[str, float], settings: dict[str, Any], outputs: Any = None
    ) -> None:
        r = self.row
        for metric, value in metrics.items():
            self.records.append(
                {
                    "row": r.label,
                    "name": r.name,
                    "model": r.path,
                    "kind": r.kind,
                    "order": r.order,
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "settings": settings,
                }
            )
        if outputs is not None:
            self.outputs[task] = outputs


def evaluate_row(
    row: Row, cfg: EvalConfig, loaded: dict | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run cfg.tasks for one row: (records, outputs) of `RowResults`. `loaded` keeps models (and the
    judge) loaded across rows."""
    cfg.validate()
    loaded = {} if loaded is None else loaded
    lm = build_lm(row, cfg, loaded)
    res = RowResults(row)
    _harness_tasks(lm, cfg, res)
    group = lm.decoding if row.kind == "base" else cfg.row_decoding(row.order)
    if "rocstories" in cfg.tasks:
        _rocstories(lm, cfg, group, res)
    if "genppl" in cfg.tasks:
        _genppl(lm, cfg, group, loaded, res)
    return res.records, res.outputs


def _harness_tasks(lm: A3LM, cfg: EvalConfig, res: RowResults) -> None:
    harness = [t for t in cfg.tasks if t in HARNESS_TASKS]
    if not harness:
        return
    results, samples = run_harness(lm, harness, cfg.limit, cfg.data_dir, cfg.num_fewshot, cfg.seed)
    for task in harness:
        settings = lm.settings() | {"num_fewshot": cfg.num_fewshot or 0, "limit": cfg.limit}
        if task != "triviaqa":  # scoring tasks: the generation settings play no part
            res.add(
                task,
                results[task],
                {k: v for k, v in settings.items() if k not in ("decoding", "max_gen_toks")},
            )
            continue
        answers = triviaqa_answers(samples.get(task, []))
        empty = sum(a["answer"] == "" for a in answers)
        res.add(task, results[task] | {"empty": empty, "count": len(answers)}, settings, answers)


def _rocstories(lm: A3LM, cfg: EvalConfig, group: DecodingConfig, res: RowResults) -> None:
    base = res.row.kind == "base"
    path = find_stories_file(cfg.data_dir)  # type: ignore[arg-type]
    stories = read_stories(path)[: cfg.limit]
    for mode in ["ar"] if base else cfg.infill_modes:
        config = cfg.dynamic if mode == "dynamic" else group
        scores, items = evaluate_rocstories(
            lm.model,
            lm.tokenizer,
            stories,
            config,
            blank_length=cfg.blank_length,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
        how = {"context": "prefix only (AR)", "decoding": lm.settings()["decoding"]} if base else {}
        settings = {
            "model": res.row.path,
            "data": str(path),
            "num_stories": len(stories),
            "decoding": describe_decoding(config),
            **how,
            "blank_length": cfg.blank_length or "reference",
            "seed": cfg.seed,
            "rouge": "F1 x100, rouge-score, use_stemmer",
        }
        res.add(f"rocstories_{mode}", scores, settings, items)


def _genppl(lm: A3LM, cfg: EvalConfig, group: DecodingConfig, loaded: dict, res: RowResults) -> None:
    base = res.row.kind == "base"
    if ("judge", cfg.judge) not in loaded:
        loaded[("judge", cfg.judge)] = load_judge(cfg.judge, lm.device)  # type: ignore[arg-type]
    judge, judge_tokenizer = loaded[("judge", cfg.judge)]
    modes = ["group"] if base else cfg.genppl_modes
    configs = {mode: mode_config(mode, group, cfg.dynamic, cfg.genppl_temperature) for mode in modes}
    results, samples = evaluate_genppl(
        lm.model,
        lm.tokenizer,
        judge,
        judge_tokenizer,
        configs,
        cfg.genppl_samples,
        cfg.genppl_length,
        cfg.batch_size,
        cfg.seed,
    )
    for mode, metrics in results.items():
        how = (
            {"decoding": describe_decoding(configs[mode]) | {"mode": "left-to-right (generate)"}}
            if base
            else {}
        )
        settings = {
            "model": res.row.path,
            "judge": cfg.judge,
            "decoding": describe_decoding(configs[mode]),
            **how,
            "num_samples": cfg.genppl_samples,
            "length": cfg.genppl_length,
            "seed": cfg.seed,
        }
        res.add(f"genppl_{mode}", metrics, settings, samples[mode])


def triviaqa_answers(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per question from the harness's samples: the prompt, the raw generation, the answer
    after the task's filter (what exact match compares), the aliases and the score."""
    out = []
    for s in samples:
        raw = s["resps"][0][0] if s.get("resps") else ""
        answer = s["filtered_resps"][0] if s.get("filtered_resps") else raw
        out.append(
            {
                "id": s.get("doc_id"),
                "prompt": s["arguments"][0][0],
                "generation": raw,
                "answer": answer,
                "aliases": s["doc"]["answer"]["aliases"],
                "exact_match": s.get("exact_match"),
            }
        )
    return out


# metrics shown in the table, in the paper's order; the JSON holds every metric (stderr included)
TABLE_METRICS = (
    "acc",
    "acc_norm",
    "exact_match",
    "empty",
    "rouge1",
    "rouge2",
    "rougeL",
    "gen_ppl",
    "unigram_entropy",
)
SHORT = {
    "acc_norm": "acc_n",
    "exact_match": "em",
    "rouge1": "R1",
    "rouge2": "R2",
    "rougeL": "RL",
    "gen_ppl": "ppl",
    "unigram_entropy": "H",
}
PERCENT = ("acc", "acc_norm", "exact_match")


def _cell(metric: str, v: float | None, count: float | None = None, diff: bool = False) -> str:
    if v is None:
        return "-"
    sign = "+" if diff else ""
    if metric in PERCENT:
        return f"{100 * v:{sign}.1f}"
    if metric == "empty":
        return f"{int(v):{sign}d}" if diff or count is None else f"{int(v)}/{int(count)}"
    return f"{v:{sign}.2f}"


def format_table(records: list[dict[str, Any]]) -> str:
    """One row per (model, scoring order), one column per (task, metric), as in the paper's tables
    (accuracies x100; "empty": TriviaQA answers that were empty after the task's filter). Under each
    A3 row, when a base row is there, its difference from the base (A3 - base)."""
    columns: list[tuple[str, str]] = []
    for r in records:
        key = (r["task"], r["metric"])
        if r["metric"] in TABLE_METRICS and key not in columns:
            columns.append(key)
    rows = list(dict.fromkeys((r.get("row", r["model"]), r.get("kind", "a3")) for r in records))
    value = {(r.get("row", r["model"]), r["task"], r["metric"]): r["value"] for r in records}
    base = next((label for label, kind in rows if kind == "base"), None)

    header = [
        "model",
        *(
            f"{t.replace('rocstories_', 'roc-').replace('genppl_', 'gen-')} {SHORT.get(m, m)}"
            for t, m in columns
        ),
    ]
    lines = []
    for label, kind in rows:
        lines.append(
            [label, *(_cell(m, value.get((label, t, m)), value.get((label, t, "count"))) for t, m in columns)]
        )
        if base is not None and kind != "base":
            diffs = []
            for t, m in columns:
                a, b = value.get((label, t, m)), value.get((base, t, m))
                diffs.append(_cell(m, None if a is None or b is None else a - b, diff=True))
            lines.append(["  - base", *diffs])
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def make_rows(
    models: list[str],
    orders: list[str],
    base: str | None = None,
    names: list[str] | None = None,
    base_name: str | None = None,
) -> list[Row]:
    """The table's rows: the base (if any) first, then every A3 model once per scoring order."""
    names = list(names or [])
    if len(names) > len(models):
        raise ValueError(f"{len(names)} names for {len(models)} models: give at most one --name per --model")
    names += [model_name(m) for m in models[len(names) :]]
    rows = [Row(base, "base", base_name or model_name(base))] if base else []
    rows += [Row(m, "a3", n, o) for m, n in zip(models, names, strict=True) for o in orders]
    if len({r.label for r in rows}) != len(rows):
        raise ValueError(
            f"two rows share a name ({', '.join(r.label for r in rows)}): tell them apart with --name"
        )
    return rows


def run(
    models: list[str],
    cfg: EvalConfig,
    output: str | Path | None = None,
    base: str | None = None,
    names: list[str] | None = None,
    base_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate the base (if any) and every A3 model in every scoring order; write the results JSON
    (when `output`, atomically), return it."""
    if output is not None:
        check_output_file(output)
    cfg.validate()
    rows = make_rows(models, cfg.orders, base, names, base_name)
    if not rows:
        raise ValueError("nothing to evaluate: pass --model A3_DIR and/or --base BASE")
    config = json.loads(json.dumps(asdict(cfg), default=str)) | {"data_files": data_fingerprint(cfg)}
    fingerprints = {row.path: model_fingerprint(row.path) for row in rows}
    records, outputs = finished_rows(output, config, rows, fingerprints)
    loaded: dict[Any, Any] = {}
    for i, row in enumerate(rows):
        if row.label not in outputs:
            row_records, outputs[row.label] = evaluate_row(row, cfg, loaded)
            records += row_records
        if all(r.path != row.path for r in rows[i + 1 :]):
            loaded.pop(row.path, None)  # free it before the next model loads
        result = {
            "config": config,
            "complete": i == len(rows) - 1,
            "rows": [asdict(r) | {"label": r.label, "fingerprint": fingerprints[r.path]} for r in rows],
            "models": models,
            "base": base,
            "versions": package_versions(),
            "table": format_table(records),
            "results": records,
            "outputs": outputs,
        }
        if output is not None:  # after every row: an interrupted run keeps the rows it finished
            write_json_atomic(Path(output), result)
    return result


def read_results(path: Path) -> dict[str, Any]:
    """An existing results file, which a rerun continues and then replaces: it must be a3lm eval's
    (an unrelated file of that name is refused, never overwritten)."""
    refuse = f"{path} exists and is not an a3lm eval results file: choose another --output, or delete it"
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{refuse} (not JSON: {e})") from e
    keys = ("config", "rows", "results", "outputs")
    if (
        not isinstance(previous, dict)
        or not all(k in previous for k in keys)
        or not all(isinstance(previous[k], t) for k, t in zip(keys, (dict, list, list, dict), strict=True))
    ):
        raise ValueError(refuse)
    return previous


def finished_rows(
    output: str | Path | None,
    config: dict[str, Any],
    rows: list[Row],
    fingerprints: dict[str, dict[str, list[int]]],
) -> tuple[list[dict], dict[str, Any]]:
    """(records, outputs) of the rows an earlier run of the same config already wrote to `output`
    (same label, model path and model files: `model_fingerprint`), so that a rerun after an
    interruption does only the rest. A row whose model changed since is evaluated again (with a warning)."""
    if output is None or not Path(output).is_file():
        return [], {}
    previous = read_results(Path(output))
    if previous.get("config") != config:
        old = previous.get("config") or {}
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if previous["outputs"]:
            warnings.warn(
                f"{output} was written with other settings ({', '.join(changed)}): its "
                f"{len(previous['outputs'])} finished row(s) are discarded and evaluated again",
                stacklevel=2,
            )
        return [], {}
    done = {r["label"]: r for r in previous.get("rows", []) if r["label"] in previous.get("outputs", {})}
    same_path = [row for row in rows if done.get(row.label, {}).get("path") == row.path]
    keep = {row.label for row in same_path if done[row.label].get("fingerprint") == fingerprints[row.path]}
    for row in same_path:
        if row.label not in keep:
            warnings.warn(
                f"{row.label}: the model files at {row.path} changed since {output} was written: "
                "evaluating the row again",
                stacklevel=2,
            )
    records = [r for r in previous.get("results", []) if r.get("row") in keep]
    return records, {label: previous["outputs"][label] for label in keep}
