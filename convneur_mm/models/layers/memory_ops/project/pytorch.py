"""The projections in PyTorch: one product for every projection, the norms'
weights folded in (differentiable; the training path)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import RMS_EPS, product
from .weights import Projected, ProjectionWeights, check_projection_arguments, fold


def project_torch(x: Tensor, weights: ProjectionWeights, num_updates: int, chunk_size: int,
                  max_lr: float, operand_dtype: Optional[torch.dtype] = None, *,
                  exact_queries: bool = False) -> Projected:
    """The memory's projections of ``x``: one RMSNorm statistic shared by both
    norms, one product of x / rms(x) by every projection's weight, one RMSNorm
    of the queries' and keys' heads together, the step sizes' sigmoid and the
    pool's softmax over each written chunk.

    Args:
        x: (B, N, d) in the compute dtype (float32 or float64).
        weights: the layers' parameters, in ``x``'s dtype.
        num_updates: U, the chunks that write (the first U L tokens).
        chunk_size: tokens per chunk L.
        max_lr: the step sizes' bound (``max_lr * sigmoid``).
        operand_dtype: the products' operand dtype (None: ``x``'s).
        exact_queries: the queries' product in ``x``'s dtype, the others in
            ``operand_dtype``: a decomposed read's W_0 part reads the queries
            at full accuracy, nothing else needs it (autograd differentiates
            each product in its own precision).

    Returns:
        ``Projected``: queries and keys as views of one RMS-normed tensor
        (with ``exact_queries`` two), values a view of the (B, N, 4d + H)
        product (with ``exact_queries`` of the written rows' (B, T, 3d + H)
        one; in inference a copy, so that the product is freed on return),
        step sizes and the chunk summaries.
    """
    check_projection_arguments(x, weights, num_updates, chunk_size)
    b, n, d = x.shape
    h, hd = weights.query_gamma.shape
    u, L = num_updates, chunk_size
    folded = fold(weights)
    # x / rms(x): shared by both norms, whose weights fold into the product
    normed = F.rms_norm(x, (d, ), eps=RMS_EPS)

    query_dtype = None if exact_queries else operand_dtype

    def linear(inputs: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               dtype: Optional[torch.dtype] = operand_dtype) -> Tensor:
        """inputs @ weight.T (+ bias) as one product with ``dtype`` operands
        (``inputs`` an argument, not a closure's: Dynamo cannot trace a ``del``
        of a closure's variable)."""
        rows = inputs.shape[1]
        flat, weight = inputs.reshape(1, b * rows, d), weight.t().unsqueeze(0)
        if bias is not None and dtype is None:
            return torch.baddbmm(bias, flat, weight).view(b, rows, -1)
        out = product(flat, weight, dtype).view(b, rows, -1)
        return out if bias is None else out + bias

    def norm_heads(t: Tensor, gamma: Tensor) -> Tensor:
        return F.rms_norm(t.unflatten(-1, (gamma.shape[0], hd)), (hd,), eps=RMS_EPS) * gamma

    if u == 0:
        queries = norm_heads(linear(normed, folded.weight[:d], dtype=query_dtype),
                             folded.gamma[:h])
        none = x.new_empty(h, b, 0, hd)
        return Projected(queries.permute(2, 0, 1, 3), none, none.clone(), x.new_empty(h, b, 0),
                         x.new_empty(b, 0, d))
    # proj (B, N, 4d + H): queries, keys, values, logits, step sizes, split
    # once: autograd then joins their gradients in one cat, where slicing
    # each would write a zero-padded (B, N, 4d + H) gradient per slice and add them
    bias = F.pad(folded.bias, (2 * d, 0))
    written = slice(0, u * L)
    if query_dtype == operand_dtype:
        qk, v, logits, lr = linear(normed, folded.weight, F.pad(bias, (d, 0))).split(
            [2 * d, d, d, h], dim=-1)
        # the queries' and keys' heads normed together: one norm's ops, not two
        qk = norm_heads(qk, folded.gamma)
        queries, keys = qk[..., :h, :], qk[..., h:, :]
    else:  # two products, each in its own precision, the second of the written rows only
        k, v, logits, lr = linear(normed[:, written], folded.weight[d:], bias).split(
            [d, d, d, h], dim=-1)
        queries = norm_heads(linear(normed, folded.weight[:d], dtype=query_dtype),
                             folded.gamma[:h])
        keys = norm_heads(k, folded.gamma[h:])
    token_lr = max_lr * torch.sigmoid(lr[:, written]).permute(2, 0, 1)
    # the pool: softmax over each chunk of the logits, the weighted sum of
    # the store-normed tokens (their norm weight applied after the sum)
    attn = logits[:, written].reshape(b, u, L, d).softmax(dim=-2)
    summary = (normed[:, written].reshape(b, u, L, d) * attn).sum(dim=-2) * weights.store_norm
    del attn, normed, logits, lr  # before the values' copy below
    values = v[:, written]
    if not torch.is_grad_enabled():
        # a copy of the values frees proj (B, N, 4d + H), about four times
        # their size, when this returns: its other columns are read here only
        values = values.contiguous()
    return Projected(queries.permute(2, 0, 1, 3), keys[:, written].permute(2, 0, 1, 3),
                     values.view(b, u * L, h, hd).permute(2, 0, 1, 3), token_lr, summary)
