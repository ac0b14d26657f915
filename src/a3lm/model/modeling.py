"""A3: two-stream (content / query) attention on an unmodified Hugging Face decoder.

The decoder (LlamaModel, Qwen2Model, ...) runs once on the concatenated streams

    inputs_embeds = [embed(input_ids) ; w, w, ..., w]     [B, 2N, H]
    position_ids  = [pos ; pos]                            [B, 2N]
    attention     = two_stream_mask(group_ids)             [B, 1, 2N, N]  (content keys only)

and the lm_head reads the query half: row i is p(x_i | x_{groups < group(i)}) (no shift).
Parameter names match `*ForCausalLM` (model.*, lm_head.*), so a plain AR checkpoint loads as is and
only `query_embed` (the learnable vector w) is new.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput

from a3lm.files import check_model_path, check_weight_shapes
from a3lm.groups import left_to_right, predictable, validate_group_ids
from a3lm.model.attention import ATTN_IMPLEMENTATION, zeros_before
from a3lm.model.config import A3Config
from a3lm.model.families import check_supported, sliding_window
from a3lm.model.masks import (
    BlockMaskCache,
    additive_mask,
    flex_two_stream_block_mask,
    group_attention_mask,
    own_slot_mask,
    row_chunks,
    sort_by_group,
    two_stream_mask,
    windowed_mask,
)
from a3lm.model.mlp import recompute_gated_mlps

if TYPE_CHECKING:
    from a3lm.model.cache import ContentCache

# From this many positions on, the CPU forward sorts them by group and runs attention by chunks of at
# least this many rows, each over its key prefix (`masks.row_chunks`).
MIN_ROW_CHUNK = 64
MIN_SKIPPED_ROWS = 16  # a decoding step skips its content rows in the last layer from this many on


@dataclass
class A3Output(ModelOutput):
    """loss: mean CE over targets; logits [B, N, V] from the query stream (row i predicts token i).

    Rows of each sample's earliest group and of padding have nothing to condition on: their logits
    are finite but meaningless, and they are never targets.

    content_hidden_states [B, N, H]: final (normed) content-stream states, when asked for.
    num_targets: how many positions the loss averages over (for token-weighted accumulation).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    content_hidden_states: torch.Tensor | None = None
    num_targets: torch.Tensor | None = None


class Reorder(torch.autograd.Function):
    """Rows reordered by a permutation: out[b, i] = x[b, index[b, i]]. x [B, R, H]; index and its
    inverse [B, R]. Backward reorders the gradient by the inverse: a gather, where `Tensor.gather`'s
    backward scatters into a zero-filled copy of x."""

    @staticmethod
    def forward(ctx, x_BRH, index_BR, inverse_BR):
        ctx.save_for_backward(inverse_BR)
        return x_BRH.gather(1, index_BR[..., None].expand(-1, -1, x_BRH.shape[-1]))

    @staticmethod
    def backward(ctx, grad_BRH):
        (inverse_BR,) = ctx.saved_tensors
        return grad_BRH.gather(1, inverse_BR[..., None].expand(-1, -1, grad_BRH.shape[-1])), None, None


def max_positions(model: nn.Module) -> int | None:
    """The model's max_position_embeddings (an A3 model's is its decoder's); None when it has none."""
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "max_position_embeddings", None)


