"""The Triton kernel of one EM iteration over blocks of parents kept in registers.

Imported only by :mod:`matcaps.routing.triton_routing`, and only when the ``"triton"``
implementation is used: importing this module imports Triton.  Whether the kernel is
compiled for a GPU or run by Triton's interpreter (on CPU tensors, for the tests) is decided
by Triton when this module is first imported: set ``TRITON_INTERPRET=1`` before that.

One program handles one window, i.e. the ``C`` parents ``(n, l, c)`` at one parent position
of one sample, ``BLOCK_C`` parent types at a time (a ``(BLOCK_C, I, H)`` tile of votes: one type
on a GPU, where registers are the limit, with one child per thread holding its ``H`` pose
entries; all of them under the interpreter, whose cost is per operation).  For each block of
parent types it

1. computes the votes ``V_ih = Σ_y M_ixy W_icyz (+ offset_ih)`` of the window's ``I``
   children (``h = x·P + z``) into registers (or reads them, for given votes);
2. (all iterations but the first) recomputes the previous iteration's logits
   ``z_ij = ln(a_j + ε) − ½ Σ_h (V_ih − μ_jh)²/σ²_jh − ½ Σ_h ln(2π σ²_jh)`` from that
   iteration's per-parent statistics, and the routing weights
   ``r_ij = exp(z_ij − m_i) / T_i`` with the child's maximum ``m_i`` and total ``T_i`` over
   every parent that reaches it (computed between two launches, see below);
   the first iteration reads the prior ``1 / (|P(x_i)| · C)`` instead;
3. runs the M-step (``R_j``, ``μ_j``, ``σ²_j``, ``cost_j``, ``a_j``) and writes ``μ_j``,
   ``σ²_j`` and ``a_j``;
4. (all iterations but the last) computes this iteration's logits with the new statistics
   and folds them, type by type, into a running maximum and sum of exponentials per window
   slot, written once per slot at the end.

Nothing votes-sized is written: the outputs are per parent (``(N, L, C, H)``) and per
window slot (``(N, L, I)``).  The per-child maximum and total over all the windows that
contain a child are combined from the per-slot partials by a scatter between two launches.

The loop over parent types has a compile-time bound: Triton's interpreter cannot run
``range`` over a kernel argument under NumPy 2 (it converts a 1-element array to an integer).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Constants the kernel reads from a small tensor of the data's dtype (a Python float
#: argument would reach the kernel as float32, which is not exact enough in float64).
#: ``LIKELIHOOD_SCALE_IN`` is ``τ`` of the E-step before the iteration's M-step (whose logits it
#: recomputes), ``LIKELIHOOD_SCALE_OUT`` that of the E-step after it.  The kernel reads each at its
#: position in this tuple, written as a literal offset (a compiled kernel can read only ``tl.constexpr``
#: globals); the host side fills each row by these names.
CONSTANT_NAMES = ("EPSILON", "VARIANCE_FLOOR", "COST_FACTOR", "INVERSE_TEMPERATURE", "ENTRIES_LOG_2PI",
                  "LIKELIHOOD_SCALE_IN", "LIKELIHOOD_SCALE_OUT")  # fmt: skip
NUM_CONSTANTS = len(CONSTANT_NAMES)


@triton.jit
def em_iteration_kernel(
    source_ptr,  # windows (N, L, I, P, P) with H = P·P, or votes (N, L, C, I, H) if FROM_VOTES (P unused)
    transforms_ptr,  # (I, C, P, P)
    offsets_ptr,  # (I, H), read if HAS_OFFSETS
    child_activations_ptr,  # (N, L, I)
    slot_child_ptr,  # (L, S) int64: child position of each window slot (child_positions for padding)
    prior_ptr,  # (L, I): initial routing weights, read if FIRST
    child_max_ptr,  # (N, child_positions + 1, B): max of the previous logits over each child's parents
    child_total_ptr,  # (N, child_positions + 1, B): Σ exp(logit − max) over the same parents
    beta_v_ptr,  # (C,)
    beta_a_ptr,  # (C,)
    constants_ptr,  # (NUM_CONSTANTS,) of this iteration
    previous_mean_ptr,  # (N, L, C, H), read unless FIRST
    previous_variance_ptr,  # (N, L, C, H)
    previous_activations_ptr,  # (N, L, C)
    mean_ptr,  # (N, L, C, H) out
    variance_ptr,  # (N, L, C, H) out
    activations_ptr,  # (N, L, C) out
    slot_max_ptr,  # (N, L, I) out unless LAST: max over parent types of this iteration's logits
    slot_sum_ptr,  # (N, L, I) out unless LAST: Σ over parent types of exp(logit − slot max)
    routing_ptr,  # (N, L, C, I) out if STORE_ROUTING: the routing weights this M-step used
    num_windows,
    children,
    child_types,
    window_size,
    child_positions,
    PARENT_TYPES: tl.constexpr,
    POSE: tl.constexpr,
    ENTRIES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_H: tl.constexpr,
    FIRST: tl.constexpr,
    LAST: tl.constexpr,
    FROM_VOTES: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    STORE_ROUTING: tl.constexpr,
):
    # 64-bit offsets of this window's data; offsets inside a window are 32-bit (fewer registers).
    window = tl.program_id(0).to(tl.int64)  # n·L + l
    sample = window // num_windows
    position = window % num_windows
    window_children = window * children
    window_parents = window * PARENT_TYPES
    dtype = mean_ptr.dtype.element_ty

    epsilon = tl.load(constants_ptr + 0)  # EPSILON
    variance_floor = tl.load(constants_ptr + 1)  # VARIANCE_FLOOR
    cost_factor = tl.load(constants_ptr + 2)  # COST_FACTOR
    inverse_temperature = tl.load(constants_ptr + 3)  # INVERSE_TEMPERATURE
    entries_log_2pi = tl.load(constants_ptr + 4)  # ENTRIES_LOG_2PI
    likelihood_scale_in = tl.load(constants_ptr + 5)  # LIKELIHOOD_SCALE_IN
    likelihood_scale_out = tl.load(constants_ptr + 6)  # LIKELIHOOD_SCALE_OUT

    child = tl.arange(0, BLOCK_I)
    entry = tl.arange(0, BLOCK_H)
    child_mask = child < children
    entry_mask = entry < ENTRIES
    pose_mask = child_mask[:, None] & entry_mask[None, :]  # (I, H)
    row = entry // POSE  # x of h = x·P + z
    # z; declared without contiguity so that Triton spreads the children, not h, over the threads:
    # each thread then holds whole rows of votes, and sums over h stay inside a thread.
    col = tl.max_contiguous(entry % POSE, 1)

    child_activations = tl.load(child_activations_ptr + window_children + child, mask=child_mask, other=0.0)
    # Child position read by each slot i = s·B + b, and whether it is a real child (not padding).
    slot = child // child_types
    child_type = child % child_types
    child_position = tl.load(slot_child_ptr + position * window_size + slot, mask=child_mask, other=child_positions)
    child_position = child_position.to(tl.int32)
    is_child = child_mask & (child_position < child_positions)
    if not FIRST:
        sample_children = sample * (child_positions + 1) * child_types
        per_child = child_position * child_types + child_type
        child_max = tl.load(child_max_ptr + sample_children + per_child, mask=is_child, other=0.0)
        child_total = tl.load(child_total_ptr + sample_children + per_child, mask=is_child, other=1.0)
    if not LAST:
        slot_max = tl.full([BLOCK_I], float("-inf"), dtype)
        slot_sum = tl.zeros([BLOCK_I], dtype)

    for first_type in tl.range(0, PARENT_TYPES, BLOCK_C):  # a constant bound: see the module docstring
        parent_type = first_type + tl.arange(0, BLOCK_C)
        type_mask = parent_type < PARENT_TYPES
        stat_mask = type_mask[:, None] & entry_mask[None, :]  # (C, H)
        tile_mask = type_mask[:, None, None] & pose_mask[None, :, :]  # (C, I, H)
        link_mask = type_mask[:, None] & child_mask[None, :]  # (C, I)
        stat = parent_type[:, None] * ENTRIES + entry[None, :]  # offset of (c, h) in the window's statistics
        link = parent_type[:, None] * children + child[None, :]  # offset of (c, i) in the window's links

        # Votes of every child of the window for these parent types, in registers.
        if FROM_VOTES:
            window_votes = source_ptr + window_parents * children * ENTRIES
            votes = tl.load(window_votes + link[:, :, None] * ENTRIES + entry[None, None, :], mask=tile_mask, other=0.0)
        else:
            votes = tl.zeros([BLOCK_C, BLOCK_I, BLOCK_H], dtype)
            pose_rows = source_ptr + window_children * ENTRIES + (child[:, None] * ENTRIES + (row * POSE)[None, :])
            matrix = child[None, :] * PARENT_TYPES + parent_type[:, None]  # (C, I): index of W_ic
            transform_cols = transforms_ptr + (matrix[:, :, None] * ENTRIES + col[None, None, :])
            for inner in tl.static_range(POSE):
                pose = tl.load(pose_rows + inner, mask=pose_mask, other=0.0)  # M_{i, x, inner}
                transform = tl.load(transform_cols + inner * POSE, mask=tile_mask, other=0.0)  # W_{i, c, inner, z}
                votes += pose[None, :, :] * transform
            if HAS_OFFSETS:
                offsets = tl.load(offsets_ptr + child[:, None] * ENTRIES + entry[None, :], mask=pose_mask, other=0.0)
                votes += tl.where(type_mask[:, None, None], offsets[None, :, :], 0.0)

        # Routing weights of this iteration's M-step.
        if FIRST:
            # The prior is the same for every parent type, but read per type, as a (C, I) tile inside
            # the loop: read once before it, ptxas spilled ~1 KB of registers per thread here.
            same_child = link - parent_type[:, None] * children
            routing = tl.load(prior_ptr + position * children + same_child, mask=link_mask, other=0.0)
        else:
            window_stats = window_parents * ENTRIES
            previous_mean = tl.load(previous_mean_ptr + window_stats + stat, mask=stat_mask, other=0.0)
            previous_variance = tl.load(previous_variance_ptr + window_stats + stat, mask=stat_mask, other=1.0)
            previous_activation = tl.load(
                previous_activations_ptr + window_parents + parent_type, mask=type_mask, other=0.0
            )
            deviation = tl.where(tile_mask, votes - previous_mean[:, None, :], 0.0)
            distance = tl.sum(deviation * deviation / previous_variance[:, None, :], axis=2)  # (C, I)
            log_variance_sum = tl.sum(tl.log(previous_variance), axis=1)  # masked entries read 1
            logits = (
                tl.log(previous_activation + epsilon) - (0.5 * likelihood_scale_in) * (entries_log_2pi + log_variance_sum)
            )[:, None]
            logits = logits - (0.5 * likelihood_scale_in) * distance
            # exp(−inf) = 0 for padding slots and masked lanes (whose maximum was not read).
            shifted = tl.where(link_mask & is_child[None, :], logits - child_max[None, :], float("-inf"))
            routing = tl.exp(shifted) / child_total[None, :]
        if STORE_ROUTING:
            tl.store(routing_ptr + window_parents * children + link, routing, mask=link_mask)

        # M-step (Procedure 1, lines 2-7, with Gritzman's cost normalisation).
        weighted = routing * child_activations[None, :]  # r'        (C, I)
        data = tl.sum(weighted, axis=1)  # R                          (C,)
        weights = weighted / (data + epsilon)[:, None]
        mean = tl.sum(weights[:, :, None] * votes, axis=1)  # μ       (C, H)
        deviation = tl.where(tile_mask, votes - mean[:, None, :], 0.0)
        squares = deviation * deviation
        variance = tl.sum(weights[:, :, None] * squares, axis=1) + variance_floor
        variance = tl.where(stat_mask, variance, 1.0)
        log_variance_sum = tl.sum(tl.log(variance), axis=1)
        beta_v = tl.load(beta_v_ptr + parent_type, mask=type_mask, other=0.0)
        beta_a = tl.load(beta_a_ptr + parent_type, mask=type_mask, other=0.0)
        cost = cost_factor * data * (ENTRIES * beta_v + 0.5 * log_variance_sum)
        logit = inverse_temperature * (beta_a - cost)
        decay = tl.exp(-tl.abs(logit))  # a sigmoid that never overflows: cost is often ~1e4
        activation = tl.where(logit >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))
        tl.store(mean_ptr + window_parents * ENTRIES + stat, mean, mask=stat_mask)
        tl.store(variance_ptr + window_parents * ENTRIES + stat, variance, mask=stat_mask)
        tl.store(activations_ptr + window_parents + parent_type, activation, mask=type_mask)

        if not LAST:
            # E-step logits with the new statistics, folded into a running log-sum-exp per slot.
            distance = tl.sum(squares / variance[:, None, :], axis=2)  # (C, I)
            logits = (
                tl.log(activation + epsilon) - (0.5 * likelihood_scale_out) * (entries_log_2pi + log_variance_sum)
            )[:, None]
            logits = tl.where(type_mask[:, None], logits - (0.5 * likelihood_scale_out) * distance, float("-inf"))
            new_max = tl.maximum(slot_max, tl.max(logits, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            slot_sum = slot_sum * tl.exp(slot_max - shift) + tl.sum(tl.exp(logits - shift[None, :]), axis=0)
            slot_max = new_max

    if not LAST:
        tl.store(slot_max_ptr + window_children + child, slot_max, mask=child_mask)
        tl.store(slot_sum_ptr + window_children + child, slot_sum, mask=child_mask)
