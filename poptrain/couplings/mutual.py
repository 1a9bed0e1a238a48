"""Mutual learning (Zhang et al., DML, arXiv 1706.00384): members learn from each other's predictions.

Every member it trains adds ``weight * T^2 * mean over peers of KL(p_peer^T || p_self^T)`` to its
objective, where ``p^T = softmax(outputs / T)`` on the step's batch and the peers' predictions are
fixed targets (they arrive as plain tensors). With ``target: ensemble`` the peers' mean
probability is one target instead. For regression outputs, ``divergence: mse`` uses the mean
squared difference to each peer's outputs (or to their mean).

Two modes:

* ``predictions``: the samples are the members' own batches, which must be the same samples in
  the same order (the check says so before anything starts): views of the same images, as seed
  003's three models see them, qualify. Predictions (batch x classes numbers) travel in the loss
  exchange, after the forward pass, so with ``exchange.every: 1`` in ``sync`` mode each member's
  gradient is exactly the single-process DML objective's. With ``every: k`` the term is added at
  exchange steps only (predictions are valid for the batch they were made on); ``async`` is refused.
* ``codistillation`` (Anil et al., arXiv 1804.03235): members exchange their weights every
  ``refresh_every`` exchanges, and each computes its peers' predictions on its own batch with the
  peers' last weights (``torch.func.functional_call`` on the peers' architectures). Members may
  train on different data (shards); their inputs must fit each other's models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field

from poptrain.config.schema import CouplingConfig
from poptrain.couplings.base import Coupling, Quantity, register

OUTPUTS = "outputs"  # the key of a member's prediction quantity


class MutualConfig(CouplingConfig):
    mode: Literal["predictions", "codistillation"] = Field(
        "predictions",
        description="`predictions`: members exchange their predictions on their own (aligned) batches every exchange; `codistillation`: "
        "members exchange their weights every `refresh_every` exchanges, and each computes its peers' predictions on its own batch "
        "with the peers' last weights (members may then train on different data).",
    )
    refresh_every: int = Field(1, ge=1, description="`codistillation`: peers' weights are sent every this many exchanges (and used, stale, in between).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature T; the term is scaled by T^2 so its gradients keep their size.")
    target: Literal["each", "ensemble"] = Field(
        "each", description="`each`: the mean over peers of the divergence to each; `ensemble`: the divergence to the peers' mean prediction."
    )
    divergence: Literal["kl", "mse"] = Field(
        "kl", description="`kl` between predicted class distributions (classification), `mse` between outputs (regression)."
    )


@register("mutual")
class Mutual(Coupling[MutualConfig]):
    """Each trained member towards its peers' predictions on the same samples (see the module)."""

    Config = MutualConfig
    config: MutualConfig
    term_is_joint = False  # each member learns towards its peers: a term of its own

    def __init__(self, config: MutualConfig, population):
        super().__init__(config, population)
        self._peer_models: dict[str, torch.nn.Module] = {}  # codistillation: the peers' architectures

    def reads(self) -> list[Quantity]:
        if self.config.mode == "predictions":
            return [Quantity(m, "pred", OUTPUTS) for m in self.members]
        # Codistillation: every member's weights, and its own batch and outputs, which stay with it.
        weights = [Quantity(m, "param", n) for m in self.members for n in self.population.param_shapes[m]]
        return weights + [Quantity(m, "local", key) for m in self.members for key in ("inputs", OUTPUTS)]

    def read_every(self) -> int:
        return self.config.refresh_every if self.config.mode == "codistillation" else 1

    def _predictions(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``member``'s own outputs (live) and its peers' on the same samples (fixed)."""
        if self.config.mode == "predictions":
            return q[Quantity(member, "pred", OUTPUTS)], [q[Quantity(p, "pred", OUTPUTS)] for p in self._peers(member)]
        own, inputs = q[Quantity(member, "local", OUTPUTS)], q[Quantity(member, "local", "inputs")]
        return own, [self._peer_outputs(p, q, inputs) for p in self._peers(member)]

    def _peer_outputs(self, peer: str, q: Mapping[Quantity, torch.Tensor], inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``peer``'s predictions on ``inputs`` (the batch's inputs as the model takes them: the tuple of
        its arguments a member keeps as its ``local`` ``inputs``, or one tensor) with its last exchanged
        weights (its own buffers: a BatchNorm's running statistics are its initial ones), in eval
        mode, without gradients."""
        from torch.func import functional_call

        if peer not in self._peer_models:
            from poptrain.components.build import build_model
            from poptrain.config.schema import Component

            with torch.random.fork_rng(devices=[]):  # its initial weights are never used: draw nothing from the member's stream
                self._peer_models[peer] = build_model(Component(**self.population.models[peer])).eval()
        model = self._peer_models[peer].to(inputs[0].device)
        weights = {n: q[Quantity(peer, "param", n)] for n in self.population.param_shapes[peer]}
        with torch.no_grad():
            return functional_call(model, weights, inputs)

    def _peers(self, member: str) -> list[str]:
        return [m for m in self.members if m != member]

    def _divergence(self, own: torch.Tensor, peers: list[torch.Tensor]) -> torch.Tensor:
        """From ``own`` outputs [batch, ...] to the peers' (fixed) outputs."""
        if self.config.divergence == "mse":
            targets = [torch.stack(peers).mean(dim=0)] if self.config.target == "ensemble" else peers
            return _tensor_sum([F.mse_loss(own, t.detach()) for t in targets]) / len(targets)
        t = self.config.temperature
        log_own = F.log_softmax(own / t, dim=-1)
        probabilities = [F.softmax(p.detach() / t, dim=-1) for p in peers]
        if self.config.target == "ensemble":
            probabilities = [torch.stack(probabilities).mean(dim=0)]
        kls = [F.kl_div(log_own, p, reduction="batchmean") for p in probabilities]
        return t * t * _tensor_sum(kls) / len(kls)

    def value_for(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor | None:
        """``member``'s term; None on a step whose peers' predictions it does not have (between
        exchanges with ``exchange.every > 1``: predictions are only valid for the batch they were made on)."""
        if self.config.mode == "predictions" and any(Quantity(p, "pred", OUTPUTS) not in q for p in self._peers(member)):
            return None
        return self._term_of(member, q)

    def _term_of(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor:
        """``member``'s term, from the values in ``q`` (its peers' predictions among them)."""
        return self._divergence(*self._predictions(member, q))

    def value(self, q: Mapping[Quantity, torch.Tensor]) -> torch.Tensor:
        """The sum of the trained members' terms (what the parent run logs; in codistillation,
        which needs each member's own batch, the members alone log theirs); 0 where it trains
        none (``trains: []``). Evaluated where ``q`` has every value it reads."""
        if not self.trains:
            return torch.zeros(())  # the builtin sum of no terms, 0, as a tensor
        return _tensor_sum([self._term_of(m, q) for m in self.trains])

    @torch.no_grad()  # read, never trained through
    def metrics(self, step: int, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """Each trained member's divergence (``divergence/<m>``) and, for classification, the fraction
        of samples on which members' predicted classes agree: every pair's mean (``agreement``) and
        each member with the peers' ensemble (``agreement/<m>``)."""
        if self.config.mode != "predictions":  # needs each member's own batch: the members log their terms
            return {}
        out = {f"divergence/{m}": float(self._term_of(m, q)) for m in self.trains}
        if self.config.divergence == "kl":
            outputs = {m: q[Quantity(m, "pred", OUTPUTS)] for m in self.members}
            predicted = {m: o.argmax(dim=-1) for m, o in outputs.items()}
            pairs = [(a, b) for i, a in enumerate(self.members) for b in self.members[i + 1 :]]
            out["agreement"] = sum(float((predicted[a] == predicted[b]).float().mean()) for a, b in pairs) / len(pairs)
            for m in self.members:
                ensemble = torch.stack([outputs[p].softmax(dim=-1) for p in self._peers(m)]).mean(dim=0).argmax(dim=-1)
                out[f"agreement/{m}"] = float((predicted[m] == ensemble).float().mean())
        return out

    def metrics_for(self, member: str, q: Mapping[Quantity, torch.Tensor]) -> dict[str, float]:
        """On the member's run: ``agreement``, the fraction of its batch on which its predicted class
        is its peers' ensemble's (classification)."""
        if self.config.divergence != "kl" or self.value_for(member, q) is None:
            return {}
        own, peers = self._predictions(member, q)
        ensemble = torch.stack([p.softmax(dim=-1) for p in peers]).mean(dim=0)
        return {"agreement": float((own.argmax(dim=-1) == ensemble.argmax(dim=-1)).float().mean())}

    @classmethod
    def check_config(cls, config: MutualConfig, run) -> list[tuple[str, str]]:
        members = config.members or run.member_names
        problems = [("members", "mutual learning needs at least two members")] if len(members) < 2 else []
        if config.mode == "predictions" and run.exchange.mode == "async":
            # Peers' newest predictions would be for other batches than the member's own.
            problems.append(
                (
                    "mode",
                    "predictions compare members on the same batch, which needs `exchange.mode: sync`; "
                    "`mode: codistillation` learns from peers' (stale) weights in async mode",
                )
            )
        return problems

    def check_population(self) -> list[tuple[str, str]]:
        """The members' batches must be the same samples in the same order, and their outputs of one shape."""
        problems = []
        first = self.members[0]
        for member in self.members[1:]:
            if self.population.outputs[member] != self.population.outputs[first]:
                problems.append(
                    (
                        "members",
                        f"members {first!r} and {member!r} predict outputs of shapes {list(self.population.outputs[first])} and "
                        f"{list(self.population.outputs[member])} per sample: mutual learning compares predictions, which must have one shape",
                    )
                )
            mine, theirs = self.population.samples[first], self.population.samples[member]
            if self.config.mode == "codistillation":  # each member's own batch goes through its peers' models
                if mine["inputs"] != theirs["inputs"]:
                    problems.append(
                        (
                            "members",
                            f"members {first!r} and {member!r} take inputs of shapes {mine['inputs']} and {theirs['inputs']} per sample: "
                            "in codistillation each member runs its peers' models on its own batch",
                        )
                    )
                continue
            unaligned = self.population.unaligned_batches(first, member)
            if unaligned:
                problems.append(("members", unaligned))
        if self.config.divergence == "kl" and self.population.outputs[first] and self.population.outputs[first][-1] < 2:
            problems.append(
                (
                    "divergence",
                    f"`kl` compares class distributions, but members predict {list(self.population.outputs[first])} per sample: use `divergence: mse`",
                )
            )
        return problems


def _tensor_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``sum(tensors)``, the builtin's (``0 + t_1 + t_2 ...``: bitwise what the terms always were),
    of a list of tensors that is not empty (each caller divides by its length, or has some), so a
    tensor."""
    return cast(torch.Tensor, sum(tensors))
