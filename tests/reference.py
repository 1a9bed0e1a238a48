"""Single-process references written the way the seeds write them: every model in one process,
one optimizer over ``itertools.chain(...)``, one joint objective, one backward pass."""

from __future__ import annotations

import itertools

import torch


class SeedModule(torch.nn.Module):
    """Seed 000's ``Module`` (with its ``self.inputs`` typo fixed)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.input = torch.nn.Linear(in_features, 2 * in_features)
        self.activation = torch.nn.PReLU()
        self.output = torch.nn.Linear(2 * in_features, out_features)

    def get_weight(self):
        return self.activation.weight

    def forward(self, inputs):
        return self.output(self.activation(self.input(inputs)))


def sequential_batches(dataset, batch_size):
    """Batches in dataset order, dropping an incomplete last batch, forever (poptrain's `shuffle: false`)."""
    inputs, targets = dataset.tensors
    per_epoch = len(inputs) // batch_size
    for index in itertools.count():
        start = (index % per_epoch) * batch_size
        yield inputs[start : start + batch_size], targets[start : start + batch_size]


def seed000_joint_training(module1, module2, batches, steps, lr, margin=2.0):
    """Seed 000 verbatim: ``total = loss1 + loss2 + relu(2 - |w1 - w2|.sum())``, one Adam over both."""
    optimizer = torch.optim.Adam(itertools.chain(module1.parameters(), module2.parameters()), lr=lr)
    criterion = torch.nn.functional.mse_loss
    for _ in range(steps):
        inputs, targets = next(batches)
        optimizer.zero_grad()
        output1 = module1(inputs)
        output2 = module2(inputs)
        loss1 = criterion(output1, targets)
        loss2 = criterion(output2, targets)
        total_loss = loss1 + loss2
        total_loss += torch.nn.functional.relu(margin - torch.abs(module1.get_weight() - module2.get_weight()).sum())
        total_loss.backward()
        optimizer.step()
    return module1, module2
