"""The projections' parameters, their folded form and their results."""
from typing import NamedTuple

import torch
from torch import Tensor


class ProjectionWeights(NamedTuple):
    """The parameters ``project`` reads, as the layers hold them.

    ``retrieve_norm``, ``store_norm`` (d): the RMSNorms' weights before the
    queries and before everything a chunk writes; ``queries``, ``keys``,
    ``values``, ``logits`` (d, d) and ``token_lr`` (H, d): the linear layers'
    weights (the pool's logits and the step sizes with biases (d), (H));
    ``query_gamma``, ``key_gamma`` (H, d / H): the per-head RMSNorms'
    zero-centred gains."""
    retrieve_norm: Tensor
    store_norm: Tensor
    queries: Tensor
    keys: Tensor
    values: Tensor
    logits: Tensor
    logits_bias: Tensor
    token_lr: Tensor
    token_lr_bias: Tensor
    query_gamma: Tensor
    key_gamma: Tensor


class Projected(NamedTuple):
    """``project``'s results, heads leading: ``queries`` (H, B, N, hd) of
    every token; of the U written chunks' T = U L tokens ``keys``,
    ``values`` (H, B, T, hd) and ``token_lr`` (H, B, T); ``summary``
    (B, U, d), each chunk's softmax-pooled store-normed tokens (the gates'
    input). Without writes the last four have no tokens."""
    queries: Tensor
    keys: Tensor
    values: Tensor
    token_lr: Tensor
    summary: Tensor


class FoldedProjections(NamedTuple):
    """Every projection as one product of x / rms(x): ``weight`` (4d + H, d)
    rows queries, keys, values, logits, step sizes, each with its norm's
    weight folded in; ``bias`` (d + H) of the logits and the step sizes;
    ``gamma`` (2H, hd), the queries' and keys' ``1 + gamma``."""
    weight: Tensor
    bias: Tensor
    gamma: Tensor


def fold(weights: ProjectionWeights) -> FoldedProjections:
    """The projections folded into one product (the same maths): computed
    from the parameters on every call, so training updates them as they are."""
    w = weights
    weight = torch.cat([w.queries * w.retrieve_norm, torch.cat(
        [w.keys, w.values, w.logits, w.token_lr]) * w.store_norm])
    return FoldedProjections(weight, torch.cat([w.logits_bias, w.token_lr_bias]),
                             1.0 + torch.cat([w.query_gamma, w.key_gamma]))


def projection_shapes(d: int, heads: int) -> ProjectionWeights:
    """The parameters' shapes for width ``d`` and ``heads`` heads, as a
    ``ProjectionWeights`` of size tuples."""
    return ProjectionWeights(
        retrieve_norm=(d, ), store_norm=(d, ), queries=(d, d), keys=(d, d), values=(d, d),
        logits=(d, d), logits_bias=(d, ), token_lr=(heads, d), token_lr_bias=(heads, ),
        query_gamma=(heads, d // heads), key_gamma=(heads, d // heads))


def check_projection_shapes(weights: ProjectionWeights, d: int) -> None:
    """Each parameter's shape for width ``d`` and the gains' heads: an error
    naming the parameter."""
    heads = weights.query_gamma.shape[0]
    for name, shape in projection_shapes(d, heads)._asdict().items():
        got = tuple(getattr(weights, name).shape)
        if got != shape:
            raise ValueError(f'weights.{name} must be {shape} for width {d} and '
                             f'{heads} heads, got {got}')


def check_projection_arguments(x: Tensor, weights: ProjectionWeights, num_updates: int,
                               chunk_size: int) -> None:
    """Shapes and counts of a ``project`` call: an error naming the argument."""
    if x.dim() != 3:
        raise ValueError(f'x must be (B, N, d), got shape {tuple(x.shape)}')
    d = x.shape[-1]
    heads = weights.query_gamma.shape[0]
    check_projection_shapes(weights, d)
    if d % heads:
        raise ValueError(f'x of width {d} does not split into {heads} heads')
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    if not 0 <= num_updates * chunk_size <= x.shape[1]:
        raise ValueError(f'{num_updates} written chunks of {chunk_size} tokens need that many '
                         f'of the {x.shape[1]} tokens')
