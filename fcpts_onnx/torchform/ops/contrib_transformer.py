"""onnxruntime's fused transformer operators, as its transformers optimizer writes them.

``onnxruntime.transformers.optimizer`` (and optimum's ORTOptimizer, which calls it) rewrites a
BERT-style export into com.microsoft Attention (Q, K and V projections packed into one
[input_hidden, 3 * hidden] weight, which is prunable), SkipLayerNormalization (residual add +
bias + LayerNorm), EmbedLayerNormalization, MultiHeadAttention and the RMS variants. The
semantics follow onnxruntime's CPU kernels, which the tests use as the oracle; in particular a
masked key gets ``mask_filter_value`` (-10000) added to its score, not -inf, so a row with every
key masked averages over all keys as onnxruntime's does.
"""

from __future__ import annotations

import math

import torch

from ..registry import register
from .nn import _refuse

_DOMAIN = "com.microsoft"


def _layer_norm(x: torch.Tensor, gamma, beta, eps: float):
    """LayerNorm over the last axis; returns (y, mean, inv_std) with the statistics kept as [..., 1]."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    inv_std = torch.rsqrt((centred * centred).mean(dim=-1, keepdim=True) + eps)
    y = centred * inv_std * gamma
    return (y if beta is None else y + beta), mean, inv_std


def _rms_norm(x: torch.Tensor, gamma, eps: float):
    inv_std = torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    return x * inv_std * gamma, inv_std


@register("SkipLayerNormalization", since=1, domain=_DOMAIN)
def skip_layer_normalization(ctx, x, skip, gamma, beta=None, bias=None):
    total = x + skip  # skip may be [batch, seq, hidden], [1, seq, hidden] or [seq, hidden]
    if bias is not None:
        total = total + bias
    y, mean, inv_std = _layer_norm(total, gamma, beta, float(ctx.attr("epsilon", 1e-12)))
    return y, mean, inv_std, total


@register("SkipSimplifiedLayerNormalization", since=1, domain=_DOMAIN)
def skip_simplified_layer_normalization(ctx, x, skip, gamma, bias=None):
    total = x + skip
    if bias is not None:
        total = total + bias
    y, inv_std = _rms_norm(total, gamma, float(ctx.attr("epsilon", 1e-12)))
    # the second output (mean) is declared but never computed by onnxruntime's kernels
    return y, torch.zeros_like(inv_std), inv_std, total


# onnxruntime registers SimplifiedLayerNormalization in the default ONNX domain (a contrib op
# outside com.microsoft), version 1; LLaMA- and T5-style exports go through it.
@register("SimplifiedLayerNormalization", since=1)
def simplified_layer_normalization(ctx, x, scale):
    axis = int(ctx.attr("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    dims = tuple(range(axis, x.dim()))
    inv_std = torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + float(ctx.attr("epsilon", 1e-5)))
    return x * inv_std * scale, inv_std


@register("EmbedLayerNormalization", since=1, domain=_DOMAIN)
def embed_layer_normalization(ctx, input_ids, segment_ids, word_embedding, position_embedding,
                              segment_embedding=None, gamma=None, beta=None, mask=None, position_ids=None):
    batch, seq = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    else:
        position_ids = position_ids.expand(batch, seq)
    total = word_embedding[input_ids.long()] + position_embedding[position_ids.long()]
    if segment_ids is not None and segment_embedding is not None:
        total = total + segment_embedding[segment_ids.long()]
    y, _, _ = _layer_norm(total, gamma, beta, float(ctx.attr("epsilon", 1e-12)))
    # mask_index: the count of attended tokens per row (onnxruntime assumes right padding)
    if mask is None:
        mask_index = torch.zeros(batch, dtype=torch.int32, device=input_ids.device)
    else:
        mask_index = mask.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return y, mask_index, total


def _masks(ctx, mask: torch.Tensor | None, batch: int, q_len: int, total: int, past: int,
           dtype, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(padding, causal) for com.microsoft attention, each broadcastable to [batch, 1, q_len, total].

    padding: the term added to the scores from any mask layout the ops accept; a masked key gets
    ``mask_filter_value``, so a row with every key masked averages over them, as onnxruntime does.
    causal: bool, the keys each query may see under ``unidirectional``; onnxruntime gives the others
    no weight at all, whatever the padding (measured: a query whose one visible key is padding
    still sees only that key).
    """
    fill = float(ctx.attr("mask_filter_value", -10000.0))
    keys = torch.arange(total, device=device)
    allowed = None
    if mask is not None:
        if mask.dim() == 1 and mask.shape[0] in (batch, 2 * batch):
            # key-padding as positions: keys from end[b] on are masked; with 2B entries, keys
            # before start[b] too
            end = mask[:batch].to(torch.int64).reshape(batch, 1, 1, 1)
            allowed = keys.reshape(1, 1, 1, -1) < end
            if mask.shape[0] == 2 * batch:
                start = mask[batch:].to(torch.int64).reshape(batch, 1, 1, 1)
                allowed = allowed & (keys.reshape(1, 1, 1, -1) >= start)
        elif mask.dim() == 2:  # raw [batch, total]: 0 masks the key
            allowed = (mask != 0).reshape(batch, 1, 1, total)
        elif mask.dim() == 3:  # [batch, q_len, total]
            allowed = (mask != 0).reshape(batch, 1, q_len, total)
        else:  # onnxruntime's CPU kernel refuses the 4-D (Megatron) mask too
            raise _refuse(ctx, f"a mask_index of shape {list(mask.shape)}")
    padding = None
    if allowed is not None:
        zero = torch.zeros((), dtype=dtype, device=device)
        padding = torch.where(allowed, zero, torch.full((), fill, dtype=dtype, device=device))
    causal = None
    if int(ctx.attr("unidirectional", 0)):
        position = past + torch.arange(q_len, device=device).reshape(1, 1, -1, 1)
        causal = keys.reshape(1, 1, 1, -1) <= position
    return padding, causal


