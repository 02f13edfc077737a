"""The projections: x (B, N, d) to the memory's queries, keys, values, step
sizes and chunk summaries, ``project(x, weights, num_updates, chunk_size,
max_lr, operand_dtype, exact_queries=...)`` in PyTorch (``project_torch``, one
product with the norms' weights folded in; differentiable; for training
``project_closed_form``, the same forward with a hand-derived backward),
Triton (``project_triton``, one kernel, and one for its backward; in
inference ``fold_triton`` folds the weights in one more) and plainly, layer
by layer (``project_naive``, the reference)."""
from typing import Optional

import torch
from torch import Tensor

from ..common import BACKWARDS, implementation_of
from .closed_form import project_closed_form
from .naive import project_naive
from .pytorch import project_torch
from .triton import (MAX_PROJECTION_WIDTH, fold_triton, project_triton,
                     projection_backward_serves)
from .weights import FoldedProjections, Projected, ProjectionWeights, fold, projection_shapes

PROJECT_IMPLEMENTATIONS = {'torch': project_torch, 'triton': project_triton}


def project(x: Tensor, weights: ProjectionWeights, num_updates: int, chunk_size: int,
            max_lr: float, operand_dtype: Optional[torch.dtype] = None, *,
            exact_queries: bool = False, implementation: str = 'torch',
            backward: str = 'autograd') -> Projected:
    """The projections by ``implementation`` ('torch' or 'triton'); the
    arguments as in ``project_torch`` (``project_triton`` itself takes the
    tile sizes, for tuning). ``backward='closed_form'`` (with 'torch') trains
    through ``project_closed_form``."""
    fn = implementation_of('project', PROJECT_IMPLEMENTATIONS, implementation)
    if implementation_of('project backward', BACKWARDS, backward)(implementation):
        fn = project_closed_form
    return fn(x, weights, num_updates, chunk_size, max_lr, operand_dtype,
              exact_queries=exact_queries)


__all__ = ['FoldedProjections', 'MAX_PROJECTION_WIDTH', 'PROJECT_IMPLEMENTATIONS', 'Projected',
           'ProjectionWeights', 'fold', 'fold_triton', 'project', 'project_closed_form',
           'project_naive', 'project_torch', 'project_triton', 'projection_backward_serves',
           'projection_shapes']
