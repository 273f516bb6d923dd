"""Votes of child capsules for parent capsules: ``V_ij = M_i · W_ij`` (Hinton et al. 2018, §2).

:func:`compute_votes` is the plain statement (an einsum differentiated by autograd).  The
fused routing computes the same numbers with :func:`kronecker_products_` and differentiates
them with :func:`kronecker_votes_backward`: each child's ``P×P`` products with the ``C``
matrices of its parents are one row-vector × matrix product,
``vec(M_i · W_ic) for all c = vec(M_i) · K_i`` with the block matrix
``K_i[(x', y), (c, x, z)] = δ(x, x') W_icyz``, batched over children.  The products come
out as contiguous ``P·P`` blocks, so reordering them into the routing layout is a copy of
64-byte runs instead of the 16-byte runs an einsum produces.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_votes(windows: Tensor, transforms: Tensor, offsets: Tensor | None = None) -> Tensor:
    """Multiply every child pose by the transformation matrix of each parent type.

    The child pose is on the left (``V = M · W``), as in the IBM implementation.

    Args:
        windows: ``(N, L, I, P, P)``, poses of the ``I`` children read by each of the
            ``L`` windows.
        transforms: ``(I, C, P, P)``, one matrix per child slot and parent type, shared
            over window positions.
        offsets: Optional ``(I, P·P)`` constants added to every vote of each child slot
            (coordinate addition).

    Returns:
        ``(N, L, C, I, P·P)`` votes, parent types before children, the layout of
        :func:`matcaps.routing.em_routing`.
    """
    n, num_windows, children, pose_size, _ = windows.shape
    votes = torch.einsum("nlixy,icyz->nlcixz", windows, transforms)
    votes = votes.reshape(n, num_windows, transforms.shape[1], children, pose_size * pose_size)
    return votes if offsets is None else votes + offsets


def block_diagonal_transforms(transforms: Tensor) -> Tensor:
    """``(I, P·P, C·P·P)`` matrices ``K_i[(x', y), (c, x, z)] = δ(x, x') W_icyz`` from ``(I, C, P, P)``."""
    children, parent_types, pose_size, _ = transforms.shape
    blocks = transforms.new_zeros(children, pose_size, pose_size, parent_types, pose_size, pose_size)
    by_row = transforms.permute(0, 2, 1, 3)  # (I, y, C, z)
    for row in range(pose_size):
        blocks[:, row, :, :, row, :] = by_row
    return blocks.view(children, pose_size * pose_size, parent_types * pose_size * pose_size)


def child_major_poses(windows: Tensor) -> Tensor:
    """``(N, L, I, P, P)`` → ``(I, N·L, P·P)``, the left operand of the batched products."""
    n, num_windows, children, pose_size, _ = windows.shape
    return windows.reshape(n * num_windows, children, pose_size * pose_size).transpose(0, 1).contiguous()


def kronecker_products_(products: Tensor, child_major: Tensor, blocks: Tensor) -> Tensor:
    """Compute every vote (without offsets) into ``products`` and view them in the routing's layout.

    No autograd.  The fused routing reads the votes through the returned strided view
    and writes what it needs (the votes less a per-parent reference) in one pass.

    Args:
        products: ``(I, N·L, C·H)`` destination.
        child_major: ``(I, N·L, H)`` from :func:`child_major_poses`.
        blocks: ``(I, H, C·H)`` from :func:`block_diagonal_transforms`.

    Returns:
        ``(N·L·C, I, H)`` view of ``products``: ``V_ij`` for parent ``j = (n, l, c)``, child ``i``.
    """
    children, entries = blocks.shape[:2]
    torch.bmm(child_major, blocks, out=products)
    return products.view(children, -1, entries).transpose(0, 1)


def kronecker_votes_backward(
    grad_votes: Tensor, grad_products: Tensor, child_major: Tensor, transforms: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of the child poses and transforms from the gradient of the votes.

    Args:
        grad_votes: ``(N, L, C, I, H)``.
        grad_products: ``(I, N·L, C·H)`` scratch space.
        child_major: ``(I, N·L, H)`` as in the forward pass.
        transforms: ``(I, C, P, P)``.

    Returns:
        ``(grad_windows, grad_transforms)`` of shapes ``(N, L, I, P, P)`` and ``(I, C, P, P)``.
    """
    n, num_windows, parent_types, children, entries = grad_votes.shape
    pose_size = transforms.shape[-1]
    grad_products.view(children, n, num_windows, parent_types, entries).copy_(grad_votes.permute(3, 0, 1, 2, 4))
    blocks = block_diagonal_transforms(transforms)
    grad_child_major = torch.bmm(grad_products, blocks.transpose(1, 2))  # (I, NL, H)
    grad_windows = grad_child_major.transpose(0, 1).reshape(n, num_windows, children, pose_size, pose_size)
    grad_blocks = torch.bmm(child_major.transpose(1, 2), grad_products)  # (I, H, C·H)
    grad_blocks = grad_blocks.view(children, pose_size, pose_size, parent_types, pose_size, pose_size)
    grad_by_row = torch.diagonal(grad_blocks, dim1=1, dim2=4).sum(dim=-1)  # only the x' = x blocks are weights
    return grad_windows, grad_by_row.permute(0, 2, 1, 3).contiguous()
