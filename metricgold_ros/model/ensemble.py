"""Combining the members of an ensemble: metric log depth, and affine-invariant depth.

Metric (MetricGold) members are combined by their median in log space: no alignment, the output
stays metric. Affine-invariant (Marigold) members each carry an unknown scale and shift, so they
are aligned first, as the Marigold paper's test-time ensembling does and as diffusers'
``MarigoldDepthPipeline`` implements it: per-member scale and shift minimising the pairwise RMS
differences plus a pull of the median towards [0, 1] (BFGS from scipy, a few iterations), then
the median, then a stretch to exactly [0, 1]. Its uncertainty is the median absolute deviation
of the aligned members over the same range.
"""

from itertools import combinations
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from metricgold_ros.errors import InputError

# diffusers' defaults for Marigold's alignment (its ``ensembling_kwargs``).
REGULARIZER_STRENGTH = 0.02
MAX_ITERATIONS = 2
TOLERANCE = 1e-3
ALIGN_MAX_SIDE = 1024  # members are aligned on a copy whose longer side is at most this


def ensemble_members(x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Members ``[E,1,h,w]`` (log-depth values) -> their median and std ``[1,1,h,w]``.

    The median of log depth is the log of the median depth: ensembling in log space needs no
    scale/shift alignment, so metric output stays metric. Std is ``None`` for one member.
    """
    if x.shape[0] == 1:
        return x, None
    return x.median(dim=0, keepdim=True).values, x.std(dim=0, keepdim=True)


def ensemble_affine(depth: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Affine-invariant members ``[E,1,h,w]`` in [0, 1] -> aligned median and MAD ``[1,1,h,w]``.

    The result is stretched to span [0, 1] exactly and the MAD is divided by the same range.
    Computed in ``depth``'s dtype; the alignment itself is solved on a float32 copy.

    Raises:
        InputError: scipy is not installed (ensembles of relative models need its optimiser).
    """
    try:
        from scipy.optimize import minimize
    except ImportError as err:
        raise InputError('ensemble_size > 1 with a relative (Marigold) model needs scipy for '
                         "the members' scale/shift alignment: pip install scipy, or use "
                         'ensemble_size=1') from err
    count = depth.shape[0]
    probe = _shrink_nearest(depth.to(torch.float32), ALIGN_MAX_SIDE)
    flat = probe.reshape(count, -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    scale = 1.0 / (high - low).clamp(min=1e-6)
    start = torch.cat((scale, -scale * low)).cpu().numpy().astype(np.float64)  # [2E]
    pairs = list(combinations(range(count), 2))
    result = minimize(_alignment_cost, start, args=(probe, pairs), method='BFGS', tol=TOLERANCE,
                      options={'maxiter': MAX_ITERATIONS, 'disp': False})
    aligned = _align(depth, result.x)
    median = aligned.median(dim=0, keepdim=True).values
    mad = (aligned - median).abs().median(dim=0, keepdim=True).values
    low = median.min()
    spread = (median.max() - low).clamp(min=1e-6)
    return (median - low) / spread, mad / spread


def _align(depth: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """``depth * scale + shift`` per member; ``params`` holds E scales, then E shifts."""
    count = depth.shape[0]
    scale = torch.from_numpy(params[:count]).to(depth).view(count, 1, 1, 1)
    shift = torch.from_numpy(params[count:]).to(depth).view(count, 1, 1, 1)
    return depth * scale + shift


def _alignment_cost(params: np.ndarray, depth: torch.Tensor,
                    pairs: List[Tuple[int, int]]) -> float:
    """Sum of pairwise RMS differences of the aligned members, plus the [0, 1] regulariser.

    Evaluated in float32 exactly as diffusers does (BFGS's finite-difference gradients see
    every rounding), so the optimiser takes the same path.
    """
    aligned = _align(depth, params)
    cost = 0.0
    for i, j in pairs:
        cost += ((aligned[i] - aligned[j]) ** 2).mean().sqrt().item()
    median = aligned.median(dim=0, keepdim=True).values
    below = median.min().abs().item()
    above = (1.0 - median.max()).abs().item()
    cost += (below + above) * REGULARIZER_STRENGTH
    return cost


def _shrink_nearest(depth: torch.Tensor, max_side: int) -> torch.Tensor:
    """Nearest-neighbour copy with the longer side at most ``max_side`` (sizes floored)."""
    height, width = depth.shape[-2:]
    longest = max(height, width)
    if longest <= max_side:
        return depth
    size = (height * max_side // longest, width * max_side // longest)
    return F.interpolate(depth, size, mode='nearest-exact')
