"""LoRA adapters through peft: the A3 model's decoder adapted, the query vector trained in full.

    add_adapters(model, cfg.lora)            # in place: peft LoRA layers, everything else frozen
    tuner = restore(fresh_base, state, cfg.lora)   # state: what trains, gathered; an unsharded copy
    save_adapter(folder, tuner.model, base_path)   # peft's format: PeftModel.from_pretrained opens it
    tuner.merge_and_unload()                 # a plain A3ForCausalLM with the adapters merged in

The two streams run through the same decoder, so they share the adapted weights as they share the
base. Only the adapters and the query vector train: checkpoints hold those (and their optimizer
state), and the frozen base is rebuilt from the run's model on resume and for the final merge.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from a3lm.training.config import LoRAConfig

if TYPE_CHECKING:
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

ADAPTER = "default"  # peft's adapter name; peft drops it from the keys it saves
PEFT_PREFIX = "base_model.model."  # the keys' prefix in peft's adapter files (a PeftModel's own names)
QUERY_KEY = "query_embed"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def decoder_linear_names(model: nn.Module) -> list[str]:
    """The leaf names of every nn.Linear inside the decoder's blocks (q_proj, ..., down_proj)."""
    layers = model.model.layers
    return sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})


def peft_config(model: nn.Module, cfg: LoRAConfig) -> LoraConfig:
    from peft import LoraConfig

    targets = list(cfg.target_modules) or decoder_linear_names(model)
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.scale_alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )


def add_adapters(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """LoRA layers put into `model` in place (peft's `LoraModel`); all but them and `w` frozen."""
    from peft.tuners.lora import LoraModel

    lora_cfg = peft_config(model, cfg)
    LoraModel(model, lora_cfg, ADAPTER)  # injects into `model` and marks only the adapters trainable
    missing = set(lora_cfg.target_modules) - {n.rsplit(".", 1)[-1] for n, _ in adapted_modules(model)}
    if missing:
        raise ValueError(
            f"lora.target_modules names no module {sorted(missing)} in the decoder; its linear "
            f"layers are {decoder_linear_names(model)}"
        )
    model.query_embed.requires_grad_(True)  # new in A3: trained in full
    return model


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def is_adapted(model: nn.Module) -> bool:
    return bool(adapted_modules(model))


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the adapters and query vector into an adapted `model`; every one of them must be there."""
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != wanted:
        missing, unexpected = sorted(wanted - set(state))[:4], sorted(set(state) - wanted)[:4]
        raise ValueError(
            f"adapter state does not match the model: missing {missing}, unexpected {unexpected}"
        )
    model.load_state_dict(state, strict=False)


def restore(base: nn.Module, state: dict[str, torch.Tensor], cfg: LoRAConfig) -> LoraModel:
    """`base` (a fresh copy of the run's frozen model, full precision) with the trained adapters and
    query vector `state` put in; peft's tuner around it (`.model` is `base`; `.merge_and_unload()`
    gives a plain A3ForCausalLM with the adapters merged into its weights)."""
    from peft.tuners.lora import LoraModel

    with torch.random.fork_rng(devices=[]):  # the adapters' throwaway init must not move the RNG
        tuner = LoraModel(base, peft_config(base, cfg), ADAPTER)
    base.query_embed.requires_grad_(True)
    load_trainable(base, state)
    return tuner


def save_adapter(folder: Path, model: nn.Module, base_path: str | None) -> None:
    """`folder`/adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained` writes
    them, plus the trained query vector (peft loads checkpoint entries that are not adapter weights as
    they are, as it does saved biases): `PeftModel.from_pretrained(A3 base, folder)` is the run's model.

    model: an adapted, unsharded model (`restore`)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora_cfg = copy.deepcopy(model.peft_config[ADAPTER])  # the config the adapters were built from
    lora_cfg.base_model_name_or_path = base_path
    adapters = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    tensors[PEFT_PREFIX + QUERY_KEY] = model.query_embed.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    lora_cfg.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def adapter_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts (for logs and docs)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "share": trainable / max(total, 1)}


# -- 4-bit base weights (QLoRA) -----------------------------------------------------------------------


def check_4bit(cfg: LoRAConfig) -> None:
    """Refuse lora.load_in_4bit in one line: 4-bit bitsandbytes bases are not wired into the two-stream
    model (its attention and last-layer hooks run on plain nn.Linear), and nothing here could test it."""
    if cfg.load_in_4bit:
        raise ValueError(
            "lora.load_in_4bit (QLoRA) is not available in this version of a3lm: train the "
            "adapters on a bf16 or fp32 base (lora.load_in_4bit=false)"
        )
