"""An lm-evaluation-harness model for A3 checkpoints, registered as `a3lm`.

    lm_eval.simple_evaluate(model=A3LM(pretrained=DIR, order="left-to-right"), tasks=["hellaswag"])
    python -m a3lm.evaluation --model a3lm --model_args pretrained=DIR,order=right-to-left --tasks piqa

lm-eval 0.4.13 finds models only in its own registry (no entry points), so the class registers itself
when this module is imported; `python -m a3lm.evaluation` is the `lm_eval` command with it imported.

- loglikelihood: one padded forward per batch; the context is left-to-right singleton groups with BOS
  first, the continuation follows in `order` with groups of `group_size` (see .likelihood).
- loglikelihood_rolling: the harness's disjoint rolling windows, each scored the same way.
- generate_until: the group-wise (or dynamic) sampler of a3lm.sampling with its exact KV cache,
  decoding as its `DecodingConfig` says.

`a3lm-base` (BaseLM) is the AR base model under the same conventions (BOS in front of every context,
the same batching and truncation), scored left to right as lm-eval's `hf` model scores it: the
base row of `a3lm eval`'s table.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401  (before registering: the registry imports the harness's models only while empty)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from a3lm.decoding.api import sample
from a3lm.decoding.config import DecodingConfig
from a3lm.decoding.text import cut_at_stop
from a3lm.evaluation.continuations import generation_generator, prefix_token_id, score_continuations
from a3lm.files import require_a3
from a3lm.groups import check_order
from a3lm.model.modeling import A3ForCausalLM, max_positions

DEFAULT_MAX_GEN_TOKS = 256  # as the harness's HFLM


def resolve_device(device: str | None) -> torch.device:
    """ "cuda" when a GPU is there and nothing is asked for, else what is asked for; "cuda" on a
    machine without CUDA (the `lm_eval` command's default device) falls back to the CPU, with a warning."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(
            f"device {device!r} asked for, but this machine has no CUDA: running on the CPU", stacklevel=2
        )
        return torch.device("cpu")
    return torch.device(device)


def load_model(pretrained: str, device: str | None = None, dtype: str = "auto") -> tuple[A3ForCausalLM, Any]:
    """An A3 model (eval mode, on `device`) and its tokenizer from a save_pretrained directory or hub id."""
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    require_a3(pretrained)
    model = A3ForCausalLM.from_pretrained(pretrained, dtype=torch_dtype).to(resolve_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=False)
    return model, tokenizer


def stop_strings(until: str | list[str] | None, eos_text: str | None) -> list[str]:
    """The harness's `until` as a list, with the EOS token's text added."""
    stops = [until] if isinstance(until, str) else list(until or [])
    return stops + [eos_text] if eos_text and eos_text not in stops else stops


