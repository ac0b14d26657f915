"""Two-stream attention: the fused CPU kernel, the dense reference, and their registration with
transformers."""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import (
    AttentionInterface,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from a3lm.model.masks import (
    additive_mask,
)

ATTN_IMPLEMENTATION = "a3"
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
Chunks = list[tuple[int, int, int]] | None  # (start row, end row, n_keys) per chunk, or None: one call


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _repeat_kv(key: torch.Tensor, value: torch.Tensor, n_heads: int):
    if key.shape[1] == n_heads:
        return key, value
    rep = n_heads // key.shape[1]
    return key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)


def _attend_with_self(query, key, value, own_key, own_value, mask, scaling, dropout=0.0, softcap=None):
    """Dense reference (and the dropout and soft-capping path): softmax over the masked content keys
    plus each row's own slot (none when own_key is None).

    query/own_key/own_value [B, H, S, D]; key/value [B, H, K, D]; mask [B, 1, S, K] (bool). It
    materialises [B, H, S, K] scores; `TwoStreamAttention` computes the same without them. softcap
    (Gemma 2): scores become softcap * tanh(scores / softcap) before the mask, as in the base model.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2))
    if own_key is not None:
        scores = torch.cat([scores, (query * own_key).sum(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], 1)], dim=-1)
    scores = scores.float() * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout) if dropout else probs
    if own_key is None:
        return torch.matmul(probs, value)
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
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, attn_mask=bias, scale=scale
        )
    outs, lses = zip(
        *(
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[:, :, r0:r1],
                key[:, :, :n],
                value[:, :, :n],
                attn_mask=bias[:, :, r0:r1, :n],
                scale=scale,
            )
            for r0, r1, n in chunks
        ),
        strict=True,
    )
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
            grad_out[:, :, rows],
            query[:, :, rows],
            key[:, :, :n],
            value[:, :, :n],
            out[:, :, rows].contiguous(),
            lse[:, :, rows].contiguous(),
            0.0,
            False,
            attn_mask=bias[:, :, rows, :n],
            scale=scale,
        )
        dq[:, :, rows] = dq_c
        dk[:, :, :n] += dk_c
        dv[:, :, :n] += dv_c
    return dq, dk, dv


def two_stream_flash(query, key, value, bias, n_self: int, scale: float, chunks: Chunks = None, blind=None):
    """`TwoStreamAttention`'s forward (out [B, H, R, D], lse [B, H, R]); called alone where no gradient flows.

    blind [B, 1, n_self] (windowed layers): query rows that see no content key, only their own slot.
    The kernel returns out 0 and lse 0 for such a row; its lse over no key is -inf, set here.
    """
    K = bias.shape[-1]
    out, lse = _flash(query, key[:, :, :K], value[:, :, :K], bias, scale, chunks)
    if n_self:
        rows = slice(query.shape[2] - n_self, None)
        own = _own_slot_score(query[:, :, rows], key[:, :, K:]).to(lse.dtype) * scale
        lse_c = lse[:, :, rows]
        if blind is not None:
            lse_c.masked_fill_(blind, float("-inf"))
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
    dtype, every row with at least one visible key, or (`blind` rows, windowed layers) a query row with
    its own slot alone. chunks: rows by chunks, each over the key prefix its rows see
    (`masks.row_chunks`), or None for one call over every key.
    """

    @staticmethod
    def forward(ctx, query, key, value, bias, n_self: int, scale: float, chunks: Chunks = None, blind=None):
        out, lse = two_stream_flash(query, key, value, bias, n_self, scale, chunks, blind)
        ctx.save_for_backward(query, key, value, bias, out, lse)
        ctx.n_self, ctx.scale, ctx.chunks = n_self, scale, chunks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, bias, out, lse = ctx.saved_tensors
        n_self, scale, K = ctx.n_self, ctx.scale, bias.shape[-1]
        grad_out = grad_out.contiguous()
        dq, dk, dv = _flash_backward(
            grad_out, query, key[:, :, :K], value[:, :, :K], out, lse, bias, scale, ctx.chunks
        )
        if not n_self:
            return dq, dk, dv, None, None, None, None, None
        G, rows = key.shape[1], slice(query.shape[2] - n_self, None)
        q, g, o, own_k, own_v = (
            query[:, :, rows],
            grad_out[:, :, rows],
            out[:, :, rows],
            key[:, :, K:],
            value[:, :, K:],
        )
        p_own = (
            (_own_slot_score(q, own_k).to(lse.dtype) * scale - lse[:, :, rows]).exp().to(q.dtype)[..., None]
        )
        # d score_own = p_own (dO . v_own - rowsum(dO * out)), times the softmax scale
        d_own = p_own * (
            (g * _broadcast_kv(own_v, q.shape[1])).sum(-1, keepdim=True) - (g * o).sum(-1, keepdim=True)
        )
        d_own = d_own * scale
        dq[:, :, rows] += d_own * _broadcast_kv(own_k, q.shape[1])
        dk = torch.cat([dk, _per_kv_head(d_own * q, G)], dim=2)
        dv = torch.cat([dv, _per_kv_head(p_own * g, G)], dim=2)
        return dq, dk, dv, None, None, None, None, None


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
    sliding_window: int | None = None,
    softcap: float | None = None,
    a3_window_mask: torch.Tensor | BlockMask | None = None,
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

    `sliding_window` (set by the decoder's windowed layers: Mistral, Gemma 2/3 local layers, ...):
    the layer attends through `a3_window_mask`, the two-stream mask cut to the window
    (`masks.windowed_mask`), built once by `A3ForCausalLM` for every windowed layer. `softcap`
    (Gemma 2): attention logits are soft-capped, which the fused CPU kernel cannot do: such layers
    run the dense reference.
    """
    if isinstance(attention_mask, BlockMask):
        n_keys = attention_mask.seq_lengths[1]
        key, value = key[:, :, :n_keys], value[:, :, :n_keys]
        gqa = key.shape[1] != query.shape[1]
        if query.is_cuda:
            out = _compiled_flex_attention()(
                query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa
            )
        else:
            with warnings.catch_warnings():  # eager flex on CPU is the test path: unfused is expected
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                out = flex_attention(
                    query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=gqa
                )
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None or attention_mask.dim() != 4:
        raise ValueError("a3 attention needs the explicit 4D two-stream mask")
    if a3_query_self_attention is None:  # a silent default would pick one of two different models
        raise ValueError("a3 attention needs a3_query_self_attention in the decoder's forward kwargs")
    if sliding_window is not None:
        if a3_window_mask is None:  # the full mask would silently widen the layer's window
            raise ValueError("a windowed layer needs a3_window_mask in the decoder's forward kwargs")
        attention_mask = a3_window_mask
    n_content = attention_mask.shape[-1]
    n_self = key.shape[2] - n_content if a3_query_self_attention else 0
    key, value = key[:, :, : n_content + n_self], value[:, :, : n_content + n_self]
    skipped = (a3_last_layer_content_rows or 0) if _is_last_layer(module) else 0
    query, attention_mask = query[:, :, skipped:], attention_mask[:, :, skipped:]
    if skipped and a3_row_chunks is not None:
        a3_row_chunks = [
            (max(r0, skipped) - skipped, r1 - skipped, n) for r0, r1, n in a3_row_chunks if r1 > skipped
        ]
    dropout = dropout if module.training else 0.0
    if query.device.type == "cpu" and not dropout and not softcap:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if torch.is_autocast_enabled("cpu"):  # as autocast does for SDPA: RoPE leaves q, k in fp32, v in bf16
            query, key, value = (t.to(torch.get_autocast_dtype("cpu")) for t in (query, key, value))
        bias = additive_mask(attention_mask, query.dtype)
        # a windowed query row may see only its own slot: the kernel needs telling (its lse there is 0)
        blind = None
        if sliding_window is not None and n_self:
            blind = (bias[:, :, -n_self:] == float("-inf")).all(-1)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        args = (query, key, value, bias, n_self, scale, a3_row_chunks, blind)
        out = TwoStreamAttention.apply(*args) if needs_grad else two_stream_flash(*args)[0]
    else:
        if torch.is_autocast_enabled(query.device.type):  # the explicit matmuls take one dtype
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = (t.to(dtype) for t in (query, key, value))
        out = dense_two_stream_reference(query, key, value, attention_mask, n_self, scaling, dropout, softcap)
    out = out.transpose(1, 2)
    if skipped:
        out = zeros_before(out, skipped)
    return out.contiguous(), None


def zeros_before(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [B, R, ...] preceded by `rows` zero rows along dim 1: the skipped content rows' place."""
    return torch.cat([x.new_zeros(x.shape[0], rows, *x.shape[2:]), x], dim=1)


def _is_last_layer(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return config is not None and getattr(module, "layer_idx", None) == config.num_hidden_layers - 1


def dense_two_stream_reference(
    query, key, value, mask, n_self: int, scaling, dropout: float, softcap: float | None = None
) -> torch.Tensor:
    """Reference two-stream attention with a dense mask (CUDA's sdpa backend, dropout, soft-capping):
    [B, H, R, D]. The last n_self rows are query slots, each also seeing its own key (after the content
    keys); the rows before them are content rows."""
    mask = mask if mask.dtype == torch.bool else mask == 0
    n_content, rows_content = mask.shape[-1], query.shape[2] - n_self
    key, value = _repeat_kv(key, value, query.shape[1])
    content_kv = key[:, :, :n_content], value[:, :, :n_content]
    parts = []
    if rows_content:
        q, m = query[:, :, :rows_content], mask[:, :, :rows_content]
        if softcap:  # SDPA cannot soft-cap: the explicit softmax
            parts.append(_attend_with_self(q, *content_kv, None, None, m, scaling, dropout, softcap))
        else:
            parts.append(
                F.scaled_dot_product_attention(q, *content_kv, attn_mask=m, dropout_p=dropout, scale=scaling)
            )
    if n_self:
        own_kv = key[:, :, n_content:], value[:, :, n_content:]
        q, m = query[:, :, rows_content:], mask[:, :, rows_content:]
        parts.append(_attend_with_self(q, *content_kv, *own_kv, m, scaling, dropout, softcap))
    return torch.cat(parts, dim=2)


AttentionInterface.register(ATTN_IMPLEMENTATION, a3_attention)
# Without a mask function under the same name the 2D-mask path would hand the layer `None`.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