def check_weights_fit(folder: str, build: Callable[[], nn.Module]) -> None:
    """The weights saved in `folder` have the shapes of the model `build()` makes from its config
    (built on the meta device: nothing allocated), checked before transformers loads them."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    check_weight_shapes(folder, expected)


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (0 at each row's first real token), as HF does for left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _last_layer_query_rows_only(decoder: nn.Module, n_content: int):
    """Run the last layer's q_proj, o_proj and MLP on the query half only (hooks on the unmodified modules).

    The content stream's last-layer output feeds nothing: later queries read only its keys and
    values, which k_proj and v_proj still compute for every row. With the content rows of the
    attention also skipped (`a3_attention`'s `a3_last_layer_content_rows`), the content half of the
    last layer is an eighth of a 4-layer model's two-stream work. The content rows then carry
    residual states with zeros added: callers must not read them.
    """
    layer = decoder.layers[-1] if hasattr(decoder, "layers") else None
    attn = getattr(layer, "self_attn", None)
    modules = [getattr(attn, "q_proj", None), getattr(attn, "o_proj", None), getattr(layer, "mlp", None)]

    def query_half(module, args):
        return (args[0][:, n_content:], *args[1:])

    def pad_content(module, args, out):
        return zeros_before(out, n_content)

    handles = [
        h
        for m in modules
        if m is not None
        for h in (m.register_forward_pre_hook(query_half), m.register_forward_hook(pad_content))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@functools.cache
def _cache_argument(decoder_class: type) -> str:
    """The decoder's name for its KV cache argument: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder_class.forward).parameters else "past_key_values"


def uses_flex(config: A3Config, device: torch.device) -> bool:
    """Whether attention runs as a FlexAttention BlockMask (refused for windows and soft-capping)."""
    backend = config.attention_backend
    text = config.text_config
    unfit = sliding_window(text) is not None or getattr(text, "attn_logit_softcapping", None)
    if unfit and backend == "flex":
        raise ValueError(
            f"attention_backend 'flex' does not run {text.model_type}'s sliding windows or soft-capping: "
            "use 'sdpa'"
        )
    return not unfit and (backend == "flex" or (backend == "auto" and device.type == "cuda"))


def window_kwargs(
    config: A3Config,
    mask: torch.Tensor,
    query_positions_BQ: torch.Tensor,
    key_positions_BK: torch.Tensor,
    query_rows: int,
) -> dict[str, torch.Tensor]:
    """{"a3_window_mask": the bool mask [B, 1, Q, K] cut to the sliding window} for a windowed decoder
    (the last `query_rows` rows are query slots, with an own slot when query_self_attention); {} else."""
    window = sliding_window(config.text_config)
    if window is None:
        return {}
    Q = query_positions_BQ.shape[1]
    own_Q = (torch.arange(Q, device=mask.device) >= Q - query_rows) & config.query_self_attention
    own_BQ = own_Q.expand_as(query_positions_BQ)
    return {"a3_window_mask": windowed_mask(mask, query_positions_BQ, key_positions_BK, window, own_BQ)}


@contextlib.contextmanager
def _layer_savings(decoder: nn.Module, config: A3Config, n_content: int, full_last_layer: bool):
    """The last layer on query rows only (unless content states are wanted), and gated MLPs that
    recompute in backward (not inside checkpointed layers: they already rerun everything)."""
    recompute = config.recompute_mlp and torch.is_grad_enabled() and not decoder.is_activation_checkpointing
    with contextlib.ExitStack() as stack:
        if not full_last_layer:
            stack.enter_context(_last_layer_query_rows_only(decoder, n_content))
        if recompute:
            stack.enter_context(recompute_gated_mlps(decoder))
        yield


class A3PreTrainedModel(PreTrainedModel):
    """The Hugging Face side of an A3 model: its config class, attention choice, loading (an A3 checkpoint
    or a plain decoder), building from an in-memory base, weight init, embedding accessors and the
    generate() hook. `A3ForCausalLM` below holds the two-stream model itself."""

    config_class = A3Config
    config: A3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # No `_no_split_modules` here: `post_init` gathers the wrapped decoder's own (its layer class, e.g.
    # LlamaDecoderLayer), so FSDP and device maps split any decoder family at its layers.

    def get_correct_attn_implementation(
        self, requested_attention: str | None, is_init_check: bool = False
    ) -> str:
        """Always the two-stream function: the decoder's other implementations know nothing of the two
        streams (the content-only key axis, the own slot), so a request for one is refused, not ignored."""
        if requested_attention not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(
                f"an A3 model runs its own two-stream attention ({ATTN_IMPLEMENTATION!r}), "
                f"not attn_implementation={requested_attention!r}"
            )
        return ATTN_IMPLEMENTATION

    # -- Hugging Face plumbing ---------------------------------------------------------------------

    # generate() runs a3lm's decoding, which registers itself here (a3lm.decoding.generation): the model layer
    # does not import the decoding layer. can_generate() gives the model a generation_config.
    _generate_fn: Callable[..., Any] | None = None

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """A3 decoding behind Hugging Face's generate() API: see `a3lm.decoding.generation.generate`."""
        if A3PreTrainedModel._generate_fn is None:
            raise RuntimeError("A3ForCausalLM.generate() needs a3lm's decoding: `import a3lm` first")
        return A3PreTrainedModel._generate_fn(self, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            std = self.config.query_init_std
            if std is None:  # children are initialised (or loaded) first: match the embeddings' scale
                emb = self.model.get_input_embeddings().weight
                std = (
                    float(emb.float().std())
                    if emb.device.type != "meta"
                    else self.config.text_config.initializer_range
                )
            init.normal_(self.query_embed, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Open an A3 checkpoint, or convert a plain decoder checkpoint (only `query_embed` is new)."""
        check_model_path(str(pretrained_model_name_or_path))
        hub_kwargs = {
            k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs
        }
        if config is None:
            # a3lm runs only the families it knows: never a checkpoint's own code
            config = AutoConfig.from_pretrained(
                pretrained_model_name_or_path, trust_remote_code=False, **hub_kwargs
            )
        if not isinstance(config, A3Config):
            config = A3Config(text_config=config)
        check_weights_fit(str(pretrained_model_name_or_path), lambda: cls(config))
        try:
            loaded = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                config=config,
                **{"trust_remote_code": False, **kwargs},
            )
        except SafetensorError as err:
            raise OSError(f"corrupt checkpoint in {pretrained_model_name_or_path}: {err}") from err
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        # the saved generation_config.json (GenerationMixin's loader, which A3 does not inherit, reads it
        # there)
        if kwargs.get("generation_config") is not None:
            model.generation_config = kwargs["generation_config"]
        elif not kwargs.get("gguf_file"):
            with contextlib.suppress(OSError):
                model.generation_config = GenerationConfig.from_pretrained(
                    pretrained_model_name_or_path, **hub_kwargs
                )
        return loaded

    @torch.no_grad()
    def init_query(self, seed: int) -> None:
        """Redraw the query vector from a generator seeded with `seed` (reproducible conversions)."""
        std = self.config.query_init_std
        if std is None:
            std = float(self.model.get_input_embeddings().weight.float().std())
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.query_embed.shape, generator=gen, dtype=torch.float32) * std
        self.query_embed.copy_(w.to(self.query_embed))

    @classmethod
    def from_base(cls, base: PreTrainedModel, query_init_std: float | None = None) -> A3PreTrainedModel:
        """Wrap an in-memory `*ForCausalLM` (weights copied, query vector fresh)."""
        text = base.config.to_dict()
        text.pop("quantization_config", None)  # a GGUF-loaded base holds dequantized floats
        model = cls(A3Config(text_config=text, query_init_std=query_init_std))
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        if set(missing) - {"query_embed", "lm_head.weight"} or unexpected:
            raise ValueError(f"base model does not match: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model._init_weights(model)  # the embeddings now hold the base's weights: rescale w to them
        return model.to(dtype=base.dtype, device=base.device)


class A3ForCausalLM(A3PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: A3Config):
        # The decoder is built with the two-stream attention (and the config's dtype): on a copy, so the
        # caller's config, and any plain model later built from it, keeps its own attention.
        config = copy.deepcopy(config)
        super().__init__(config)
        text = config.text_config
        check_supported(text)
        self.model = AutoModel.from_config(text, attn_implementation=ATTN_IMPLEMENTATION)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.query_embed = nn.Parameter(torch.empty(text.hidden_size))
        # Reuses the BlockMask of a grouping every sample shares (stages 1-2, fixed-order scoring).
        self.block_masks = BlockMaskCache()
        self.post_init()

    # -- forward ---------------------------------------------------------------------------------

    def stream_embeds(self, input_ids_BN: torch.Tensor, query_positions: int) -> torch.Tensor:
        """[content embeds of input_ids ; w repeated query_positions times]  [B, N + Q, H].

        w enters as an embedding row does: an embedding that scales its rows (Gemma's sqrt(hidden))
        scales w too, so w, drawn at the embedding weights' std, sits at the content rows' scale.
        """
        embed = self.get_input_embeddings()
        content = embed(input_ids_BN)
        query = self.query_embed.to(content.dtype)
        if (scale := getattr(embed, "embed_scale", None)) is not None:
            query = query * scale.to(content.dtype)
        return torch.cat([content, query.expand(content.shape[0], query_positions, -1)], dim=1)

    def logits(self, hidden_BNH: torch.Tensor) -> torch.Tensor:
        """The base model's logits [B, N, V] from final states: its lm_head, then what its `*ForCausalLM`
        does after it (Granite's logits_scaling, Gemma 2/3's final soft-capping)."""
        text = self.config.text_config
        logits = self.lm_head(hidden_BNH)
        if (scaling := getattr(text, "logits_scaling", None)) is not None:
            logits = logits / scaling
        if cap := getattr(text, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _run_decoder(
        self,
        content_ids_BC: torch.Tensor,
        num_queries: int,
        mask: torch.Tensor | BlockMask,
        position_ids: torch.Tensor,
        full_last_layer: bool,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The decoder on [content embeds ; w repeated num_queries times]: final states [B, C + Q, H].

        The one place the streams enter the decoder (training forward and cached decoding step alike).
        full_last_layer=False (for callers that read no content state): the last layer computes only
        its content rows' keys and values, and the returned content rows are meaningless.
        """
        n_content = content_ids_BC.shape[1]
        with _layer_savings(self.model, self.config, n_content, full_last_layer):
            return self.model(
                inputs_embeds=self.stream_embeds(content_ids_BC, num_queries),
                attention_mask=mask,
                position_ids=position_ids,
                a3_query_self_attention=self.config.query_self_attention,  # forwarded to `a3_attention`
                a3_last_layer_content_rows=None if full_last_layer else n_content,
                **kwargs,
            ).last_hidden_state

    @torch.no_grad()
    def decode_step(
        self,
        cache: ContentCache,
        content_ids_BC: torch.Tensor,
        content_positions_BC: torch.Tensor,
        content_groups_BC: torch.Tensor,
        content_valid_BC: torch.Tensor,
        query_positions_BQ: torch.Tensor,
        query_groups_BQ: torch.Tensor,
    ) -> torch.Tensor:
        """One cached decoding forward: append committed content to `cache`, score query slots.

        Input [content of the tokens just committed (C slots) ; query slots (Q slots)] against the
        cached content keys; returns logits [B, Q, V]. A query slot of group g sees cached content of
        groups < g (give it a group above every committed one to see them all); a content slot of group
        g sees groups <= g. Padded slots: content_valid False (kept as a never-attended key); a padded
        query slot's logits are meaningless. Each query slot sees its own K/V (the own-slot rule) through
        the mask's last Q columns; they are cropped from the cache after the step (no later row sees them).
        """
        B, C = content_ids_BC.shape
        Q = query_positions_BQ.shape[1]
        for name, t, width in (
            ("content_positions", content_positions_BC, C),
            ("content_groups", content_groups_BC, C),
            ("content_valid", content_valid_BC, C),
            ("query_groups", query_groups_BQ, Q),
        ):
            if t.shape != (B, width):
                raise ValueError(f"{name} must be [B, {width}] = {(B, width)}, got {tuple(t.shape)}")
        if cache.num_keys + C == 0:
            raise ValueError("the first cache step needs content to attend to (at least one known token)")
        cache.append(content_groups_BC, content_valid_BC, content_positions_BC)
        strict = torch.arange(C + Q, device=content_ids_BC.device) >= C  # query slots: earlier groups only
        mask = group_attention_mask(
            torch.cat([content_groups_BC, query_groups_BQ], dim=1),
            strict.expand(B, -1),
            cache.key_groups_BK,
            cache.key_valid_BK,
        )
        positions = torch.cat([content_positions_BC, query_positions_BQ], dim=1)
        masks = {
            "attention_mask": mask,
            **window_kwargs(self.config, mask, positions, cache.key_positions_BK, Q),
        }
        for name, m in masks.items():
            if self.config.query_self_attention and Q:
                m = torch.cat([m, own_slot_mask(C, Q, device=m.device).expand(B, 1, -1, -1)], dim=-1)
            if content_ids_BC.device.type == "cpu":  # the fused CPU kernel's form, once, not per layer
                m = additive_mask(m, self.get_input_embeddings().weight.dtype)
            masks[name] = m
        mask = masks.pop("attention_mask")
        cache_kwarg = {_cache_argument(type(self.model)): cache.kv}
        # Skipping the last layer's content rows pays for many rows (a prompt): for a few, the products
        # cost what they did and the hooks' overhead shows (4% of a one-token step).
        full_last_layer = C < MIN_SKIPPED_ROWS or Q == 0  # no query row: nothing left to skip to
        hidden = self._run_decoder(
            content_ids_BC, Q, mask, positions, full_last_layer, use_cache=True, **cache_kwarg, **masks
        )
        if Q:
            cache.kv.crop(-Q)
        return self.logits(hidden[:, C:])

    def two_stream_hidden_states(
        self,
        input_ids_BN: torch.Tensor,
        group_ids_BN: torch.Tensor,
        attention_mask_BN: torch.Tensor,
        position_ids_BN: torch.Tensor,
        keep_content: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Final (normed) states [B, 2N, H] of [content ; query] in the input's position order.

        keep_content=False: the content half of the result is not needed (only the query half feeds
        the lm_head), so the last layer computes little more than the content rows' keys and values.
        """
        N, device = input_ids_BN.shape[1], input_ids_BN.device
        perm = None
        # Group-sorted positions make every row's visible keys a prefix: FlexAttention skips the tiles
        # after it, the fused CPU kernel the chunks of keys after it. RoPE carries the true positions.
        flex = uses_flex(self.config, device)
        if flex or (device.type == "cpu" and N >= MIN_ROW_CHUNK):
            perm = sort_by_group(group_ids_BN, attention_mask_BN)
            input_ids_BN, group_ids_BN, attention_mask_BN, position_ids_BN = (
                t.gather(1, perm) for t in (input_ids_BN, group_ids_BN, attention_mask_BN, position_ids_BN)
            )
        if flex:
            mask = flex_two_stream_block_mask(
                group_ids_BN, attention_mask_BN, self.config.query_self_attention, cache=self.block_masks
            )
        else:
            mask = two_stream_mask(group_ids_BN, attention_mask_BN)  # built once, shared by every layer
            if (
                perm is not None
            ):  # 16 chunks over the 2N rows: fewer calls lose the prefixes' savings, more add overhead
                kwargs["a3_row_chunks"] = row_chunks(mask, max(MIN_ROW_CHUNK, 2 * N // 16))
            positions_2N = torch.cat([position_ids_BN, position_ids_BN], dim=1)
            kwargs.update(window_kwargs(self.config, mask, positions_2N, position_ids_BN, N))
            if device.type == "cpu":  # the fused CPU kernel's form, converted once, not per layer
                dtype = self.get_input_embeddings().weight.dtype
                mask = additive_mask(mask, dtype)
                if "a3_window_mask" in kwargs:
                    kwargs["a3_window_mask"] = additive_mask(kwargs["a3_window_mask"], dtype)
        # Checkpointed layers rerun in backward, after the hooks are gone: keep the last layer whole then.
        full_last_layer = keep_content or self.model.is_activation_checkpointing
        position_ids = torch.cat([position_ids_BN, position_ids_BN], dim=1)
        hidden = self._run_decoder(
            input_ids_BN, N, mask, position_ids, full_last_layer, use_cache=False, **kwargs
        )
        if perm is not None:  # back to position order
            inverse = perm.argsort(dim=1)
            hidden = Reorder.apply(
                hidden, torch.cat([inverse, inverse + N], dim=1), torch.cat([perm, perm + N], dim=1)
            )
        return hidden

    def forward(
        self,
        input_ids: torch.LongTensor,
        group_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_content_hidden_states: bool = False,
        **kwargs: Any,
    ) -> A3Output:
        """input_ids, group_ids, attention_mask, labels, position_ids: [B, N].

        group_ids default to left-to-right singletons (plain AR). labels use -100 for "no loss";
        labels in each sample's earliest group (context only, like HF's label shift dropping the first
        token) and on padding are ignored.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
        B, N = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {(B, N)}")
        if group_ids is None:
            group_ids = left_to_right(attention_mask)
        validate_group_ids(group_ids, attention_mask, input_ids=input_ids)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        max_pos = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_pos is not None and int(position_ids.max()) >= max_pos:
            raise ValueError(
                f"sequence positions up to {int(position_ids.max())} exceed the model's maximum {max_pos}"
            )

        group_ids = group_ids.to(input_ids.device)
        hidden = self.two_stream_hidden_states(
            input_ids,
            group_ids,
            attention_mask,
            position_ids,
            keep_content=output_content_hidden_states,
            **kwargs,
        )
        logits = self.logits(hidden[:, N:])  # the lm_head runs on the query half only

        loss = num_targets = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {(B, N)}")
            targets = predictable(group_ids, attention_mask) & (labels != -100)
            num_targets = targets.sum()
            if int(num_targets) == 0:
                raise ValueError(
                    "no predictable target in the batch: every label is -100, padding or context"
                )
            # ignore_index rather than logits[targets]: no [B, N, V] gather copy (and its backward's zeros)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.masked_fill(~targets, -100).flatten())
        return A3Output(
            loss=loss,
            logits=logits,
            content_hidden_states=hidden[:, :N] if output_content_hidden_states else None,
            num_targets=num_targets,
        )


AutoConfig.register("a3", A3Config)
AutoModelForCausalLM.register(A3Config, A3ForCausalLM)
