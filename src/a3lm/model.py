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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from safetensors import SafetensorError
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import ModelOutput

from .groups import PAD_GROUP, left_to_right, predictable, validate_group_ids
from .masks import (
    BlockMaskCache,
    additive_mask,
    flex_two_stream_block_mask,
    group_attention_mask,
    own_slot_mask,
    row_chunks,
    sort_by_group,
    two_stream_mask,
)

if TYPE_CHECKING:
    from .cache import ContentCache

ATTN_IMPLEMENTATION = "a3"
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
# From this many positions on, the CPU forward sorts them by group and runs attention by chunks of at
# least this many rows, each over its key prefix (`masks.row_chunks`).
MIN_ROW_CHUNK = 64
Chunks = list[tuple[int, int, int]] | None  # (start row, end row, n_keys) per chunk, or None: one call
MIN_SKIPPED_ROWS = 16  # a decoding step skips its content rows in the last layer from this many on


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _repeat_kv(key: torch.Tensor, value: torch.Tensor, n_heads: int):
    if key.shape[1] == n_heads:
        return key, value
    rep = n_heads // key.shape[1]
    return key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)


def _attend_with_self(query, key, value, own_key, own_value, mask, scaling, dropout=0.0):
    """Dense reference (and the dropout path): softmax over the masked content keys plus each row's own slot.

    query/own_key/own_value [B, H, S, D]; key/value [B, H, K, D]; mask [B, 1, S, K] (bool). It
    materialises [B, H, S, K] scores; `TwoStreamAttention` computes the same without them.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    own = (query * own_key).sum(-1, keepdim=True)
    probs = torch.softmax(torch.cat([scores, own], dim=-1).float() * scale, dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout) if dropout else probs
    return torch.matmul(probs[..., :-1], value) + probs[..., -1:] * own_value


def _own_slot_score(query_BHSD: torch.Tensor, own_key_BGSD: torch.Tensor) -> torch.Tensor:
    """q . k_own per row [B, H, S], with G = H / rep KV heads broadcast (no repeated copies)."""
    B, H, S, D = query_BHSD.shape
    q = query_BHSD.unflatten(1, (own_key_BGSD.shape[1], -1))  # [B, G, rep, S, D]
    return (q * own_key_BGSD[:, :, None]).sum(-1).flatten(1, 2)


def _per_kv_head(x_BHSD: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, G, S, D]: sum over the query heads that share a KV head (GQA gradients)."""
    return x_BHSD.unflatten(1, (n_kv_heads, -1)).sum(2)


def _broadcast_kv(x_BGSD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, G, S, D] -> a [B, H, S, D] view (each KV head shared by H / G query heads, no copy)."""
    B, G, S, D = x_BGSD.shape
    return x_BGSD[:, :, None].expand(B, G, n_heads // G, S, D).flatten(1, 2)


def _flash(query, key, value, bias, scale: float, chunks: Chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU flash attention (out [B, H, R, D], lse [B, H, R]), by chunks of rows over their key prefixes."""
    if chunks is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=bias, scale=scale)
    outs, lses = zip(*(
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[:, :, r0:r1], key[:, :, :n], value[:, :, :n], attn_mask=bias[:, :, r0:r1, :n], scale=scale
        )
        for r0, r1, n in chunks
    ), strict=True)  # fmt: skip
    # Joined in the kernel's own [B, R, H, D] memory order, so that the caller's transpose back to it
    # stays a view: a copy there would be one more activation per layer kept for backward.
    out = torch.cat([o.transpose(1, 2) for o in outs], dim=1).transpose(1, 2)
    return out, torch.cat(lses, dim=2)


