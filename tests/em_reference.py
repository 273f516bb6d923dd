"""A slow, loop-by-loop EM routing written straight from the equations, for the tests.

It shares no code with ``matcaps``: parents, children and their links are enumerated
with plain Python loops over one sample at a time, in float64 NumPy.  Equations (Hinton
et al. 2018, Procedure 1, with Gritzman's three corrections):

    r'_ij = r_ij a_i,  R_j = Σ_i r'_ij
    μ_jh = Σ_i r'_ij V_ijh / (R_j + ε)
    σ²_jh = Σ_i r'_ij (V_ijh − μ_jh)² / (R_j + ε) + floor
    cost_j = f · R_j · Σ_h (β_v + ½ ln σ²_jh),   f = 100 · C / (children per window)
    a_j = sigmoid(λ_t (β_a − cost_j)),           λ_t = 0.01 (1 − 0.95^(t+1))
    ln p_ij = Σ_h [ −(V_ijh − μ_jh)² / (2σ²_jh) − ½ ln(2π σ²_jh) ]
    r_ij = exp(z_ij) / Σ_{j' reaching i} exp(z_ij'),   z_ij = ln(a_j + ε) + τ_t ln p_ij
    (τ_t = 1 in the paper; the E-step scales of this project otherwise)
    r_ij(0) = 1 / (number of parent positions reaching i × C)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Constants:
    iterations: int = 2
    final_lambda: float = 0.01
    lambda_decay: float = 0.95
    cost_scale: float = 100.0
    variance_floor: float = 1e-9
    epsilon: float = 1e-9
    e_step_scales: tuple = ()


@dataclass
class Trace:
    """Per iteration: dicts keyed by parent ``(position, type)`` or link ``(parent, child)``."""

    routing: list[dict] = field(default_factory=list)
    mean: list[dict] = field(default_factory=list)
    variance: list[dict] = field(default_factory=list)
    activation: list[dict] = field(default_factory=list)


def em_route(votes: dict, child_activation: dict, parent_types: int, children_per_window: int,
             beta_v: np.ndarray, beta_a: np.ndarray, k: Constants) -> Trace:
    """Route one sample.

    Args:
        votes: ``{(parent_position, parent_type, child): 16-vector}`` for every link.
        child_activation: ``{child: a_i}``.
        children_per_window: the ``kk·B`` (or ``H·W·D``) of the layer factor.
    """
    parents = sorted({(p, c) for (p, c, _) in votes})
    links_of_parent: dict = {j: [] for j in parents}
    links_of_child: dict = {}
    for (p, c, i) in votes:
        links_of_parent[(p, c)].append(i)
        links_of_child.setdefault(i, []).append((p, c))
    positions_of_child = {i: len({p for (p, _) in js}) for i, js in links_of_child.items()}
    routing = {(j, i): 1.0 / (positions_of_child[i] * parent_types) for j in parents for i in links_of_parent[j]}
    factor = k.cost_scale * parent_types / children_per_window
    trace = Trace()
    for t in range(k.iterations):
        lam = k.final_lambda * (1 - k.lambda_decay ** (t + 1))
        mean, variance, activation = {}, {}, {}
        for j in parents:
            (p, c) = j
            weighted = {i: routing[(j, i)] * child_activation[i] for i in links_of_parent[j]}
            data = sum(weighted.values())
            mu = sum(weighted[i] * votes[(p, c, i)] for i in weighted) / (data + k.epsilon)
            var = sum(weighted[i] * (votes[(p, c, i)] - mu) ** 2 for i in weighted) / (data + k.epsilon)
            var = var + k.variance_floor
            cost = factor * data * sum(beta_v[c] + 0.5 * math.log(v) for v in var)
            mean[j], variance[j] = mu, var
            activation[j] = 1.0 / (1.0 + math.exp(-lam * (beta_a[c] - cost)))
        trace.routing.append(dict(routing))
        trace.mean.append(mean)
        trace.variance.append(variance)
        trace.activation.append(activation)
        if t == k.iterations - 1:
            break
        tau = k.e_step_scales[t] if t < len(k.e_step_scales) else 1.0
        logits = {}
        for j in parents:
            (p, c) = j
            for i in links_of_parent[j]:
                d = votes[(p, c, i)] - mean[j]
                log_p = sum(-d[h] ** 2 / (2 * variance[j][h]) - 0.5 * math.log(2 * math.pi * variance[j][h])
                            for h in range(len(d)))
                logits[(j, i)] = math.log(activation[j] + k.epsilon) + tau * log_p
        routing = {}
        for i, js in links_of_child.items():
            top = max(logits[(j, i)] for j in js)
            total = sum(math.exp(logits[(j, i)] - top) for j in js)
            for j in js:
                routing[(j, i)] = math.exp(logits[(j, i)] - top) / total
    return trace


def conv_caps_links(poses: np.ndarray, weights: np.ndarray, kernel: int, stride: int, padding: int) -> tuple[dict, tuple]:
    """Votes of a convolutional capsule layer for one sample.

    Args:
        poses: ``(H, W, B, 4, 4)``.
        weights: ``(K, K, B, C, 4, 4)``.

    Returns:
        ``votes`` keyed ``((oy, ox), c, (y, x, b))`` and the parent grid size.
    """
    height, width, child_types = poses.shape[:3]
    parent_types = weights.shape[3]
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    votes = {}
    for oy in range(out_h):
        for ox in range(out_w):
            for ky in range(kernel):
                for kx in range(kernel):
                    y, x = oy * stride + ky - padding, ox * stride + kx - padding
                    if not (0 <= y < height and 0 <= x < width):
                        continue
                    for b in range(child_types):
                        for c in range(parent_types):
                            votes[((oy, ox), c, (y, x, b))] = (poses[y, x, b] @ weights[ky, kx, b, c]).reshape(-1)
    return votes, (out_h, out_w)


def class_caps_links(poses: np.ndarray, weights: np.ndarray, coordinate_addition: bool) -> dict:
    """Votes of the class-capsule layer for one sample.

    Args:
        poses: ``(H, W, D, 4, 4)``.
        weights: ``(D, classes, 4, 4)``, shared over positions.

    Returns:
        ``votes`` keyed ``(0, class, (y, x, d))``.
    """
    height, width, child_types = poses.shape[:3]
    votes = {}
    for y in range(height):
        for x in range(width):
            for d in range(child_types):
                for c in range(weights.shape[1]):
                    vote = poses[y, x, d] @ weights[d, c]
                    if coordinate_addition:
                        vote = vote.copy()
                        vote[0, 3] += (x + 0.5) / width
                        vote[1, 3] += (y + 0.5) / height
                    votes[(0, c, (y, x, d))] = vote.reshape(-1)
    return votes


def conv_caps_outputs(poses: np.ndarray, activations: np.ndarray, weights: np.ndarray, kernel: int, stride: int,
                      padding: int, beta_v: np.ndarray, beta_a: np.ndarray, k: Constants) -> tuple[np.ndarray, np.ndarray]:
    """Last iteration's means ``(OH, OW, C, 16)`` and activations ``(OH, OW, C)`` of a ConvCaps layer, one sample.

    Args:
        poses: ``(H, W, B, 4, 4)``; activations: ``(H, W, B)``; weights: ``(K, K, B, C, 4, 4)``.
    """
    votes, (out_h, out_w) = conv_caps_links(poses, weights, kernel, stride, padding)
    trace = em_route(votes, _activation_map(activations), weights.shape[3], kernel * kernel * poses.shape[2],
                     beta_v, beta_a, k)
    means = np.zeros((out_h, out_w, weights.shape[3], 16))
    parent_activations = np.zeros((out_h, out_w, weights.shape[3]))
    for ((oy, ox), c), mean in trace.mean[-1].items():
        means[oy, ox, c] = mean
        parent_activations[oy, ox, c] = trace.activation[-1][((oy, ox), c)]
    return means, parent_activations


def class_caps_outputs(poses: np.ndarray, activations: np.ndarray, weights: np.ndarray, coordinate_addition: bool,
                       beta_v: np.ndarray, beta_a: np.ndarray, k: Constants) -> tuple[np.ndarray, np.ndarray]:
    """Last iteration's means ``(classes, 16)`` and activations ``(classes,)`` of the class capsules, one sample.

    Args:
        poses: ``(H, W, D, 4, 4)``; activations: ``(H, W, D)``; weights: ``(D, classes, 4, 4)``.
    """
    votes = class_caps_links(poses, weights, coordinate_addition)
    classes = weights.shape[1]
    trace = em_route(votes, _activation_map(activations), classes, int(np.prod(poses.shape[:3])), beta_v, beta_a, k)
    means = np.stack([trace.mean[-1][(0, c)] for c in range(classes)])
    return means, np.array([trace.activation[-1][(0, c)] for c in range(classes)])


def _activation_map(activations: np.ndarray) -> dict:
    height, width, types = activations.shape
    return {(y, x, b): float(activations[y, x, b]) for y in range(height) for x in range(width) for b in range(types)}
