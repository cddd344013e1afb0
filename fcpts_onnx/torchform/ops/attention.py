"""Transformer operators of opset 23+: Attention, RMSNormalization, RotaryEmbedding.

torch.onnx's dynamo exporter writes ``scaled_dot_product_attention`` as one Attention node and
``nn.RMSNorm`` as RMSNormalization from opset 23 on; before 23 it spells both out in MatMul,
Softmax, ReduceMean and friends, which the other modules already cover. The implementations
follow the ONNX specification (its reference implementation where the text is terse), checked
against onnxruntime's CPU kernels by the tests; every float result is differentiable.
"""

from __future__ import annotations

import math

import torch

from ..dtypes import torch_dtype
from ..registry import register
from .nn import _refuse


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    b, s, hidden = x.shape
    return x.reshape(b, s, heads, hidden // heads).transpose(1, 2)


def _allowed_keys(ctx, q_len: int, total: int, offset: torch.Tensor, device) -> torch.Tensor | None:
    """Bool [batch or 1, 1, q_len, total]: which keys each query may see under ``is_causal`` and
    the opset-25 sliding window; None when neither applies.

    ``offset`` (per batch, shape [batch or 1]) is the count of valid keys before the query block:
    query i sits at absolute position offset + i (bottom-right alignment).
    """
    causal = bool(ctx.attr("is_causal", 0))
    left = int(ctx.attr("left_window_size", -1))
    right = int(ctx.attr("right_window_size", -1))
    if not causal and left < 0 and right < 0:
        return None
    position = offset.reshape(-1, 1, 1, 1) + torch.arange(q_len, device=device).reshape(1, 1, -1, 1)
    key = torch.arange(total, device=device).reshape(1, 1, 1, -1)
    allowed = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (key <= position)
    if left >= 0:
        allowed = allowed & (key >= position - left)
    if right >= 0:
        allowed = allowed & (key <= position + right)
    return allowed


@register("Attention", since=23)
def attention(ctx, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    mode = int(ctx.attr("qk_matmul_output_mode", 0))
    if mode not in (0, 1, 2, 3):
        raise _refuse(ctx, f"qk_matmul_output_mode={mode}")
    if (past_key is None) != (past_value is None):
        raise _refuse(ctx, "past_key without past_value (or the reverse)")
    three_d = q.dim() == 3
    if three_d:
        q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
        if not q_heads or not kv_heads:
            raise _refuse(ctx, "3-D inputs without q_num_heads and kv_num_heads")
        q, k, v = _heads_first(q, int(q_heads)), _heads_first(k, int(kv_heads)), _heads_first(v, int(kv_heads))
    past_len = 0
    if past_key is not None:
        past_len = past_key.shape[2]
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    batch, q_heads, q_len, head_size = q.shape
    kv_heads, total = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise _refuse(ctx, f"{q_heads} query heads over {kv_heads} key/value heads")
    if q_heads != kv_heads:  # grouped-query: each key/value head serves a contiguous group of query heads
        k = k.repeat_interleave(q_heads // kv_heads, dim=1)
        v = v.repeat_interleave(q_heads // kv_heads, dim=1)

    scale = ctx.attr("scale")
    scale = 1.0 / math.sqrt(head_size) if scale is None else float(scale)
    # Q and K each scaled by sqrt(scale) before the product, as the specification draws it.
    root = math.sqrt(scale)
    scores = torch.matmul(q * root, (k * root).transpose(-1, -2))
    qk_outputs = [scores]
    softcap = float(ctx.attr("softcap", 0.0))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    qk_outputs.append(scores)

    device = scores.device
    # Disallowed keys get the lowest finite value, as onnxruntime writes them (visible in
    # qk_matmul_output mode 2); a float mask is added, so its -inf entries stay -inf.
    lowest = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype, device=device)
    if attn_mask is not None:
        short = total - attn_mask.shape[-1]
        if short > 0:  # opset 24: a shorter mask is padded with -inf (False)
            fill = False if attn_mask.dtype == torch.bool else -math.inf
            pad = torch.full((*attn_mask.shape[:-1], short), fill, dtype=attn_mask.dtype, device=device)
            attn_mask = torch.cat([attn_mask, pad], dim=-1)
        if attn_mask.dtype == torch.bool:
            scores = torch.where(attn_mask, scores, lowest)
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if nonpad_kv_seqlen is not None:
        lengths = nonpad_kv_seqlen.to(device=device, dtype=torch.int64)
        offset = lengths - q_len
        valid = torch.arange(total, device=device).reshape(1, 1, 1, -1) < lengths.reshape(-1, 1, 1, 1)
    else:
        # Query i sits at position past_len + i (the specification). onnxruntime 1.32's kernels
        # for opsets 23 and 24 depart in one case, a single query with a past cache and several
        # new keys: it sees every key. With one new key (the usual decoding step) both rules
        # agree; this follows onnxruntime, whose opset-25 kernel follows the specification.
        decode_quirk = ctx.opset < 25 and past_len and q_len == 1
        offset = torch.tensor([total - 1 if decode_quirk else past_len], device=device)
        valid = None
    allowed = _allowed_keys(ctx, q_len, total, offset, device)
    if valid is not None:
        allowed = valid if allowed is None else allowed & valid
    if allowed is not None:
        scores = torch.where(allowed, scores, lowest)
    qk_outputs.append(scores)

    precision = ctx.attr("softmax_precision")
    softmax_dtype = torch_dtype(int(precision)) if precision else scores.dtype
    # A row with every key masked gives zeros, not NaN or a uniform average: its scores are
    # replaced before the softmax (so no NaN reaches the gradient either), its probabilities
    # zeroed after.
    masked_row = (scores <= lowest).all(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(masked_row, torch.zeros_like(scores), scores).to(softmax_dtype), dim=-1)
    probs = torch.where(masked_row, torch.zeros_like(probs), probs).to(v.dtype)
    qk_outputs.append(probs)
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(batch, q_len, -1)
    return y, present_key, present_value, qk_outputs[mode]


@register("RMSNormalization", since=23)
def rms_normalization(ctx, x, scale):
    axis = int(ctx.attr("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    eps = float(ctx.attr("epsilon", 1e-5))
    stash = torch_dtype(int(ctx.attr("stash_type", 1)))  # stage one runs in this type (float32 by default)
    xs = x.to(stash)
    mean_square = (xs * xs).mean(dim=tuple(range(axis, x.dim())), keepdim=True)
    normalized = (xs / torch.sqrt(mean_square + eps)).to(x.dtype)
    return normalized * scale


@register("RotaryEmbedding", since=23)
def rotary_embedding(ctx, x, cos_cache, sin_cache, position_ids=None):
    original_shape = x.shape
    if x.dim() == 4:  # [batch, heads, seq, size] -> [batch, seq, heads, size]
        x = x.transpose(1, 2)
    else:
        heads = int(ctx.attr("num_heads", 0))
        if not heads:
            raise _refuse(ctx, "a 3-D input without num_heads")
        b, s, hidden = x.shape
        x = x.reshape(b, s, heads, hidden // heads)
    head_size = x.shape[-1]
    rotary = int(ctx.attr("rotary_embedding_dim", 0)) or head_size
    x_rotate, x_keep = x[..., :rotary], x[..., rotary:]
    if position_ids is not None:
        cos_cache = cos_cache[position_ids.long()]
        sin_cache = sin_cache[position_ids.long()]
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)  # [batch, seq, 1, rotary / 2]
    interleaved = bool(ctx.attr("interleaved", 0))
    if interleaved:
        x1, x2 = x_rotate[..., 0::2], x_rotate[..., 1::2]
    else:
        x1, x2 = x_rotate.chunk(2, dim=-1)
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rotated = torch.stack([real, imag], dim=-1).reshape(x_rotate.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    out = torch.cat([rotated, x_keep], dim=-1)
    if len(original_shape) == 3:
        return out.reshape(original_shape)
    return out.transpose(1, 2)
