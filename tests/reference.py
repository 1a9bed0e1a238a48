"""Single-process references written the way the seeds write them: every model in one process,
one optimizer over ``itertools.chain(...)``, one joint objective, one backward pass."""

from __future__ import annotations

import copy
import itertools
import random

import torch

from poptrain.config import CouplingConfig
from poptrain.couplings import Coupling, Quantity


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


def seed000_joint_training(module1, module2, batches, steps, lr, margin=2.0, distances=None):
    """Seed 000 verbatim: ``total = loss1 + loss2 + relu(2 - |w1 - w2|.sum())``, one Adam over both.

    ``distances``: a list that gets each step's ``|w1 - w2|.sum()`` (before the step's update).
    """
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
        distance = torch.abs(module1.get_weight() - module2.get_weight()).sum()
        if distances is not None:
            distances.append(float(distance.detach()))
        total_loss += torch.nn.functional.relu(margin - distance)
        total_loss.backward()
        optimizer.step()
    return module1, module2


def seed003_joint_training(models, batches, steps, lr, w=(1.0, 0.5, 0.5), routed=False):
    """Seed 003: ``total = w1*L1 + w2*(L1 - L2) + w3*(L1 - L3)``, one Adam over all three models.

    ``routed``: the author's intent instead: the relative terms train model 1 only (L2 and L3
    enter them detached) and models 2 and 3 train on their own losses.
    """
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    w1, w2, w3 = w
    for _ in range(steps):
        (x1, y1), (x2, y2), (x3, y3) = next(batches)
        optimizer.zero_grad()
        loss_1 = torch.nn.functional.cross_entropy(models[0](x1), y1)
        loss_2 = torch.nn.functional.cross_entropy(models[1](x2), y2)
        loss_3 = torch.nn.functional.cross_entropy(models[2](x3), y3)
        if routed:
            total = w1 * loss_1 + w2 * (loss_1 - loss_2.detach()) + w3 * (loss_1 - loss_3.detach()) + loss_2 + loss_3
        else:
            total = w1 * loss_1 + w2 * (loss_1 - loss_2) + w3 * (loss_1 - loss_3)
        total.backward()
        optimizer.step()
    return models


def squared_loss_gap_joint_training(model1, model2, batches, steps, lr, weight=1.0):
    """Seed 003's two-model relative loss made non-linear: ``total = L1 + L2 + weight * (L1 - L2)**2``,
    one Adam over both models. Unlike ``w2*(L1 - L2)``, each model's gradient depends on the
    other's loss (``2 * weight * (L1 - L2) * dL1``)."""
    optimizer = torch.optim.Adam(itertools.chain(model1.parameters(), model2.parameters()), lr=lr)
    for _ in range(steps):
        (x1, y1), (x2, y2) = next(batches)
        optimizer.zero_grad()
        loss_1 = torch.nn.functional.cross_entropy(model1(x1), y1)
        loss_2 = torch.nn.functional.cross_entropy(model2(x2), y2)
        total = loss_1 + loss_2 + weight * (loss_1 - loss_2) ** 2
        total.backward()
        optimizer.step()
    return model1, model2


