"""The projections written plainly, layer by layer: the reference of the
folded implementations."""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import RMS_EPS
from .weights import Projected, ProjectionWeights


def project_naive(x: Tensor, weights: ProjectionWeights, num_updates: int, chunk_size: int,
                  max_lr: float) -> Projected:
    """``project`` with each norm and layer applied in turn and exact products
    in ``x``'s dtype (float64 for a reference); arguments as ``project_torch``'s
    but ``operand_dtype`` (there is none: products are exact)."""
    w = weights
    b, n, d = x.shape
    h, hd = w.query_gamma.shape
    T = num_updates * chunk_size

    def heads(t: Tensor) -> Tensor:  # (B, M, d) -> (H, B, M, hd)
        return t.view(b, t.shape[1], h, hd).permute(2, 0, 1, 3)

    def rms(t: Tensor, weight=None) -> Tensor:
        return F.rms_norm(t, t.shape[-1:], weight, eps=RMS_EPS)

    queries = rms(heads(rms(x, w.retrieve_norm) @ w.queries.t()))
    queries = queries * (1 + w.query_gamma[:, None, None])
    s = rms(x[:, :T], w.store_norm)
    keys = rms(heads(s @ w.keys.t())) * (1 + w.key_gamma[:, None, None])
    token_lr = max_lr * torch.sigmoid(s @ w.token_lr.t() + w.token_lr_bias).permute(2, 0, 1)
    chunks = s.reshape(b, num_updates, chunk_size, d)
    attn = (chunks @ w.logits.t() + w.logits_bias).softmax(dim=-2)
    return Projected(queries, keys, heads(s @ w.values.t()), token_lr, (chunks * attn).sum(dim=-2))
