"""Built-in models: the seeds' architectures, configurable from YAML."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "prelu": nn.PReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """Seed 000's module, generalised: ``input -> activation -> [hidden.i -> activation_i] -> output``.

    With one hidden layer the parameter names are exactly the seed's: ``input.*``,
    ``activation.weight`` (the PReLU slope, shape [1]) and ``output.*``.
    Inputs [batch, in_features] -> outputs [batch, out_features].
    """

    def __init__(self, in_features: int, out_features: int, hidden: int | Sequence[int] | None = None, activation: str = "relu"):
        super().__init__()
        widths = [2 * in_features] if hidden is None else ([hidden] if isinstance(hidden, int) else list(hidden))
        if not widths or any(int(w) <= 0 for w in widths):
            raise ValueError(f"hidden widths must be positive, got {hidden!r}")
        self.input = nn.Linear(in_features, widths[0])
        self.activation = make_activation(activation)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.hidden_activations = nn.ModuleList(make_activation(activation) for _ in widths[1:])
        self.output = nn.Linear(widths[-1], out_features)

    def get_weight(self) -> torch.Tensor:
        """The first activation's parameter (seed 000's accessor)."""
        return self.activation.weight  # type: ignore[return-value]  # torch types a submodule's attributes as Tensor | Module

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.input(inputs))
        for layer, act in zip(self.hidden, self.hidden_activations, strict=True):
            x = act(layer(x))
        return self.output(x)


class EncoderClassifier(nn.Module):
    """Seed 003's branch: ``encoder`` (Linear+ReLU(+Dropout) x depth) then ``head`` (Linear to logits).

    Inputs [batch, in_features] -> logits [batch, num_classes] (use ``cross_entropy``, which
    applies the softmax the seed puts in the model).
    """

    def __init__(self, in_features: int, num_classes: int, num_nodes: int = 64, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be at least 1")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, num_nodes), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = num_nodes
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(num_nodes, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(inputs))


class LSTMClassifier(nn.Module):
    """Seed 002's model: ``lstm`` over a sequence, then ``linear`` on the last hidden state.

    Inputs [batch, time, input_size] -> logits [batch, num_classes].
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, num_layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, batch_first=True)
        self.linear = nn.Linear(hidden_size, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(inputs)
        return self.linear(outputs[:, -1])


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "encoder_classifier": EncoderClassifier, "lstm_classifier": LSTMClassifier}