def _flash_backward(grad_out, query, key, value, out, lse, bias, scale: float, chunks: Chunks):
    """`_flash`'s backward: dq [B, H, R, D], dk and dv [B, G, K, D] (each chunk adds to its key prefix)."""
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if chunks is None:
        return backward(grad_out, query, key, value, out, lse, 0.0, False, attn_mask=bias, scale=scale)
    dq, dk, dv = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
    for r0, r1, n in chunks:
        rows = slice(r0, r1)
        dq_c, dk_c, dv_c = backward(
            grad_out[:, :, rows], query[:, :, rows], key[:, :, :n], value[:, :, :n], out[:, :, rows].contiguous(),
            lse[:, :, rows].contiguous(), 0.0, False, attn_mask=bias[:, :, rows, :n], scale=scale,
        )  # fmt: skip
        dq[:, :, rows] = dq_c
        dk[:, :, :n] += dk_c
        dv[:, :, :n] += dv_c
    return dq, dk, dv


def _two_stream_flash(query, key, value, bias, n_self: int, scale: float, chunks: Chunks = None):
    """`TwoStreamAttention`'s forward (out [B, H, R, D], lse [B, H, R]); called alone where no gradient flows."""
    K = bias.shape[-1]
    out, lse = _flash(query, key[:, :, :K], value[:, :, :K], bias, scale, chunks)
    if n_self:
        rows = slice(query.shape[2] - n_self, None)
        own = _own_slot_score(query[:, :, rows], key[:, :, K:]).to(lse.dtype) * scale
        lse_c = lse[:, :, rows]
        merged = torch.logaddexp(lse_c, own)
        p_own = (own - merged).exp().to(out.dtype)[..., None]
        out_c = out[:, :, rows]
        out_c.add_(p_own * (_broadcast_kv(value[:, :, K:], query.shape[1]) - out_c))
        lse_c.copy_(merged)
    return out, lse