def rolling_windows(
    tokens: list[int], prefix_token_id: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """The harness's disjoint rolling windows of max_length - 2 tokens (BOS goes in front of each)."""
    windows = get_rolling_token_windows(tokens, prefix_token_id, max_length - 2, context_len=1)
    return list(map(make_disjoint_window, windows))


def left_padded(prompts: list[list[int]], keep: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, L] of left-padded prompts, each cut to BOS + its last keep - 1
    tokens (the sampler left-aligns every row itself)."""
    prompts = [p if len(p) <= keep else p[:1] + p[len(p) - keep + 1 :] for p in prompts]
    B, L = len(prompts), max(map(len, prompts))
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, L - len(p) :] = torch.tensor(p)
        attention_mask[b, L - len(p) :] = 1
    return input_ids, attention_mask


def open_model(
    pretrained: str | torch.nn.Module, tokenizer: Any, device: str | None, dtype: str, load: Any
) -> tuple[torch.nn.Module, Any, str]:
    """(model in eval mode, tokenizer, its path or name): an in-memory model with its tokenizer, or a
    folder / Hub id opened by `load(path, device, dtype)` (its own tokenizer unless one is given)."""
    if isinstance(pretrained, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(f"pass the tokenizer along with an in-memory {type(pretrained).__name__}")
        model = pretrained.eval() if device is None else pretrained.to(resolve_device(device)).eval()
        path = getattr(pretrained.config, "_name_or_path", "") or "<in-memory>"
    else:
        model, loaded_tokenizer = load(str(pretrained), device, dtype)
        tokenizer, path = tokenizer or loaded_tokenizer, str(pretrained)
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    return model, tokenizer, path


@register_model("a3lm")
class A3LM(TemplateLM):
    """lm-eval model arguments (all optional but `pretrained`):

    pretrained: a directory (or hub id) holding an A3 checkpoint and its tokenizer, or a loaded
        A3ForCausalLM (then pass `tokenizer` too).
    order, group_size: factorization of the continuation when scoring (left-to-right, right-to-left,
        random, random-blocks); seed fixes the random orders, of scoring and of generation (one per
        request, batch independent).
    decoding: a `DecodingConfig` (how generate_until decodes, its temperature / top-k / top-p
        included), or its fields as separate arguments (what `--model_args` can pass): gen_mode (group
        / dynamic), gen_order, gen_group_size, criterion, per_step, threshold, speculative, use_cache;
        then the task sets temperature / top-k / top-p per request.
    max_gen_toks: generation length when a task does not say; max_length: positions (default the
        model's max_position_embeddings).
    """

    def __init__(
        self,
        pretrained: str | A3ForCausalLM,
        tokenizer: Any = None,
        order: str = "left-to-right",
        group_size: int = 1,
        batch_size: int | str = 16,
        device: str | None = None,
        dtype: str = "auto",
        seed: int = 1234,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        decoding: DecodingConfig | None = None,
        gen_mode: str = "group",
        gen_order: str = "left-to-right",
        gen_group_size: int = 1,
        criterion: str = "confidence",
        per_step: int = 1,
        threshold: float | None = None,
        speculative: int = 0,
        use_cache: bool = True,
        **unused: Any,  # the harness passes max_batch_size and friends to every model
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.model_path = open_model(
            pretrained, tokenizer, device, dtype, self.load
        )
        check_order(order, named=True)
        if gen_mode not in ("group", "dynamic"):
            raise ValueError(f"unknown gen_mode {gen_mode!r}; choose group or dynamic")
        self.order, self.group_size = order, int(group_size)
        # "auto" (the harness's default for HF models) has no meaning here: use our default
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)
        self._max_length = int(max_length) if max_length is not None else None
        self.max_gen_toks = int(max_gen_toks)
        # a config handed in decides the sampling too; one built from arguments leaves it to the task
        self.task_sampling = decoding is None
        self.decoding = decoding or DecodingConfig(
            order=gen_order,
            group_size=int(gen_group_size),
            dynamic=gen_mode == "dynamic",
            criterion=criterion,
            per_step=int(per_step),
            threshold=None if threshold is None else float(threshold),
            speculative=int(speculative),
            use_cache=bool(use_cache),
        )

    @staticmethod
    def load(pretrained: str, device: str | None, dtype: str) -> tuple[torch.nn.Module, Any]:
        return load_model(pretrained, device, dtype)

    # -- what the harness asks of a model ----------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_length(self) -> int:
        if self._max_length is not None:
            return self._max_length
        return max_positions(self.model) or 2048

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "a3lm").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids without BOS: the adapter puts BOS in front of every context itself."""
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the numbers, for the results JSON."""
        keys = ("order", "group_size", "seed", "max_length", "max_gen_toks")
        decoding = describe_decoding(self.decoding) | (
            {"sampling": "the task's"} if self.task_sampling else {}
        )
        return {"model": self.model_path, **{k: getattr(self, k) for k in keys}, "decoding": decoding}

    def get_model_info(self) -> dict[str, Any]:
        return {"a3lm": self.settings()}

    def _with_prefix(self, context: list[int]) -> list[int]:
        return context if context[:1] == [self.prefix_token_id] else [self.prefix_token_id, *context]

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        scores = score_continuations(
            self.model,
            [(self._with_prefix(context), continuation) for _, context, continuation in requests],
            order=self.order,
            group_size=self.group_size,
            batch_size=self.batch_size,
            seed=self.seed,
            max_length=self.max_length,
            pad_token_id=self.pad_id_of(),
            progress=not disable_tqdm,
        )
        out = []
        for (key, _, _), score in zip(requests, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, (score.logprob, score.is_greedy))
            out.append((score.logprob, score.is_greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log p(text) over the harness's disjoint rolling windows (as its HFLM does).

        The harness's windows hold max_seq_len + 1 tokens, and every window after the first gets BOS
        in front here, so max_seq_len = max_length - 2 keeps each one within max_length positions.
        """
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in rolling_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length
            ):
                windows.append((self._with_prefix(context), continuation))
                owner.append(i)
        scores = score_continuations(
            self.model,
            windows,
            self.order,
            self.group_size,
            self.batch_size,
            self.seed,
            self.max_length,
            self.pad_id_of(),
            progress=not disable_tqdm,
        )
        totals = [0.0] * len(requests)
        for i, score in zip(owner, scores, strict=True):
            totals[i] += score.logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generate max_gen_toks tokens per request with the A3 sampler; cut at the first stop string."""
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[repr(sorted(req.args[1].items()))].append(i)
        outputs: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in by_kwargs.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self.generate([requests[i].args[0] for i in batch], **gen_kwargs)
                for i, text in zip(batch, texts, strict=True):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return outputs  # type: ignore[return-value]

    def generate(self, contexts: list[str], **gen_kwargs: Any) -> list[str]:
        """Continuations of `contexts` (one batch), cut at the first of gen_kwargs["until"].

        gen_kwargs as the harness passes them: until (str or list), max_gen_toks, do_sample, temperature
        (greedy unless do_sample with temperature > 0), top_k, top_p.
        """
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        until = stop_strings(gen_kwargs.get("until"), eos_text)
        length = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample", False) else 0.0
        # keep BOS and the end of the context: the prompt + generation must fit in max_length positions
        keep = self.max_length - length
        if keep < 1:
            raise ValueError(
                f"max_gen_toks={length} leaves no room for a prompt in {self.max_length} positions"
            )
        prompts = [self._with_prefix(self.tok_encode(c)) for c in contexts]
        input_ids, attention_mask = left_padded(prompts, keep, self.pad_id_of())
        rows = self.sample_rows(
            input_ids.to(self.device), attention_mask.to(self.device), length, temperature, gen_kwargs
        )
        return [cut_at_stop(self.tok_decode(row), until)[0] for row in rows]

    def sample_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        length: int,
        temperature: float,
        gen_kwargs: dict,
    ) -> list[list[int]]:
        """The generated ids of each left-padded prompt row (up to its first EOS), decoded by
        self.decoding."""
        top = {k: gen_kwargs.get(k) for k in ("top_k", "top_p")}
        # a random fill order per request, from its own prompt: greedy answers do not depend on the batch
        orders = [
            generation_generator(self.seed, ids[real.bool()].tolist(), length)
            for ids, real in zip(input_ids, attention_mask, strict=True)
        ]
        out = sample(
            self.model,
            input_ids,
            attention_mask,
            length=length,
            config=self.decoding,
            seed=self.seed,
            order_generators=orders,
            eos_token_id=self.eot_token_id,
            pad_token_id=self.pad_id_of(),
            **({"temperature": temperature, **top} if self.task_sampling else {}),
        )
        lengths = attention_mask.sum(1).tolist()
        return [
            out.sequences[b, n:][out.attention_mask[b, n:].bool()].tolist() for b, n in enumerate(lengths)
        ]

    def pad_id_of(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


@register_model("a3lm-base")
class BaseLM(A3LM):
    """The AR base model (any Hugging Face causal LM) under A3LM's conventions, for the table's base row.

    pretrained: a model directory, a .gguf file (transformers dequantizes it) or a hub id. Scoring is
    plain left to right (as lm-eval's `hf` model scores): the same requests, BOS in front of every
    context, batching and truncation as A3LM, the logits of the unmodified model. generate_until is
    the model's own `generate` (greedy unless the task samples; a DecodingConfig's temperature, top-k and
    top-p override the task's).
    """

    def __init__(
        self,
        pretrained: str | torch.nn.Module,
        tokenizer: Any = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("order", "group_size", "gen_mode", "gen_order", "gen_group_size"):
            if kwargs.pop(key, None) not in (None, "left-to-right", 1, "1", "group"):
                raise ValueError(
                    f"the AR base model is scored and decoded left to right one token at a time: drop {key}"
                )
        decoding = kwargs.pop("decoding", None)
        if decoding is None and (temperature, top_k, top_p) != (None, None, None):
            decoding = DecodingConfig(
                temperature=0.0 if temperature is None else float(temperature),
                top_k=None if top_k is None else int(top_k),
                top_p=None if top_p is None else float(top_p),
            )
        if decoding is not None and (decoding.mode, decoding.order, decoding.group_size) != (
            "group",
            "left-to-right",
            1,
        ):
            raise ValueError(
                "the AR base model decodes left to right one token at a time: "
                "give it temperature, top-k, top-p only"
            )
        super().__init__(pretrained, tokenizer, decoding=decoding, **kwargs)

    @staticmethod
    def load(pretrained: str, device: str | None, dtype: str) -> tuple[torch.nn.Module, Any]:
        return load_base_model(pretrained, device, dtype)

    def settings(self) -> dict[str, Any]:
        settings = super().settings() | {"model_kind": "base (plain AR)"}
        d = self.decoding
        sampling_options = (
            {"sampling": "the task's"}
            if self.task_sampling
            else {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p}
        )
        settings["decoding"] = {"mode": "left-to-right (generate)", **sampling_options}
        return settings

    def sample_rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        length: int,
        temperature: float,
        gen_kwargs: dict,
    ) -> list[list[int]]:
        d = self.decoding
        top_k, top_p = gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
        if not self.task_sampling:
            temperature, top_k, top_p = d.temperature, d.top_k, d.top_p
        return ar_generate(
            self.model,
            input_ids,
            attention_mask,
            length,
            temperature,
            top_k,
            top_p,
            eos_token_id=self.eot_token_id,
            pad_token_id=self.pad_id_of(),
            seed=self.seed,
        )


def load_base_model(
    pretrained: str, device: str | None = None, dtype: str = "auto"
) -> tuple[torch.nn.Module, Any]:
    """A plain causal LM (eval mode) and its tokenizer: a folder, a .gguf file, 'smollm2' or a Hub id."""
    from a3lm.model.convert import load_causal_lm, resolve_source

    model, tokenizer = load_causal_lm(
        resolve_source(pretrained), dtype if dtype == "auto" else getattr(torch, dtype)
    )
    if isinstance(model, A3ForCausalLM):
        raise ValueError(
            f"{pretrained} is an A3 checkpoint: pass it as --model, and its AR base model as --base"
        )
    return model.to(resolve_device(device)), tokenizer


@torch.no_grad()
def ar_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[list[int]]:
    """`length` new tokens after each left-padded prompt row [B, L] with the model's own `generate`;
    each row's ids up to (without) its first EOS when stop_at_eos, else exactly `length` of them."""
    sample = temperature > 0
    options: dict[str, Any] = {"do_sample": sample}
    if sample:
        options |= {"temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
        torch.manual_seed(seed)
    else:  # the model's generation_config may ask for sampling: say greedy in full
        options |= {"temperature": None, "top_k": None, "top_p": None}
    if stop_at_eos:
        options["eos_token_id"] = eos_token_id
    else:
        options["min_new_tokens"] = length
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=length,
        pad_token_id=pad_token_id,
        **options,
    )[:, input_ids.shape[1] :].tolist()
    if stop_at_eos and eos_token_id is not None:
        out = [row[: row.index(eos_token_id)] if eos_token_id in row else row for row in out]
    return out


def describe_decoding(config: DecodingConfig) -> dict[str, Any]:
    """What the results JSON records of a DecodingConfig: its mode and the options that act in it."""
    acting = {
        "group": ("order", "group_size"),
        "speculative": ("order", "speculative", "speculative_schedule"),
        "dynamic": ("criterion", "per_step", "threshold"),
    }[config.mode]
    options = {k: getattr(config, k) for k in acting}
    if not isinstance(options.get("order", ""), str):
        options["order"] = "custom"
    return {
        "mode": config.mode,
        **options,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "use_cache": config.use_cache,
    }
