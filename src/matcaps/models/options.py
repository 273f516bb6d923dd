"""Model options given as text (``KEY=VALUE``) and applied to a :class:`CapsNetConfig`.

``matcaps train --model-option`` and ``matcaps bench --set`` share this: the same keys
(``conv1_channels=32``, ``routing.e_step_scales=[1,0.2]``, ``layer_routing.class_caps.iterations=3``),
the same value syntax (numbers, then YAML scalars and lists) and the same checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from matcaps.errors import ConfigError
from matcaps.models.config import CapsNetConfig
from matcaps.routing import MAX_ITERATIONS, EMRoutingConfig


def parse_model_options(items: Iterable[str], flag: str = "--model-option") -> dict[str, Any]:
    """``["a=1", "routing.epsilon=1e-9"]`` → ``{"a": 1, "routing": {"epsilon": 1e-9}}``.

    A dotted key is a path into nested tables.  ``flag`` names the option in error messages.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, text = split_assignment(item, flag)
        value = parse_option_value(text, f"{flag} {key}")
        target = options
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{flag} {key}: {parent} is given a value and sub-options at once")
        target[leaf] = value
    return options


def split_assignment(item: str, flag: str, form: str = "KEY=VALUE") -> tuple[str, str]:
    """``"KEY=VALUE"`` → ``("KEY", "VALUE")``, both stripped; one line naming ``flag`` when there is no key."""
    key, separator, text = item.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"{flag} expects {form}, got {item!r}")
    return key.strip(), text.strip()


def parse_option_value(text: str, option: str) -> Any:
    """A number if ``text`` is one (``1e-4`` included, which YAML 1.1 reads as a string), else a YAML scalar or list."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{option}: cannot parse value {text!r}") from None


def apply_model_options(base: CapsNetConfig, options: Mapping[str, Any], **routing: Any) -> CapsNetConfig:
    """``base`` with the model ``options`` applied, then the ``routing`` fields that are not None.

    Args:
        base: The preset (already fitted to the data's shape).
        options: Top-level :class:`CapsNetConfig` fields; ``routing`` is a table of changes to
            :class:`~matcaps.routing.EMRoutingConfig` fields, ``layer_routing`` one per routed layer.
        routing: Routing fields set last, e.g. ``iterations`` from ``--iters`` (None: unchanged).

    Raises:
        ConfigError: an unknown field, a bad value, or iterations that do not fit the E-step scales.
    """
    merged = base.to_dict()
    changes = dict(options)
    routing_changes = changes.pop("routing", {})
    if not isinstance(routing_changes, Mapping):
        raise ConfigError(f"model option routing must be a table, got {routing_changes!r}")
    merged.update(changes)
    merged["routing"].update(routing_changes)
    merged["routing"].update({name: value for name, value in routing.items() if value is not None})
    try:
        config = CapsNetConfig.from_dict(merged)
    except TypeError as error:
        raise ConfigError(f"invalid model options: {error}") from None
    check_routing_iterations(config.routing, "routing")
    for layer in config.layer_routing:
        check_routing_iterations(config.routing_of(layer), f"layer_routing.{layer}")
    return config


def check_routing_iterations(routing: EMRoutingConfig, option: str) -> None:
    """Iterations within 1 to :data:`~matcaps.routing.MAX_ITERATIONS`, and no more E-step scales than E-steps run."""
    if not 1 <= routing.iterations <= MAX_ITERATIONS:
        where = "" if option == "routing" else f" ({option})"
        raise ConfigError(f"routing iterations must be between 1 and {MAX_ITERATIONS}, got {routing.iterations}{where}")
    e_steps = routing.iterations - 1
    if len(routing.e_step_scales) > e_steps:
        raise ConfigError(
            f"model option {option}.e_step_scales gives {len(routing.e_step_scales)} scale(s), but "
            f"{routing.iterations} routing iteration(s) run {e_steps} E-step(s)"
        )