class TwoStreamAttention(torch.autograd.Function):
    """Fused two-stream attention: every row over the masked content keys, the last S rows also over
    their own slot, without materialising a score matrix.

    One CPU flash-attention call (GQA broadcast in the kernel) gives each row's output over the content
    keys and its log-sum-exp; the own slot is one extra score s per row, merged analytically:
    lse = logaddexp(lse_c, s), out = out_c + exp(s - lse) (v_own - out_c). Backward: flash attention's
    backward with the *merged* output and lse is exactly the content keys' part of the gradient of the
    softmax over [content ; own] (its probabilities exp(s_j - lse) and row term rowsum(dO * out) are
    the merged ones); the own slot adds one rank-one term per row.

    query [B, H, R, D]; key/value [B, G, K + S, D]; bias [B, 1, R, K] additive (0 / -inf) in the query's
    dtype, every row with at least one visible key. chunks: rows by chunks, each over the key prefix
    its rows see (`masks.row_chunks`), or None for one call over every key.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, n_self: int, scale: float, chunks: Chunks = None):
        out, lse = _two_stream_flash(query, key, value, bias, n_self, scale, chunks)
        ctx.save_for_backward(query, key, value, bias, out, lse)
        ctx.n_self, ctx.scale, ctx.chunks = n_self, scale, chunks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, bias, out, lse = ctx.saved_tensors
        n_self, scale, K = ctx.n_self, ctx.scale, bias.shape[-1]
        grad_out = grad_out.contiguous()
        dq, dk, dv = _flash_backward(grad_out, query, key[:, :, :K], value[:, :, :K], out, lse, bias, scale, ctx.chunks)
        if not n_self:
            return dq, dk, dv, None, None, None, None
        G, rows = key.shape[1], slice(query.shape[2] - n_self, None)
        q, g, o, own_k, own_v = query[:, :, rows], grad_out[:, :, rows], out[:, :, rows], key[:, :, K:], value[:, :, K:]
        p_own = (_own_slot_score(q, own_k).to(lse.dtype) * scale - lse[:, :, rows]).exp().to(q.dtype)[..., None]
        # d score_own = p_own (dO . v_own - rowsum(dO * out)), times the softmax scale
        d_own = p_own * ((g * _broadcast_kv(own_v, q.shape[1])).sum(-1, keepdim=True) - (g * o).sum(-1, keepdim=True))
        d_own = d_own * scale
        dq[:, :, rows] += d_own * _broadcast_kv(own_k, q.shape[1])
        dk = torch.cat([dk, _per_kv_head(d_own * q, G)], dim=2)
        dv = torch.cat([dv, _per_kv_head(p_own * g, G)], dim=2)
        return dq, dk, dv, None, None, None, None


def a3_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | BlockMask,
    scaling: float | None = None,
    dropout: float = 0.0,
    a3_query_self_attention: bool | None = None,
    a3_last_layer_content_rows: int | None = None,
    a3_row_chunks: Chunks = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Two-stream attention. query [B, H, R, D] (content rows, then query-stream rows); key/value
    [B, Hkv, K + S, D] (content keys, then the S query-stream slots' own keys).

    A dense mask [B, 1, R, K] (bool, or additive 0 / -inf) covers the first K keys. In training it
    covers the content keys only: query-stream keys are cut before the matmul rather than masked, which
    halves a dense [2N, 2N] mask's work, and the own slots are merged analytically. A decoding step's
    mask also covers its few query slots' own keys (`masks.own_slot_mask`): one kernel call. With
    `a3_query_self_attention` (`A3Config.query_self_attention`, passed down the decoder's forward
    kwargs by `A3ForCausalLM`), each query-stream row also attends to its own slot (the diagonal), so
    a query that sees a single content key (BOS) still learns where it is: RoPE needs two keys at
    different distances to tell positions apart. A FlexAttention BlockMask (CUDA) carries the whole
    pattern itself and skips empty tiles.

    `a3_last_layer_content_rows` (set when the caller reads no content state): the decoder's last
    layer computes only the rows after these, and returns zeros for them. `a3_row_chunks` (CPU
    training forward over group-sorted positions): the fused kernel runs by chunks of rows, each over
    the key prefix its rows see.
    """
    if isinstance(attention_mask, BlockMask):
        n_keys = attention_mask.seq_lengths[1]
        key, value = key[:, :, :n_keys], value[:, :, :n_keys]
        gqa = key.shape[1] != query.shape[1]
        if query.is_cuda:
            out = _compiled_flex_attention()(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
        else:
            with warnings.catch_warnings():  # eager flex on CPU is the test path: unfused is expected
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = flex_attention(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None or attention_mask.dim() != 4:
        raise ValueError("a3 attention needs the explicit 4D two-stream mask")
    if a3_query_self_attention is None:  # a silent default would pick one of two different models
        raise ValueError("a3 attention needs a3_query_self_attention in the decoder's forward kwargs")
    n_content = attention_mask.shape[-1]
    n_self = key.shape[2] - n_content if a3_query_self_attention else 0
    key, value = key[:, :, : n_content + n_self], value[:, :, : n_content + n_self]
    skipped = (a3_last_layer_content_rows or 0) if _is_last_layer(module) else 0
    query, attention_mask = query[:, :, skipped:], attention_mask[:, :, skipped:]
    if skipped and a3_row_chunks is not None:
        a3_row_chunks = [(max(r0, skipped) - skipped, r1 - skipped, n) for r0, r1, n in a3_row_chunks if r1 > skipped]
    dropout = dropout if module.training else 0.0
    if query.device.type == "cpu" and not dropout:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if torch.is_autocast_enabled("cpu"):  # as autocast does for SDPA: RoPE leaves q, k in fp32, v in bf16
            query, key, value = (t.to(torch.get_autocast_dtype("cpu")) for t in (query, key, value))
        bias = additive_mask(attention_mask, query.dtype)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        out = TwoStreamAttention.apply(query, key, value, bias, n_self, scale, a3_row_chunks) if needs_grad else (
            _two_stream_flash(query, key, value, bias, n_self, scale, a3_row_chunks)[0]
        )
    else:
        out = _dense_two_stream(query, key, value, attention_mask, n_self, scaling, dropout)
    out = out.transpose(1, 2)
    if skipped:
        out = _zeros_before(out, skipped)
    return out.contiguous(), None


def _zeros_before(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, R, ...] preceded by `rows` zero rows along dim 1: the skipped content rows' place."""
    return torch.cat([x.new_zeros(x.shape[0], rows, *x.shape[2:]), x], dim=1)


def _is_last_layer(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return config is not None and getattr(module, "layer_idx", None) == config.num_hidden_layers - 1


def _dense_two_stream(query, key, value, mask, n_self: int, scaling, dropout: float) -> torch.Tensor:
    """Reference two-stream attention with a dense mask (CUDA's sdpa backend, dropout): [B, H, R, D]."""
    mask = mask if mask.dtype == torch.bool else mask == 0
    n_content = mask.shape[-1]
    key, value = _repeat_kv(key, value, query.shape[1])
    if n_self == 0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    rows_content = query.shape[2] - n_self
    out_query = _attend_with_self(
        query[:, :, rows_content:], key[:, :, :n_content], value[:, :, :n_content],
        key[:, :, n_content:], value[:, :, n_content:], mask[:, :, rows_content:], scaling, dropout,
    )  # fmt: skip
    if rows_content:
        out_content = F.scaled_dot_product_attention(
            query[:, :, :rows_content], key[:, :, :n_content], value[:, :, :n_content],
            attn_mask=mask[:, :, :rows_content], dropout_p=dropout, scale=scaling,
        )  # fmt: skip
        out_query = torch.cat([out_content, out_query], dim=2)
    return out_query


AttentionInterface.register(ATTN_IMPLEMENTATION, a3_attention)
# Without a mask function under the same name the 2D-mask path would hand the layer `None`.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@strict
class A3Config(PretrainedConfig):
    """An A3 model = a decoder config (`text_config`) + the query vector's initial scale.

    query_init_std: std of the query vector at initialisation; None = the std of the token
    embeddings (measured on the loaded embeddings when converting a pretrained checkpoint).
    query_self_attention: each query-stream slot also attends to its own slot (never to another's).
    Without it, a query seeing one content key (BOS only) is blind to its position: attention over a
    single key returns that key's value wherever the query sits, so every such position gets the same
    distribution. Its own slot depends only on earlier groups, so nothing leaks. False = XLNet's rule.
    attention_backend: "sdpa" (dense mask), "flex" (FlexAttention BlockMask over group-sorted
    positions), or "auto" = flex on CUDA, sdpa elsewhere.
    recompute_mlp: in training, gated MLPs (Llama, Qwen2, Mistral) keep only gate_proj(x) and
    up_proj(x) for backward and rebuild act(gate) * up there (`GatedDown`): the same values and
    gradients, two [rows, intermediate] activations fewer per layer (the two streams double the rows,
    and these are the largest activations), for two elementwise ops in backward.
    All are read at every forward, so changing them on a built model's config takes effect at once.
    """

    model_type = "a3"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PretrainedConfig | None = None
    query_init_std: float | None = None
    query_self_attention: bool = True
    attention_backend: str = "auto"
    recompute_mlp: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        # Held as given, the caller's decoder config would be reset to this config's attention
        # implementation (the base post-init sets it on every sub-config) and share every later change.
        if isinstance(self.text_config, PretrainedConfig):
            self.text_config = copy.deepcopy(self.text_config)
        super().__post_init__(**kwargs)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}; choose {', '.join(ATTENTION_BACKENDS)}")
        # The decoder config owns the tying flag; the composite model reads it from here.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


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


class _Reorder(torch.autograd.Function):
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
        return _zeros_before(out, n_content)

    handles = [
        h for m in modules if m is not None for h in (m.register_forward_pre_hook(query_half), m.register_forward_hook(pad_content))
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


GATED_MLPS = ("LlamaMLP", "Qwen2MLP", "MistralMLP")  # forward = down_proj(act_fn(gate_proj(x)) * up_proj(x))


class GatedDown(torch.autograd.Function):
    """down_proj(act(gate) * up) that keeps only gate and up for backward.

    Backward rebuilds h = act(gate) * up (elementwise) for down_proj's weight gradient and act's own
    backward; down_proj's product is not rerun, as a checkpointed MLP would. Under autocast the
    products run in the forward output's dtype, as autocast's linear does.
    gate, up [..., I]; weight [H, I]; bias [H] or None; returns [..., H].
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, act_fn):
        out = F.linear(act_fn(gate) * up, weight, bias)
        ctx.save_for_backward(gate, up, weight)
        ctx.act_fn, ctx.has_bias, ctx.compute_dtype = act_fn, bias is not None, out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            gate_, up_ = gate.detach().requires_grad_(), up.detach().requires_grad_()
            h = ctx.act_fn(gate_) * up_
        dt, needs = ctx.compute_dtype, ctx.needs_input_grad
        grad_out = grad_out.to(dt)
        rows_out = grad_out.flatten(0, -2)
        grad_weight = (rows_out.T @ h.detach().to(dt).flatten(0, -2)).to(weight.dtype) if needs[2] else None
        grad_bias = rows_out.sum(0).to(weight.dtype) if ctx.has_bias and needs[3] else None
        grad_gate = grad_up = None
        if needs[0] or needs[1]:
            grad_h = (grad_out @ weight.to(dt)).to(h.dtype)
            grad_gate, grad_up = torch.autograd.grad(h, (gate_, up_), grad_h)
        return grad_gate, grad_up, grad_weight, grad_bias, None


def _recomputing_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's own ops in its order; act(gate) * up is rebuilt in backward, not kept."""
    down = mlp.down_proj
    return GatedDown.apply(mlp.gate_proj(x), mlp.up_proj(x), down.weight, down.bias, mlp.act_fn)


@contextlib.contextmanager
def _recompute_gated_mlps(decoder: nn.Module):
    """Gated MLPs keep gate and up only for backward while the context is open (hooks on a module,
    such as the last-layer skip, still run around it). Other MLP classes are left as they are, and so
    is an MLP whose forward is already replaced on the instance (accelerate's offloading hooks)."""
    mlps = [
        m for m in decoder.modules()
        if type(m).__name__ in GATED_MLPS and "forward" not in vars(m) and type(m.down_proj) is nn.Linear
    ]
    for mlp in mlps:
        mlp.forward = functools.partial(_recomputing_forward, mlp)
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward  # back to the class's forward


class A3PreTrainedModel(PreTrainedModel):
    config_class = A3Config
    config: A3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # No `_no_split_modules` here: `post_init` gathers the wrapped decoder's own (its layer class, e.g.
    # LlamaDecoderLayer), so FSDP and device maps split any decoder family at its layers.

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Always the two-stream function: the decoder's other implementations know nothing of the two
        streams (the content-only key axis, the own slot), so a request for one is refused, not ignored."""
        if requested_attention not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(
                f"an A3 model runs its own two-stream attention ({ATTN_IMPLEMENTATION!r}), "
                f"not attn_implementation={requested_attention!r}"
            )
        return ATTN_IMPLEMENTATION


def _check_full_attention(text_config: PretrainedConfig) -> None:
    """The two-stream masks span every key: a decoder whose layers attend within a sliding window
    (Mistral v0.1, Qwen2 with use_sliding_window) would silently stop being its base model."""
    window = getattr(text_config, "sliding_window", None)
    if getattr(text_config, "use_sliding_window", True) is False:
        window = None
    sliding = "sliding_attention" in (getattr(text_config, "layer_types", None) or [])
    max_pos = getattr(text_config, "max_position_embeddings", None)
    if sliding or (window is not None and (max_pos is None or window < max_pos)):
        raise ValueError(
            f"{text_config.model_type} attends within a sliding window of {window} tokens, which A3's two-stream "
            "attention does not model: use a decoder with full attention (or set sliding_window to None)"
        )


class A3ForCausalLM(A3PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: A3Config):
        # The decoder is built with the two-stream attention (and the config's dtype): on a copy, so the
        # caller's config, and any plain model later built from it, keeps its own attention.
        config = copy.deepcopy(config)
        super().__init__(config)
        text = config.text_config
        _check_full_attention(text)
        self.model = AutoModel.from_config(text, attn_implementation=ATTN_IMPLEMENTATION)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.query_embed = nn.Parameter(torch.empty(text.hidden_size))
        # Reuses the BlockMask of a grouping every sample shares (stages 1-2, fixed-order scoring).
        self.block_masks = BlockMaskCache()
        self.post_init()

    # -- Hugging Face plumbing ---------------------------------------------------------------------

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
                std = float(emb.float().std()) if emb.device.type != "meta" else self.config.text_config.initializer_range
            init.normal_(self.query_embed, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Open an A3 checkpoint, or convert a plain decoder checkpoint (only `query_embed` is new)."""
        check_model_path(str(pretrained_model_name_or_path))
        if config is None:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if not isinstance(config, A3Config):
            config = A3Config(text_config=config)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        except SafetensorError as err:
            raise OSError(f"corrupt checkpoint in {pretrained_model_name_or_path}: {err}") from err

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
    def from_base(cls, base: PreTrainedModel, query_init_std: float | None = None) -> A3ForCausalLM:
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

    # -- forward ---------------------------------------------------------------------------------

    def stream_embeds(self, input_ids_BN: torch.Tensor, query_positions: int) -> torch.Tensor:
        """[content embeds of input_ids ; w repeated query_positions times]  [B, N + Q, H]."""
        content = self.get_input_embeddings()(input_ids_BN)
        query = self.query_embed.to(content.dtype).expand(content.shape[0], query_positions, -1)
        return torch.cat([content, query], dim=1)

    def uses_flex(self, device: torch.device) -> bool:
        backend = self.config.attention_backend
        return backend == "flex" or (backend == "auto" and device.type == "cuda")

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
        skip = contextlib.nullcontext() if full_last_layer else _last_layer_query_rows_only(self.model, n_content)
        # Checkpointed layers already rerun everything in backward: recomputing inside them would run twice.
        recompute = self.config.recompute_mlp and torch.is_grad_enabled() and not self.model.is_activation_checkpointing
        with skip, _recompute_gated_mlps(self.model) if recompute else contextlib.nullcontext():
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
        for name, t, width in (("content_positions", content_positions_BC, C), ("content_groups", content_groups_BC, C),
                               ("content_valid", content_valid_BC, C), ("query_groups", query_groups_BQ, Q)):  # fmt: skip
            if t.shape != (B, width):
                raise ValueError(f"{name} must be [B, {width}] = {(B, width)}, got {tuple(t.shape)}")
        if cache.num_keys + C == 0:
            raise ValueError("the first cache step needs content to attend to (at least one known token)")
        cache.append(content_groups_BC, content_valid_BC)
        strict = torch.arange(C + Q, device=content_ids_BC.device) >= C  # query slots: earlier groups only
        mask = group_attention_mask(
            torch.cat([content_groups_BC, query_groups_BQ], dim=1), strict.expand(B, -1), cache.key_groups_BK, cache.key_valid_BK
        )
        if self.config.query_self_attention and Q:
            mask = torch.cat([mask, own_slot_mask(C, Q, device=mask.device).expand(B, 1, -1, -1)], dim=-1)
        if content_ids_BC.device.type == "cpu":  # the fused CPU kernel's form, converted once, not per layer
            mask = additive_mask(mask, self.get_input_embeddings().weight.dtype)
        positions = torch.cat([content_positions_BC, query_positions_BQ], dim=1)
        cache_kwarg = {_cache_argument(type(self.model)): cache.kv}
        # Skipping the last layer's content rows pays for many rows (a prompt): for a few, the products
        # cost what they did and the hooks' overhead shows (4% of a one-token step).
        full_last_layer = C < MIN_SKIPPED_ROWS or Q == 0  # no query row: nothing left to skip to
        hidden = self._run_decoder(content_ids_BC, Q, mask, positions, full_last_layer, use_cache=True, **cache_kwarg)
        if Q:
            cache.kv.crop(-Q)
        return self.lm_head(hidden[:, C:])

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
        flex = self.uses_flex(device)
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
            if perm is not None:  # 16 chunks over the 2N rows: fewer calls lose the prefixes' savings, more add overhead
                kwargs["a3_row_chunks"] = row_chunks(mask, max(MIN_ROW_CHUNK, 2 * N // 16))
            if device.type == "cpu":  # the fused CPU kernel's form, converted once, not per layer
                mask = additive_mask(mask, self.get_input_embeddings().weight.dtype)
        # Checkpointed layers rerun in backward, after the hooks are gone: keep the last layer whole then.
        full_last_layer = keep_content or self.model.is_activation_checkpointing
        position_ids = torch.cat([position_ids_BN, position_ids_BN], dim=1)
        hidden = self._run_decoder(input_ids_BN, N, mask, position_ids, full_last_layer, use_cache=False, **kwargs)
        if perm is not None:  # back to position order
            inverse = perm.argsort(dim=1)
            hidden = _Reorder.apply(hidden, torch.cat([inverse, inverse + N], dim=1), torch.cat([perm, perm + N], dim=1))
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
            raise ValueError(f"sequence positions up to {int(position_ids.max())} exceed the model's maximum {max_pos}")

        group_ids = group_ids.to(input_ids.device)
        hidden = self.two_stream_hidden_states(
            input_ids, group_ids, attention_mask, position_ids, keep_content=output_content_hidden_states, **kwargs
        )
        logits = self.lm_head(hidden[:, N:])  # the lm_head runs on the query half only

        loss = num_targets = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {(B, N)}")
            targets = predictable(group_ids, attention_mask) & (labels != -100)
            num_targets = targets.sum()
            if int(num_targets) == 0:
                raise ValueError("no predictable target in the batch: every label is -100, padding or context")
            # ignore_index rather than logits[targets]: no [B, N, V] gather copy (and its backward's zeros)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.masked_fill(~targets, -100).flatten())
        return A3Output(
            loss=loss,
            logits=logits,
            content_hidden_states=hidden[:, :N] if output_content_hidden_states else None,
            num_targets=num_targets,
        )


def check_model_path(path: str, what: str = "model") -> None:
    """A path that names a local folder must be one holding config.json; a Hub id (org/name) passes.
    A path whose first folder exists here (runs/typo) is local: a typo must not become a Hub request."""
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1 or p.exists()
    if not (looks_local or Path(p.parts[0]).is_dir()):
        return
    if not p.is_dir():
        raise FileNotFoundError(f"no {what} folder at {path}: expected a save_pretrained directory (or a Hub id org/name)")
    from .run_folder import CHECKPOINTS_DIR, FINAL_DIR  # here: the model module does not depend on training

    if (p / CHECKPOINTS_DIR).is_dir() or (p / FINAL_DIR / "config.json").is_file():  # `a3lm train`'s output
        raise FileNotFoundError(f"{path} is a training run folder: its model is {p / FINAL_DIR}")
    if what == "model" and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face model folder")


def require_a3(path: str) -> None:
    """Refuse a plain decoder where an A3 model is needed (sampling, scoring): its query vector would
    be random and every prediction garbage. The message says how to get an A3 checkpoint."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{path} is a file, not a model folder")
    check_model_path(path)
    model_type = getattr(AutoConfig.from_pretrained(path), "model_type", None)
    if model_type != "a3":
        raise ValueError(
            f"{path} is a plain {model_type} decoder, not an A3 model (its query vector would be random): "
            f"run `a3lm convert {path} OUT` (zero-shot) or `a3lm train --model {path}` first"
        )


AutoConfig.register("a3", A3Config)
AutoModelForCausalLM.register(A3Config, A3ForCausalLM)

__all__ = [
    "A3Config", "A3ForCausalLM", "A3Output", "PAD_GROUP", "check_model_path", "default_position_ids", "max_positions", "require_a3",
]  # fmt: skip
