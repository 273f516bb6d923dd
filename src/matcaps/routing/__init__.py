"""EM routing for matrix capsules: pure functions, no parameters.

* :func:`em_routing`: route votes of children to parents (Procedure 1 of Hinton et al.).
* :func:`route_capsules`: votes from poses and transformation matrices, then EM routing.
* :class:`Capsules`: the ``(poses, activations)`` pair both return (and every layer).
* :func:`compute_votes`: ``V_ij = M_i · W_ij``.
* :func:`trace_em_routing`: every iteration's routing weights, means, variances, activations.
* :class:`EMRoutingConfig`: every routing hyper-parameter, explicit.
* :class:`RoutingGeometry`: which child positions each parent position reads.
* :func:`softmax_over_parents`, :func:`sum_over_parents`: the cross-position normaliser.
* :class:`RoutingWorkspace`: scratch memory the fused routing reuses on CPU, owned by its
  creator; :func:`release_workspace` frees every live workspace's buffers.

Implementations (``EMRoutingConfig.implementation``): ``blocked`` (default; compiled CPU
kernel, :mod:`matcaps.routing.blocked`, whose :func:`~matcaps.routing.blocked.trace_blocked_routing`
returns the kernel's own per-iteration states), ``fused``, ``naive`` and ``triton``.
"""

from matcaps.routing.capsules import PAPER_POSE_SIZE, Capsules
from matcaps.routing.config import LOG_2PI, MAX_ITERATIONS, ROUTING_IMPLEMENTATIONS, EMRoutingConfig
from matcaps.routing.em import em_routing, route_capsules
from matcaps.routing.geometry import RoutingGeometry
from matcaps.routing.naive import RoutingTrace, trace_em_routing
from matcaps.routing.normalise import softmax_over_parents, sum_over_parents
from matcaps.routing.votes import compute_votes
from matcaps.routing.workspace import RoutingWorkspace, release_workspace, workspace_bytes

__all__ = [
    "Capsules",
    "EMRoutingConfig",
    "LOG_2PI",
    "MAX_ITERATIONS",
    "PAPER_POSE_SIZE",
    "ROUTING_IMPLEMENTATIONS",
    "RoutingGeometry",
    "RoutingTrace",
    "RoutingWorkspace",
    "compute_votes",
    "em_routing",
    "release_workspace",
    "route_capsules",
    "softmax_over_parents",
    "sum_over_parents",
    "trace_em_routing",
    "workspace_bytes",
]
