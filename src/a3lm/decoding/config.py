"""What a decoding run may be asked to do, validated once, and how one token is chosen.

`DecodingConfig` is the single owner of every decoding option: the CLI, the lm-eval adapter and Python
callers build one (or pass its fields as keywords to `sample` / `infill`), and an option that does not
apply to the chosen mode is an error rather than silently ignored. Three modes:

- group-wise (default): the positions to fill are split into groups of `group_size` in `order`;
- dynamic (`dynamic=True`): every step commits the best `per_step` unfilled positions by `criterion`
  (or all above `threshold`);
- speculative (`speculative=k`): lossless parallel decoding of the singleton `order`: k positions
  drafted at once from the query stream, verified in one forward (samples follow the s = 1 joint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from a3lm.groups import Order, check_order

CRITERIA = ("confidence", "margin", "entropy", "random")
SPECULATIVE_SCHEDULES = ("constant", "heuristic")


@dataclass(frozen=True)
class DecodingConfig:
    """Every decoding option. Defaults: left-to-right singletons (plain AR), temperature 1, exact cache.

    order: left-to-right, right-to-left, random, random-blocks, or a custom order (a permutation of the
        positions to fill, by left-to-right rank: one 1-D tensor shared by every row or one per row).
    group_size: positions per group (group-wise mode).
    dynamic, criterion, per_step, threshold: dynamic resampling (criterion confidence, margin, entropy
        or random; commit `per_step` per step, or every position with score >= `threshold`).
    speculative: k >= 1 drafts per forward (0 = off), for singleton orders (group_size 1).
    speculative_schedule: "constant" keeps k; "heuristic" (transformers' assisted-generation rule)
        starts at k and after each verified window adds 2 when every draft of every row was accepted,
        else subtracts 1, keeping at least one draft (window 2, as transformers keeps one assistant
        token): the window follows the acceptance, and samples stay exact (the width is chosen from
        earlier windows only).
    temperature (0 = greedy), top_k, top_p: applied to every distribution a token is drawn from.
    seed: seeds a fresh generator (None: nondeterministic); a generator passed to `sample` wins.
    stop_at_eos, eos_token_id: `sample` stops a row at a generated EOS: one id or a list of them
        (default: the model config's, which may list several, as Llama 3's does).
    pad_token_id: fills padding in the output (default: the model's, else 0).
    use_cache: the exact KV cache; False recomputes the full two-stream forward every step.
    """

    order: Order = "left-to-right"
    group_size: int = 1
    dynamic: bool = False
    criterion: str = "confidence"
    per_step: int = 1
    threshold: float | None = None
    speculative: int = 0
    speculative_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_at_eos: bool = True
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        check_order(self.order)
        self._check_mode()
        if self.group_size < 1:
            raise ValueError(f"group size must be >= 1, got {self.group_size}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}")
        if self.per_step < 1:
            raise ValueError(f"per_step (k) must be >= 1, got {self.per_step}")
        if self.threshold is not None:
            if self.per_step != 1:
                raise ValueError(
                    "give either per_step (commit k per step) or threshold (commit all above p), not both"
                )
            if not 0.0 < self.threshold < 1.0:
                raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")
            if self.criterion not in ("confidence", "margin"):
                raise ValueError(
                    "threshold compares a probability: use criterion confidence or margin, not "
                    f"{self.criterion!r}"
                )
        if self.speculative < 0:
            raise ValueError(
                f"speculative (drafts per forward) must be >= 1, or 0 for off; got {self.speculative}"
            )
        if self.speculative_schedule not in SPECULATIVE_SCHEDULES:
            raise ValueError(
                f"unknown speculative_schedule {self.speculative_schedule!r}; choose one of "
                f"{', '.join(SPECULATIVE_SCHEDULES)}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:  # nan < 0 is False: checked apart
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:  # nan fails this too
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def _check_mode(self) -> None:
        """Options of one mode given to another are an error (a value other than the default)."""
        custom_order = not (isinstance(self.order, str) and self.order == "left-to-right")
        if self.dynamic and self.speculative:
            raise ValueError("dynamic and speculative decoding exclude each other: choose one")
        if self.dynamic and (self.group_size != 1 or custom_order):
            raise ValueError(
                "group_size and order do not apply to dynamic decoding (it picks positions by criterion)"
            )
        if not self.dynamic and (
            self.criterion != "confidence" or self.per_step != 1 or self.threshold is not None
        ):
            raise ValueError(
                "criterion, per_step and threshold apply to dynamic decoding only: set dynamic=True "
                "(--dynamic)"
            )
        if not self.speculative and self.speculative_schedule != "constant":
            raise ValueError(
                "speculative_schedule applies to speculative decoding only: set speculative=k (--speculative)"
            )
        if self.speculative and self.group_size != 1:
            raise ValueError(
                f"speculative decoding verifies singleton groups: group_size must be 1, got {self.group_size}"
            )

    @property
    def mode(self) -> str:
        """ "speculative", "dynamic" or "group"."""
        return "speculative" if self.speculative else "dynamic" if self.dynamic else "group"

    @classmethod
    def build(cls, config: DecodingConfig | None = None, **options) -> DecodingConfig:
        """`config` with `options` replaced (or a new one from `options`); unknown names raise TypeError."""
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown decoding option(s) {', '.join(sorted(unknown))}; see DecodingConfig")
        if config is None:
            return cls(**options)
        return cls(**{**{f.name: getattr(config, f.name) for f in fields(cls)}, **options})

    def make_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator
