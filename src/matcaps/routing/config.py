"""Hyper-parameters of EM routing, gathered in one explicit configuration object.

Every constant of the routing procedure (Hinton et al. 2018, Procedure 1) and of the
three corrections introduced by Gritzman (2019) lives here, with its meaning and its
source, instead of being buried in the code or read from a global flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from matcaps.errors import ConfigError

#: Highest number of EM iterations the commands accept (Hinton et al. use 3; Gritzman found 2 best).
MAX_ITERATIONS = 3

#: Routing implementations that give the same numbers (see ``matcaps.routing.em``); the first is the default.
ROUTING_IMPLEMENTATIONS: tuple[str, ...] = ("blocked", "fused", "naive", "triton")


@dataclass(frozen=True)
class EMRoutingConfig:
    """Configuration of one EM-routing procedure (shared by every capsule layer of a model).

    Attributes:
        iterations: Number of EM iterations ``T``.  Each runs an M-step; all but the last
            also run an E-step, so ``T = 1`` is a single M-step on the uniform prior.
            Hinton et al. use 3; Gritzman reports the best smallNORB accuracy with 2.
        final_inverse_temperature: ``λ_final`` of the schedule
            ``λ_t = λ_final · (1 − decay^(t+1))`` (Hinton's OpenReview answer); with 0.01
            the three first values are 5.0e-4, 9.75e-4 and 1.43e-3.
        inverse_temperature_decay: ``decay`` of the same schedule.
        cost_scale: The constant 100 of the layer normalisation factor
            ``f_L = cost_scale · C_out / (children per window)`` that makes the cost
            independent of how much data a parent receives (Gritzman's third fix).
        variance_floor: Added to every variance ``σ²_jh`` so that a parent with a single
            child (zero spread) keeps a finite ``ln σ²`` (Gritzman's second fix).
        epsilon: Guards the divisions by the data a parent receives, ``R_j + ε``, and the
            logarithm of parent activations, ``ln(a_j + ε)``.
        implementation: Which implementation computes the routing: ``"blocked"`` (default;
            a compiled CPU kernel that keeps each block of votes in cache, 7-9x faster than
            ``fused`` on the smallNORB network; ``fused`` where it does not apply: on GPU, or
            without a C++ compiler), ``"fused"`` (hand-written backward, low memory),
            ``"naive"`` (plain autograd; kept to measure the gain) or ``"triton"`` (a Triton
            kernel that keeps each window's votes in registers; CUDA tensors only, or Triton's
            interpreter on CPU).  All give the same numbers.
        e_step_scales: ``τ_t`` of every E-step, in order: the E-step after the M-step of
            iteration ``t`` computes its logits as ``z_ij = ln(a_j + ε) + τ_t · ln p_ij``, so
            ``τ_t < 1`` softens the assignment of children to parents (tempered EM, applied
            to the likelihood only).  E-steps without an entry use 1, which is Procedure 1;
            the default ``()`` is the paper's routing.  Not in the paper: an option of this
            project for 3 iterations, whose second E-step with ``τ = 1`` routes the weights
            of a 2-iteration network almost hard (see docs/learning-speed.md).
    """

    iterations: int = 2
    final_inverse_temperature: float = 0.01
    inverse_temperature_decay: float = 0.95
    cost_scale: float = 100.0
    variance_floor: float = 1e-9
    epsilon: float = 1e-9
    implementation: str = ROUTING_IMPLEMENTATIONS[0]
    e_step_scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self._check_e_step_scales()
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"routing iterations must be a positive integer, got {self.iterations!r}")
        for name in ("final_inverse_temperature", "inverse_temperature_decay", "cost_scale", "variance_floor", "epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"routing option {name} must be a number, got {value!r}")
        if not self.final_inverse_temperature > 0:
            raise ConfigError(
                f"final inverse temperature must be positive, got {self.final_inverse_temperature!r}"
            )
        if not 0 <= self.inverse_temperature_decay < 1:
            raise ConfigError(
                f"inverse temperature decay must be in [0, 1), got {self.inverse_temperature_decay!r}"
            )
        for name in ("cost_scale", "variance_floor", "epsilon"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.implementation not in ROUTING_IMPLEMENTATIONS:
            raise ConfigError(
                f"unknown routing implementation {self.implementation!r}; "
                f"choose one of {', '.join(ROUTING_IMPLEMENTATIONS)}"
            )

    def _check_e_step_scales(self) -> None:
        scales = self.e_step_scales
        if isinstance(scales, (list, tuple)):
            object.__setattr__(self, "e_step_scales", tuple(scales))  # a list from a configuration file
            scales = self.e_step_scales
        if not isinstance(scales, tuple) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in scales
        ):
            raise ConfigError(f"routing option e_step_scales must be a list of positive numbers, got {scales!r}")
        if len(scales) > MAX_ITERATIONS - 1:
            raise ConfigError(
                f"routing option e_step_scales has {len(scales)} entries, but at most {MAX_ITERATIONS - 1} "
                f"E-steps run ({MAX_ITERATIONS} iterations)"
            )

    def likelihood_scale(self, iteration: int) -> float:
        """``τ_t``, the scale of ``ln p_ij`` in the E-step after the M-step of 0-based iteration ``t``."""
        return float(self.e_step_scales[iteration]) if iteration < len(self.e_step_scales) else 1.0

    def inverse_temperature(self, iteration: int) -> float:
        """``λ_t = λ_final · (1 − decay^(t+1))`` for the 0-based iteration ``t``."""
        return self.final_inverse_temperature * (1.0 - self.inverse_temperature_decay ** (iteration + 1))

    def cost_factor(self, children_per_window: int, parent_types: int) -> float:
        """Layer normalisation ``f_L = cost_scale · C_out / (children per window)``.

        ``children_per_window`` is ``K·K·B_in`` for a convolutional capsule layer and
        ``H·W·D`` for the class capsules; e.g. 22.2, 11.1 and 1.25 for the three routed
        layers of the small smallNORB network.
        """
        return self.cost_scale * parent_types / children_per_window


#: ``ln(2π)``, the constant of the Gaussian log-likelihood in the E-step.
LOG_2PI: float = math.log(2.0 * math.pi)