def _attend(ctx, q, k, v, masks, attention_bias, scale: float):
    """Multi-head scaled dot-product attention on [batch, heads, seq, size] tensors."""
    padding, causal = masks
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_bias is not None:
        scores = scores + attention_bias
    if padding is not None:
        scores = scores + padding
    if causal is not None:  # every row keeps at least its own position's key
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    y = torch.matmul(probs, v)
    batch, heads, q_len, size = y.shape
    return y.transpose(1, 2).reshape(batch, q_len, heads * size)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, seq, hidden = x.shape
    return x.reshape(batch, seq, heads, hidden // heads).transpose(1, 2)


@register("Attention", since=1, domain=_DOMAIN)
def contrib_attention(ctx, x, weight, bias=None, mask_index=None, past=None, attention_bias=None,
                      past_sequence_length=None):
    if past is not None or past_sequence_length is not None:
        raise _refuse(ctx, "a past key/value cache")
    if int(ctx.attr("do_rotary", 0)):
        raise _refuse(ctx, "do_rotary=1")
    heads = int(ctx.attr("num_heads"))
    sizes = [int(s) for s in ctx.attr("qkv_hidden_sizes", [])] or [weight.shape[1] // 3] * 3
    if len(sizes) != 3 or sum(sizes) != weight.shape[1] or sizes[0] != sizes[1]:
        raise _refuse(ctx, f"qkv_hidden_sizes={sizes} with a weight of {weight.shape[1]} columns")
    qkv = torch.matmul(x, weight)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = torch.split(qkv, sizes, dim=-1)
    q, k, v = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    batch, _, q_len, head_size = q.shape
    scale = ctx.attr("scale")
    scale = 1.0 / math.sqrt(head_size) if not scale else float(scale)
    masks = _masks(ctx, mask_index, batch, q_len, q_len, 0, q.dtype, q.device)
    return _attend(ctx, q, k, v, masks, attention_bias, scale), None


@register("MultiHeadAttention", since=1, domain=_DOMAIN)
def multi_head_attention(ctx, query, key=None, value=None, bias=None, key_padding_mask=None,
                         attention_bias=None, past_key=None, past_value=None, *rest):
    if past_key is not None or past_value is not None or any(r is not None for r in rest):
        raise _refuse(ctx, "a past key/value cache")
    if key is None or value is None or query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise _refuse(ctx, "packed or pre-split query/key/value (only [batch, seq, hidden] Q, K and V)")
    heads = int(ctx.attr("num_heads"))
    if bias is not None:
        dq, dk = query.shape[-1], key.shape[-1]
        query, key, value = query + bias[:dq], key + bias[dq:dq + dk], value + bias[dq + dk:]
    q, k, v = _split_heads(query, heads), _split_heads(key, heads), _split_heads(value, heads)
    batch, _, q_len, head_size = q.shape
    scale = ctx.attr("scale")
    scale = 1.0 / math.sqrt(head_size) if not scale else float(scale)
    total = k.shape[2]
    mask = key_padding_mask
    if mask is not None and mask.dim() == 2 and mask.shape != (batch, total):
        raise _refuse(ctx, f"a key_padding_mask of shape {list(mask.shape)}")
    masks = _masks(ctx, mask, batch, q_len, total, total - q_len, q.dtype, q.device)
    return _attend(ctx, q, k, v, masks, attention_bias, scale), k, v