def seed001_training(net, features, steps, lr, alpha):
    """Seed 001: ``overall_loss = loss1 + alpha * (-loss2)`` with loss2 the sum of all weights
    (kept in the autograd graph, unlike the seed's ``torch.tensor([...])``)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        out = net(features)
        loss1 = torch.mean(torch.square(torch.tensor(5) - torch.sum(out)))
        loss2 = torch.stack([torch.sum(w_arr) for w_arr in net.parameters()]).sum()
        overall_loss = loss1 + alpha * (-loss2)
        overall_loss.backward()
        opt.step()
    return net


def seed002_average(model1, model2, model3):
    """Seed 002: ``model3`` gets ``(model1.state_dict()[k] + model2.state_dict()[k]) / 2``."""
    from collections import OrderedDict

    param_dict = {}
    for key in model1.state_dict().keys():
        param_dict[key] = (model1.state_dict()[key] + model2.state_dict()[key]) / 2
    model3.load_state_dict(OrderedDict(param_dict))
    return model3


def shared_lstm_training(model1, model2, batches, steps, lr):
    """Seed 002's weight sharing across two models: one LSTM object used by both, ``L1 + L2``,
    one Adam over the distinct parameters."""
    model2.lstm = model1.lstm
    params = list({id(p): p for p in itertools.chain(model1.parameters(), model2.parameters())}.values())
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        (x1, y1), (x2, y2) = next(batches)
        optimizer.zero_grad()
        total = torch.nn.functional.cross_entropy(model1(x1), y1) + torch.nn.functional.cross_entropy(model2(x2), y2)
        total.backward()
        optimizer.step()
    return model1, model2


def mutual_learning_training(models, batches, steps, lr, weight=1.0, temperature=1.0):
    """Deep mutual learning (Zhang et al., 2017) in one process: every model trains on its own
    cross-entropy plus ``weight * T^2 * mean over peers of KL(p_peer^T || p_self^T)``, the peers'
    predictions detached (fixed targets); one Adam over all models, one backward of the sum."""
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    t = temperature
    for _ in range(steps):
        batch = next(batches)
        optimizer.zero_grad()
        outputs = [model(x) for model, (x, _) in zip(models, batch, strict=True)]
        total = sum(torch.nn.functional.cross_entropy(o, y) for o, (_, y) in zip(outputs, batch, strict=True))
        for i, own in enumerate(outputs):
            peers = [torch.softmax(o.detach() / t, dim=-1) for j, o in enumerate(outputs) if j != i]
            kls = [torch.nn.functional.kl_div(torch.log_softmax(own / t, dim=-1), p, reduction="batchmean") for p in peers]
            total = total + weight * t * t * sum(kls) / len(kls)
        total.backward()
        optimizer.step()
    return models


def codistillation_training(models, batches, steps, lr, weight=1.0, temperature=1.0, refresh=1):
    """Codistillation (Anil et al., 2018) in one process: every model trains on its own batch's
    cross-entropy plus ``weight * T^2 * mean over peers of KL(p_peer^T || p_self^T)``, where the
    peers' predictions are computed on that same batch by copies of the peers taken every
    ``refresh`` steps (before that step's update), in eval mode; one Adam over all models."""
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    t, copies = temperature, None
    for step in range(steps):
        if step % refresh == 0:
            copies = [copy.deepcopy(m).eval() for m in models]
        batch = next(batches)
        optimizer.zero_grad()
        outputs = [model(x) for model, (x, _) in zip(models, batch, strict=True)]
        total = sum(torch.nn.functional.cross_entropy(o, y) for o, (_, y) in zip(outputs, batch, strict=True))
        for i, (own, (x, _)) in enumerate(zip(outputs, batch, strict=True)):
            with torch.no_grad():
                peers = [torch.softmax(c(x) / t, dim=-1) for j, c in enumerate(copies) if j != i]
            kls = [torch.nn.functional.kl_div(torch.log_softmax(own / t, dim=-1), p, reduction="batchmean") for p in peers]
            total = total + weight * t * t * sum(kls) / len(kls)
        total.backward()
        optimizer.step()
    return models


def _mean(values):
    """``(v_1 + ... + v_n) / n``, written as seed 002 writes ``(p1 + p2) / 2``."""
    total = values[0] + values[1]
    for value in values[2:]:
        total = total + value
    return total / len(values)


def _snapshot(models):
    return [[p.detach().clone() for p in m.parameters()] for m in models]


def papa_training(models, batches, steps, lr, rate, every=1, stale=False):
    """PAPA (Jolicoeur-Martineau et al., 2023, arXiv 2304.03094) in one process: the models train
    side by side, each on its own batch's cross-entropy (one Adam over all of them, one backward of
    the sum); before every ``every``-th step and after the last one, every parameter moves a
    fraction ``rate`` of the way to the models' mean: ``p_i <- (1 - rate) * p_i + rate * mean(p)``.

    ``stale``: the mean of the values of the previous averaging instead (what a coordinator one
    round late would give), for the test that must tell the two apart."""
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    previous = None
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            current = _snapshot(models)
            source = previous if stale and previous is not None else current
            with torch.no_grad():
                for i, params in enumerate(zip(*(m.parameters() for m in models), strict=True)):
                    mean = _mean([values[i] for values in source])
                    for p in params:
                        p.copy_((1 - rate) * p + rate * mean)
            previous = current
        if step == steps:
            break
        _joint_step(models, optimizer, next(batches))
    return models


def _joint_step(models, optimizer, batch):
    """One step of the models side by side: the sum of their own cross-entropies, one backward, one Adam step."""
    optimizer.zero_grad()
    total = sum(torch.nn.functional.cross_entropy(m(x), y) for m, (x, y) in zip(models, batch, strict=True))
    total.backward()
    optimizer.step()


def gossip_training(models, batches, steps, lr, seed, every=1, stale=False):
    """Gossip averaging (NoLoCo, arXiv 2506.10911) in one process: the models train side by side as
    in :func:`papa_training`; before every ``every``-th step they are shuffled by
    ``random.Random(f"poptrain-gossip-{seed}-{step}")`` and paired two by two, and each pair's
    parameters become the pair's mean ``(p_a + p_b) / 2`` (an odd one out keeps its own).
    Nothing happens after the last step.

    ``stale``: each pair's mean of the values of the previous round instead."""
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    previous = None
    for step in range(steps):
        if step % every == 0:
            order = list(range(len(models)))
            random.Random(f"poptrain-gossip-{seed}-{step}").shuffle(order)
            current = _snapshot(models)
            source = previous if stale and previous is not None else current
            with torch.no_grad():
                for a, b in zip(order[0::2], order[1::2], strict=False):  # an odd number: the last one sits out
                    for i, (pa, pb) in enumerate(zip(models[a].parameters(), models[b].parameters(), strict=True)):
                        mean = (source[a][i] + source[b][i]) / 2
                        pa.copy_(mean)
                        pb.copy_(mean)
            previous = current
        _joint_step(models, optimizer, next(batches))
    return models


def wash_training(models, batches, steps, lr, seed, fraction, every=1, stale=False):
    """WASH (Fournier et al., 2024, arXiv 2405.17517) in one process: the models train side by side
    as in :func:`papa_training`; before every ``every``-th step, for each parameter in turn, each
    position is chosen with probability ``fraction`` and the values the models hold there are
    permuted among them: model ``i`` takes the value of the model ranked ``i``-th by a uniform draw
    per model and position. Draws from ``torch.Generator().manual_seed(random.Random(
    f"poptrain-wash-{seed}-{step}").getrandbits(63))``: per parameter, ``torch.rand(numel)`` (the
    chosen positions, those below ``fraction``), then ``torch.rand(models, chosen)`` (the ranks).
    Nothing happens after the last step.

    ``stale``: the chosen positions take the values of the previous round instead."""
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    previous = None
    for step in range(steps):
        if step % every == 0:
            generator = torch.Generator().manual_seed(random.Random(f"poptrain-wash-{seed}-{step}").getrandbits(63))
            current = _snapshot(models)
            source = previous if stale and previous is not None else current
            with torch.no_grad():
                for i, params in enumerate(zip(*(m.parameters() for m in models), strict=True)):
                    chosen = (torch.rand(params[0].numel(), generator=generator) < fraction).nonzero().flatten().tolist()
                    draws = torch.rand(len(models), len(chosen), generator=generator)
                    for column, position in enumerate(chosen):
                        ranked = sorted(range(len(models)), key=lambda model: float(draws[model, column]))
                        for model, p in enumerate(params):
                            p.view(-1)[position] = source[ranked[model]][i].view(-1)[position]
            previous = current
        _joint_step(models, optimizer, next(batches))
    return models


def diloco_training(models, batches, steps, lr, every, outer_lr, outer_momentum, stale=False):
    """DiLoCo (Douillard et al., 2023, arXiv 2311.08105) in one process: the global weights start as
    the first model's and every model starts from them; the models train side by side as in
    :func:`papa_training` (the inner steps; one Adam, whose state carries across rounds); before
    every ``every``-th step and after the last one, the mean over models of ``global - model`` is
    the outer gradient of ``torch.optim.SGD(momentum=outer_momentum, nesterov=True)`` over the
    global weights, and every model restarts from the new global weights.

    ``stale``: the outer gradient from the models' values at the previous round instead."""
    optimizer = torch.optim.Adam(itertools.chain(*(m.parameters() for m in models)), lr=lr)
    global_params = _snapshot(models)[0]
    outer = torch.optim.SGD(global_params, lr=outer_lr, momentum=outer_momentum, nesterov=True)
    previous = None
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            current = _snapshot(models)
            source = previous if stale and previous is not None else current
            if step > 0:
                for i, g in enumerate(global_params):
                    g.grad = sum(g - values[i] for values in source) / len(models)
                outer.step()
            with torch.no_grad():
                for model in models:
                    for p, g in zip(model.parameters(), global_params, strict=True):
                        p.copy_(g)
            previous = current
        if step == steps:
            break
        _joint_step(models, optimizer, next(batches))
    return models


class TowardPeersMeanConfig(CouplingConfig):
    param: str


class TowardPeersMean(Coupling):
    """A user's coupling whose members each have a term of their own (``term_is_joint = False``):
    member m adds the squared distance from its ``param`` to its peers' mean, the peers' values held
    fixed (each learns towards the others; none is pushed by another's term)."""

    Config = TowardPeersMeanConfig
    term_is_joint = False

    def reads(self) -> list[Quantity]:
        return [Quantity(m, "param", self.config.param) for m in self.members]

    def value_for(self, member: str, q):
        peers = torch.stack([q[Quantity(m, "param", self.config.param)].detach() for m in self.members if m != member]).mean(0)
        return (q[Quantity(member, "param", self.config.param)] - peers).pow(2).sum()

    def value(self, q):
        return sum(self.value_for(m, q) for m in self.members)
