"""The demo's report: results.md, results.json and the NLL-vs-step plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from a3lm.demo.config import MIN_A3_STEPS, MIN_EVAL_DOCS
from a3lm.files import atomic_write, write_json_atomic


def write_report(out: Path, result_json: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """Write results.json, results.md and the plot into `out`: (the markdown, {kind: file})."""
    md = render_markdown(result_json)
    files = {
        "markdown": str(out / "results.md"),
        "json": str(out / "results.json"),
        "plot": str(out / "nll_vs_step.png"),
    }
    write_json_atomic(files["json"], result_json)
    atomic_write(files["markdown"], md)
    plot_curves(result_json, Path(files["plot"]))
    return md, files


# -- reporting ---------------------------------------------------------------------------------------


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


TARGET = 0.05  # nats per word: every factorization's gap at the default budget


def _gap_cell(r: dict, run: str) -> str:
    """'+0.012 ± 0.004 [+0.008, +0.016]': mean over seeds ± their sd, then the bootstrap interval."""
    sd = r.get(f"{run}_gap_sd")
    ci = r.get(f"{run}_gap_ci")
    return (
        _fmt(r[f"{run}_gap"], True)
        + ("" if sd is None else f" ± {sd:.3f}")
        + ("" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]")
    )


def summarize(table: list[dict], too_short: bool = False) -> dict[str, Any]:
    """The target (every factorization within TARGET of the truth, for the curriculum), met or not."""
    worst = max(table, key=lambda r: r["curriculum_gap"])
    worst_abl = max(table, key=lambda r: r["ablation_gap"])
    return {
        "too_short": too_short,
        "target": TARGET,
        "worst_order": worst["order"],
        "worst_gap": worst["curriculum_gap"],
        "target_met": None if too_short else worst["curriculum_gap"] <= TARGET,
        "ablation_worst_order": worst_abl["order"],
        "ablation_worst_gap": worst_abl["ablation_gap"],
        "mean_gap_curriculum": sum(r["curriculum_gap"] for r in table) / len(table),
        "mean_gap_ablation": sum(r["ablation_gap"] for r in table) / len(table),
        "worst_gap_rest": max(r["curriculum_gap_rest"] for r in table),
    }


def _header(res: dict) -> list[str]:
    src, c, steps = res["source"], res["config"], res["steps"]
    model, optim = c["train"]["model"], c["train"]["optim"]
    seeds = c["seeds"]
    decay = f"warmup + {optim['decay']} decay"
    sched = f"{decay} per stage" if optim["stage_schedule"] else f"one {decay} over stages 1-3"
    return [
        "# a3lm ground-truth demo",
        "",
        f"Source: seeded HMM ({src['states']} states, {src['words']} words), documents of {src['length']} "
        "words; "
        f"{src['heldout_docs']} held-out documents; source entropy {src['entropy_per_word']:.3f} nats/word.",
        f"Model: {model['family'].capitalize()}, hidden {model['hidden_size']}, {model['num_hidden_layers']} "
        "layers, "
        f"{model['num_attention_heads']} heads ({model['num_key_value_heads']} KV). "
        f"Stage 0 (AR): {steps['ar']} steps; curriculum (stages 1-2-3: "
        f"{' + '.join(map(str, steps['curriculum']))} "
        f"steps, {sched}) and ablation (stage 3 only) at the same budget, "
        f"{c['train']['data']['micro_batch_size']} documents per step. "
        + (
            f"Every training run repeated with {seeds} seeds ({c['seed']}..{c['seed'] + seeds - 1}). "
            if seeds > 1
            else f"One seed ({c['seed']}). "
        )
        + f"Wall time {res['wall_time_s']:.0f} s"
        + (" (this invocation, which resumed a run)." if res.get("resumed_from_steps") else "."),
        "",
    ]


def render_markdown(res: dict) -> str:
    c, sm = res["config"], res["summary"]
    lines = _header(res)
    if sm["too_short"]:
        lines += [
            f"**Too short to mean anything** (fewer than {MIN_A3_STEPS} curriculum steps or {MIN_EVAL_DOCS} "
            "held-out documents): the numbers below check that everything runs; no target or verdict is "
            "assessed.",
            "",
        ]
    noise = (
        "mean over seeds ± their standard deviation, " if c["seeds"] > 1 else ""
    ) + "[95% bootstrap interval over held-out documents]"
    lines += [
        "NLL per word (nats) on held-out documents; *exact* = the source's own conditionals for the same "
        f"factorization; gap = model - exact: {noise}.",
        "",
        "*past BOS-only*: the gap over the words that see more than BOS. The first group after BOS sees BOS "
        "alone and must be predicted from its position only (the marginal p(x_i); see `demo.bos_only`).",
        "",
        "| factorization | exact | curriculum gap | past BOS-only | ablation (stage 3 only) gap | past "
        "BOS-only | "
        "AR (stage 0) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["table"]:
        lines.append(
            f"| {r['order']} ({r['description']}) | {_fmt(r['true'])} | {_gap_cell(r, 'curriculum')} | "
            f"{_fmt(r['curriculum_gap_rest'], True)} | {_gap_cell(r, 'ablation')} | "
            f"{_fmt(r['ablation_gap_rest'], True)} | {_fmt(r['ar'])} |"
        )
    v = res["verdict"]["difference"]
    lines += [""]
    if not sm["too_short"]:
        lines.append(
            f"Target, every factorization within {TARGET} nats/word of the exact NLL (curriculum): "
            + ("met" if sm["target_met"] else "NOT met")
            + f" (worst: {sm['worst_order']}, {sm['worst_gap']:+.3f}; ablation's worst: "
            f"{sm['ablation_worst_order']}, {sm['ablation_worst_gap']:+.3f})."
        )
    lines.append(
        f"Curriculum vs ablation, gap difference averaged over the factorizations: {v['mean']:+.3f}"
        + ("" if v["sd"] is None else f" ± {v['sd']:.3f} over seeds")
        + f" [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]: {res['verdict']['text']}."
    )
    lines += _decoding_lines(res)
    return "\n".join(lines) + "\n"


def _decoding_lines(res: dict) -> list[str]:
    src, c = res["source"], res["config"]
    lines = [
        "",
        "## Decoding modes",
        "",
        f"Samples of the first seed's models, {c['gen_samples']} per mode (temperature 1), scored under the "
        "source. "
        "*impossible*: samples the source cannot produce (a word it never emits there, or a special token); "
        "*NLL/word*: exact NLL per generated word, averaged over the **possible** samples only (the "
        "impossible "
        "ones have infinite NLL and are excluded). A perfect model's left-to-right samples average the "
        "entropy, "
        f"{src['entropy_per_word']:.3f}; infilling: log p(middle | sides) per blank word.",
        "",
        "*oracle* decodes the same way with the source's exact conditionals in place of a model: what a "
        "perfect model would get (groups are products of marginals, so s > 1 makes impossible sequences "
        "even then).",
        "",
        "| mode | curriculum impossible | NLL/word | ablation impossible | NLL/word | oracle impossible | "
        "NLL/word |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {run: {s["mode"]: s for s in res["generation_stats"][run]} for run in ("ablation", "oracle")}
    for s in res["generation_stats"]["curriculum"]:
        cells = [
            f"{x['impossible']}/{x['samples']} | {_fmt(x['nll_per_word'])}"
            for x in (s, by["ablation"][s["mode"]], by["oracle"][s["mode"]])
        ]
        lines.append(f"| {s['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "Examples (curriculum model); log p = exact log-probability under the source:", ""]
    mode = None
    for g in res["generations"]:
        if g["mode"] != mode:
            mode = g["mode"]
            lines.append(f"- **{mode}**")
        extra = (
            ""
            if g["exact_conditional"] is None
            else f", log p(middle | sides) = {_fmt(g['exact_conditional'])}"
        )
        lines.append(f"  - `{g['text']}`  (log p = {_fmt(g['exact_logprob'])}{extra})")
    return lines


RUN_STYLE = {
    "curriculum": dict(color="C0", marker="o", ls="-"),
    "ablation": dict(color="C1", marker="s", ls="--"),
    "ar": dict(color="C2", marker="^", ls=":"),
}
RUN_LABEL = {
    "curriculum": "curriculum (stages 1-2-3)",
    "ablation": "ablation (stage 3 only)",
    "ar": "AR (stage 0)",
}


def _mean_curve(curves: dict, run: str, name: str) -> tuple[list[int], list[float]]:
    """Steps and the NLL of `name` averaged over the seeds that evaluated every step."""
    per_seed = [c[run] for c in curves.values()]
    steps = sorted(set.intersection(*(set(map(int, c)) for c in per_seed)))
    return steps, [sum(c[str(k)][name] for c in per_seed) / len(per_seed) for k in steps]


def plot_curves(res: dict, path: Path) -> None:
    """NLL per word vs step, one panel per factorization: curriculum, ablation, AR stage 0 and the truth
    (a line); the curriculum's stages shaded and named; one legend for every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, curves = res["table"], res["curves"]
    cols = 4
    n_rows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.1 * n_rows + 0.8), squeeze=False)
    bounds = res["stage_boundaries"]["curriculum"]
    a3_total = max(int(k) for c in curves.values() for k in c["curriculum"])
    ar_total = max(int(k) for c in curves.values() for k in c["ar"])
    edges = [0, *bounds, a3_total]
    for ax, r in zip(axes.flat, rows, strict=False):
        name = r["order"]
        spans = [
            (f"stage {i + 1}", lo, hi) for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True))
        ]
        if name == "left-to-right":
            spans.insert(0, ("stage 0 (AR)", -ar_total, 0))
        width = spans[-1][2] - spans[0][1]
        for i, (label, lo, hi) in enumerate(spans):
            ax.axvspan(lo, hi, color="0.94" if i % 2 == 0 else "0.86", lw=0, zorder=0)
            if (hi - lo) < 0.15 * width:  # a narrow stage: its number only
                label = label.split()[1]
            ax.text(
                (lo + hi) / 2,
                0.97,
                label,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=7,
                color="0.3",
            )
        runs = ("curriculum", "ablation") + (("ar",) if name == "left-to-right" else ())
        for run in runs:
            for c in curves.values() if len(curves) > 1 else ():  # each seed, faintly
                xs = sorted(map(int, c[run]))
                ax.plot(
                    [x - (ar_total if run == "ar" else 0) for x in xs],
                    [c[run][str(x)][name] for x in xs],
                    color=RUN_STYLE[run]["color"],
                    lw=0.6,
                    alpha=0.35,
                )
            xs, ys = _mean_curve(curves, run, name)
            if run == "ar":  # stage 0 runs before step 0 of the any-order runs
                xs = [x - ar_total for x in xs]
            ax.plot(xs, ys, ms=3, label=RUN_LABEL[run], **RUN_STYLE[run])
        ax.axhline(r["true"], color="k", lw=1.2, label="exact NLL (the source)")
        ax.set_title(f"{name}  (exact {r['true']:.3f})", fontsize=10)
        # zoom on the approach to the truth; the untrained start may lie far above, the end must show
        finals = [r["curriculum"], r["ablation"]] + ([r["ar"]] if r["ar"] is not None else [])
        ax.set_ylim(r["true"] - 0.05, max(r["true"] + 0.6, max(finals) + 0.1))
        ax.set_xlabel("step (stage 0 before 0)" if name == "left-to-right" else "step")
        ax.set_ylabel("NLL / word")
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the first panel has every series
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.95),
        ncol=len(labels),
        fontsize=9,
        frameon=False,
    )
    seeds = res["config"]["seeds"]
    fig.suptitle(
        "held-out NLL per word vs training step; shaded: the curriculum's stages"
        + (f"; mean of {seeds} seeds (faint: each seed)" if seeds > 1 else ""),
        y=0.995,
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    fig.savefig(path, dpi=110)
    plt.close(fig)
