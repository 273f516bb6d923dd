"""Pictures of what the capsules and the routing do on one image: ``matcaps show RUN|CKPT|NAME IMAGE``.

:func:`trace_image` runs a capsule network on one image file (preprocessed as in evaluation)
and traces the EM routing of each routed layer (ConvCaps1, ConvCaps2, ClassCaps) with the
straightforward implementation (:func:`matcaps.routing.trace_em_routing`, one extra E-step to
get the assignments after the last iteration).  :func:`draw_routing` draws, in one figure:

* the input as the network sees it, and the class-capsule activations (the winner in colour);
* the routing weights ``r_ij`` of each routed layer at each EM iteration (the ones that
  iteration's M-step used; iteration 1 is the uniform prior): rows are parent capsule types
  (classes for ClassCaps), columns the children of a window (kernel slot, then child type;
  for ClassCaps every capsule of the last map, position then type), averaged over the
  windows (parent positions) of a convolutional layer;
* Hinton et al.'s Figure 2: for each class capsule ``j`` and each iteration ``t``, the
  histogram of the distances ``‖V_ij − μ_j‖`` between its votes and its mean after iteration
  ``t``, each vote weighted by its assignment probability ``r_ij`` after iteration ``t``
  (the E-step given that mean): routing concentrates the winner's weight on close votes.

The figure has :func:`panel_count` panels (colour bars aside).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from matcaps.errors import ConfigError
from matcaps.figures import pyplot, save_and_close
from matcaps.routing import RoutingTrace, compute_votes, trace_em_routing
from matcaps.trained import TrainedNetwork, class_scores, preprocess_image

#: The routed layers of a CapsNet, in order (names of ``CapsNet.capsule_layers()``).
ROUTED_LAYERS: tuple[str, ...] = ("conv_caps1", "conv_caps2", "class_caps")
#: Panels above the routing pictures: the input and the class activations.
HEADER_PANELS = 2
#: Bins of the vote-distance histograms (shared by every panel).
DISTANCE_BINS = 30


@dataclass(frozen=True)
class LayerTrace:
    """The routing of one layer on one image.

    Attributes:
        name: The layer (one of :data:`ROUTED_LAYERS`).
        iterations: ``T`` states, one per EM iteration the network runs (``routing`` is
            ``(1, L, C, I)``, ``mean``/``variance`` ``(1, L, C, H)``, ``activations`` ``(1, L, C)``).
        final_assignment: ``(1, L, C, I)`` the assignment probabilities after the last iteration.
        votes: ``(1, L, C, I, H)`` the votes ``V_ij``.
    """

    name: str
    iterations: list[RoutingTrace]
    final_assignment: Tensor
    votes: Tensor

    def assignment_after(self, iteration: int) -> Tensor:
        """``(1, L, C, I)``: the assignment probabilities after iteration ``iteration`` (0-based)."""
        if iteration + 1 < len(self.iterations):
            return self.iterations[iteration + 1].routing
        return self.final_assignment

    def vote_distances(self, iteration: int) -> Tensor:
        """``(1, L, C, I)``: ``‖V_ij − μ_j‖`` for the means after iteration ``iteration`` (0-based)."""
        mean = self.iterations[iteration].mean.unsqueeze(3)  # (1, L, C, 1, H)
        return (self.votes - mean).norm(dim=-1)


@dataclass(frozen=True)
class ImageTrace:
    """A capsule network on one image.

    Attributes:
        image: The file.
        network_input: ``(C, S, S)`` what the network sees.
        class_activations: ``(K,)`` the network's class-capsule activations.
        layers: :class:`LayerTrace` of each routed layer, by name.
    """

    image: Path
    network_input: Tensor
    class_activations: Tensor
    layers: dict[str, LayerTrace]

    @property
    def winner(self) -> int:
        return int(self.class_activations.argmax())

    @property
    def iterations(self) -> int:
        return len(self.layers[ROUTED_LAYERS[-1]].iterations)


def _trace_layer(name: str, layer: torch.nn.Module, poses: Tensor, activations: Tensor) -> LayerTrace:
    """Trace ``layer`` on its inputs, with one more E-step than it runs (see the module docstring)."""
    inputs = layer.routing_inputs(poses, activations)
    votes = compute_votes(inputs.windows, inputs.transforms, inputs.vote_offsets)
    config = dataclasses.replace(layer.routing, iterations=layer.routing.iterations + 1)
    states = trace_em_routing(votes, inputs.child_activations, layer.beta_v, layer.beta_a, inputs.geometry, config)
    return LayerTrace(name, states[:-1], states[-1].routing, votes)


@torch.no_grad()
def trace_image(network: TrainedNetwork, path: str | Path) -> ImageTrace:
    """Run the capsule network ``network`` on the image file ``path`` and trace its routing.

    Raises:
        ConfigError: ``network`` is not a capsule network.
        DataFormatError: the image cannot be read.
    """
    if not network.is_capsule_network:
        raise ConfigError(f"matcaps show pictures the routing of capsule networks; {network.checkpoint} "
                          f"holds a {network.model_config.to_dict().get('architecture', 'network')}")
    network_input = preprocess_image(path, network)
    layers = network.model.capsule_layers()
    captured: dict[str, tuple[Tensor, Tensor]] = {}
    handles = [
        layers[name].register_forward_hook(lambda module, inputs, output, name=name: captured.__setitem__(name, inputs))
        for name in ROUTED_LAYERS
    ]  # fmt: skip
    try:
        activations = class_scores(network, network_input.unsqueeze(0))[0].cpu()
    finally:
        for handle in handles:
            handle.remove()
    traces = {name: _trace_layer(name, layers[name], *captured[name]) for name in ROUTED_LAYERS}
    return ImageTrace(Path(path), network_input, activations, traces)


def panel_count(num_classes: int, iterations: int) -> int:
    """Panels of :func:`draw_routing`: input and activations, routing weights per layer and iteration,
    and one vote-distance histogram per class and iteration."""
    return HEADER_PANELS + len(ROUTED_LAYERS) * iterations + num_classes * iterations


def _display_image(network_input: Tensor) -> tuple[Tensor, str | None]:
    """The network input scaled to [0, 1] for display (``(S, S)`` grey or ``(S, S, 3)`` colour) and its colour map."""
    low, high = network_input.min(), network_input.max()
    image = (network_input - low) / (high - low).clamp(min=1e-12)
    if image.shape[0] == 1:
        return image[0], "gray"
    return image.permute(1, 2, 0), None


def draw_routing(trace: ImageTrace, class_names: tuple[str, ...], title: str = ""):
    """The figure described in the module docstring (a ``matplotlib.figure.Figure``)."""
    plt = pyplot()

    iterations, num_classes = trace.iterations, len(class_names)
    width = max(12.0, 1.6 * num_classes)
    figure = plt.figure(figsize=(width, 3.2 + 2.0 * len(ROUTED_LAYERS) + 1.6 * iterations), layout="constrained")
    header, routing, distances = figure.subfigures(3, 1, height_ratios=[3.2, 2.0 * len(ROUTED_LAYERS), 1.6 * iterations])
    if title:
        figure.suptitle(title, fontsize=10)

    # the input and the class activations
    image_axes, bar_axes = header.subplots(1, 2, width_ratios=[1, 3])
    image, cmap = _display_image(trace.network_input)
    image_axes.imshow(image.numpy(), cmap=cmap, interpolation="nearest")
    image_axes.set_title(f"{trace.image.name}\ninput {'×'.join(map(str, trace.network_input.shape))}", fontsize=9)
    image_axes.set_xticks([])
    image_axes.set_yticks([])
    colours = ["tab:orange" if k == trace.winner else "tab:blue" for k in range(num_classes)]
    bar_axes.barh(range(num_classes), trace.class_activations.numpy(), color=colours)
    bar_axes.set_yticks(range(num_classes), class_names, fontsize=8)
    bar_axes.invert_yaxis()
    bar_axes.set_xlim(0, 1)
    bar_axes.set_xlabel("class-capsule activation")
    bar_axes.set_title(f"class capsules: {class_names[trace.winner]} ({float(trace.class_activations.max()):.3f})",
                       fontsize=9)

    # the routing weights of each layer at each iteration
    grid = routing.subplots(len(ROUTED_LAYERS), iterations, squeeze=False)
    for row, name in enumerate(ROUTED_LAYERS):
        weights = [state.routing[0].mean(dim=0) for state in trace.layers[name].iterations]  # (C, I) each
        top = max(float(w.max()) for w in weights)
        for column, matrix in enumerate(weights):
            axes = grid[row][column]
            picture = axes.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
            windows = trace.layers[name].iterations[column].routing.shape[1]
            where = "" if windows == 1 else f", mean of {windows} windows"
            axes.set_title(f"{name} iteration {column + 1}: r_ij{where}", fontsize=8)
            axes.set_ylabel("parent type" if name != "class_caps" else "class", fontsize=7)
            axes.set_xlabel("child in window", fontsize=7)
            axes.tick_params(labelsize=6)
        routing.colorbar(picture, ax=grid[row].tolist(), shrink=0.9, label="routing weight")

    # Figure 2 of Hinton et al.: distances of the class capsules' votes to their means
    class_layer = trace.layers[ROUTED_LAYERS[-1]]
    all_distances = [class_layer.vote_distances(t)[0, 0] for t in range(iterations)]  # (K, I) each
    top = max(float(d.max()) for d in all_distances)
    bins = torch.linspace(0, top if top > 0 else 1.0, DISTANCE_BINS + 1).numpy()
    histograms = distances.subplots(iterations, num_classes, squeeze=False, sharex=True)
    for t in range(iterations):
        assignment = class_layer.assignment_after(t)[0, 0]  # (K, I)
        for k in range(num_classes):
            axes = histograms[t][k]
            colour = "tab:orange" if k == trace.winner else "tab:blue"
            axes.hist(all_distances[t][k].numpy(), bins=bins, weights=assignment[k].numpy(), color=colour)
            axes.set_title(f"{class_names[k]}, it. {t + 1}", fontsize=7, color=colour)
            axes.tick_params(labelsize=5)
            if k == 0:
                axes.set_ylabel("Σ r_ij", fontsize=7)
            if t == iterations - 1:
                axes.set_xlabel("‖V_ij − μ_j‖", fontsize=7)
    distances.suptitle("votes of each class capsule: distance to its mean after each iteration, "
                       "weighted by the assignment probabilities", fontsize=9)
    return figure


def routing_picture_name(image: str | Path) -> str:
    """``routing-<image stem>.png``, with characters other than letters, digits, ``.-_`` replaced."""
    return f"routing-{re.sub(r'[^A-Za-z0-9._-]', '_', Path(image).stem)}.png"


def save_figure(figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (atomically: a temporary file renamed into place) and close it."""
    return save_and_close(figure, path, dpi=100)
