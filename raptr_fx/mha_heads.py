"""Cut the heads of ``nn.MultiheadAttention``: torchvision's ViT, open_clip, hand-written blocks,
and the ``self_attn`` / ``multihead_attn`` of ``nn.TransformerEncoderLayer`` / ``DecoderLayer``.

Its forward runs ``F.multi_head_attention_forward``, which takes ``head_dim`` as ``embed_dim //
num_heads``: fewer heads need a forward of their own. While a cut is active, :func:`multihead_attention`
stands in for it: it projects query, key and value with the kept heads' rows of each of the q, k
and v segments of ``in_proj_weight`` / ``in_proj_bias``, attends over the kept heads
(``F.scaled_dot_product_attention``; with ``need_weights=True``, the explicit softmax torch uses),
and returns the kept heads' values for the output projection, which reads only their columns
(:mod:`raptr_fx.cutting`). Masks are taken as the module takes them: ``attn_mask`` 2-D ``(L, S)``
or 3-D per head ``(N * num_heads, L, S)`` (the kept heads' masks), ``key_padding_mask``, boolean or
float, and ``is_causal``. With ``need_weights=True`` the weights returned are averaged over the kept
heads (the shape is unchanged); per-head weights (``average_attn_weights=False``) would have fewer
heads, and are refused.

Not cut, with the reason in the group: ``kdim``/``vdim`` other than ``embed_dim`` (separate q, k, v
weights), ``add_bias_kv`` and ``add_zero_attn`` (an extra key/value position spanning every head),
one head.

Cost: the inference fast path (``torch._native_multi_head_attention``, and
``nn.TransformerEncoderLayer``'s ``torch._transformer_encoder_layer_fwd``) never runs while cut.
Both only run in eval mode (or without gradients), where the module's own forward runs, so
training loses nothing to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import canonical_mask, none_or_dtype
from .errors import RaptrError

__all__ = ["multihead_problem", "multihead_attention"]


def multihead_problem(module: nn.MultiheadAttention) -> str | None:
    """Why the heads of ``module`` cannot be cut, or None."""
    if not module._qkv_same_embed_dim:
        return (f"its key and value sizes (kdim={module.kdim}, vdim={module.vdim}) differ from embed_dim="
                f"{module.embed_dim}, so q, k and v have weights of their own: cutting those is not supported")
    if module.bias_k is not None:
        return ("add_bias_kv=True appends a learned key and value spanning every head: cutting its heads "
                "is not supported")
    if module.add_zero_attn:
        return "add_zero_attn=True: cutting its heads is not supported"
    if module.num_heads < 2:
        return "it has one head: a cut would keep all heads or none"
    return None


def multihead_attention(module: nn.MultiheadAttention, in_weight: torch.Tensor, in_bias: torch.Tensor | None,
                        heads: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s attention over the kept heads, before its output projection.

    Args:
        in_weight, in_bias: the kept heads' rows of ``in_proj_weight`` / ``in_proj_bias``: their q
            rows, then their k rows, then their v rows.
        heads: the kept heads' indices (sorted), to pick their slices of a per-head ``attn_mask``.
        The rest: the arguments of ``nn.MultiheadAttention.forward``.

    Returns:
        The kept heads' values, shaped as the module's output with ``kept * head_dim`` features, and
        the attention weights (averaged over the kept heads) or None, as the module returns them.
    """
    if need_weights and not average_attn_weights:
        raise RaptrError("nn.MultiheadAttention called with need_weights=True, average_attn_weights=False "
                         "returns one attention map per head, and a cut changes how many: pass "
                         "average_attn_weights=True or need_weights=False, or cut only MLPs "
                         "(width_kinds=('mlp',))")
    self_attention, shared_kv = query is key and key is value, key is value
    batched = query.dim() == 3
    if not batched:  # (L, E): a batch of one
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    elif not module.batch_first:  # (L, N, E)
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, target, source = query.shape[0], query.shape[1], key.shape[1]

    # Masks as F.multi_head_attention_forward takes them: boolean ones become -inf, the causal hint
    # stands in for the mask only without padding and weights.
    key_padding_mask = canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        is_causal = False
    mask = None
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (target, source):
            mask = attn_mask
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (batch * module.num_heads, target, source):
            mask = attn_mask.view(batch, module.num_heads, target, source).index_select(1, heads)
        else:
            raise RuntimeError(f"attn_mask is shaped {list(attn_mask.shape)}, not ({target}, {source}) or "
                               f"({batch * module.num_heads}, {target}, {source})")
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding

    # The kept heads' q, k and v: one projection for self-attention, as torch packs it.
    if self_attention:
        q, k, v = F.linear(query, in_weight, in_bias).chunk(3, dim=-1)
    else:
        weights = in_weight.chunk(3)
        biases = in_bias.chunk(3) if in_bias is not None else (None, None, None)
        q = F.linear(query, weights[0], biases[0])
        if shared_kv:  # k and v from one projection: the last two thirds of the rows, a view
            third = in_weight.shape[0] // 3
            kv_bias = None if in_bias is None else in_bias[third:]
            k, v = F.linear(key, in_weight[third:], kv_bias).chunk(2, dim=-1)
        else:
            k, v = F.linear(key, weights[1], biases[1]), F.linear(value, weights[2], biases[2])
    head_dim = module.head_dim
    q, k, v = (t.unflatten(-1, (-1, head_dim)).transpose(1, 2) for t in (q, k, v))  # [N, kept, L, head_dim]
    dropout = module.dropout if module.training else 0.0
    if need_weights:  # the explicit attention, to return its weights
        scores = (q * math.sqrt(1.0 / float(head_dim))) @ k.transpose(-2, -1)
        attention = (scores if mask is None else scores + mask).softmax(dim=-1)
        if dropout > 0.0:
            attention = F.dropout(attention, p=dropout)
        out = attention @ v
        averaged = attention.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        averaged = None
    out = out.transpose(1, 2).flatten(2)  # [N, L, kept * head_dim]
    if not batched:
        return out.squeeze(0), averaged.squeeze(0) if averaged is not None else None
    return out if module.batch_first else out.transpose(0, 1), averaged
