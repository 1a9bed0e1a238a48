"""Parameters in shared memory (poptrain.exchange.mapped_memory): the member and the coordinator see one
copy; the model, its optimizer and its state dict work as before; nothing is left in /dev/shm."""

from __future__ import annotations

import os

import pytest
import torch

from poptrain.couplings.averaging import average_pass
from poptrain.exchange import mapped_memory

pytestmark = pytest.mark.skipif(not os.path.isdir(mapped_memory.SHM_DIR), reason="no /dev/shm")


@pytest.fixture
def model_in_mapped_memory(request):
    """A small model whose two parameters were moved into shared memory, with its layout."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.PReLU())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tag = f"test-{request.node.name[:40]}"
    layout = mapped_memory.map_parameters(dict(model.named_parameters()), ["0.weight", "1.weight"], tag, "node-a")
    yield model, before, layout, tag
    mapped_memory.remove_leftovers(tag)


def test_moving_parameters_into_shared_memory_keeps_their_values_and_the_model_trainable(model_in_mapped_memory):
    model, before, layout, _ = model_in_mapped_memory
    assert layout is not None and os.path.exists(layout.path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before["0.weight"]), "the optimizer updates the shared parameter"
    model.load_state_dict(before)
    assert torch.equal(mapped_memory.map_layout(layout)["0.weight"], before["0.weight"]), "load_state_dict writes into the shared file"


def test_the_coordinator_sees_the_members_updates_and_the_member_sees_the_coordinators_writes(model_in_mapped_memory):
    model, _, layout, _ = model_in_mapped_memory
    views = mapped_memory.attach(layout, "node-a")
    assert set(views) == {"0.weight", "1.weight"}, "a view of each mapped parameter"
    assert not os.path.exists(layout.path), "attached: the name is gone, the mappings stay"
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(views["0.weight"], model[0].weight.detach())
    views["1.weight"].fill_(0.25)
    assert model[1].weight.item() == 0.25
    assert model[0].bias.data_ptr() not in {v.data_ptr() for v in views.values()}, "only the named parameters are shared"


def test_a_coordinator_on_another_node_does_not_attach_and_the_member_keeps_its_values(model_in_mapped_memory):
    model, before, layout, tag = model_in_mapped_memory
    assert mapped_memory.attach(layout, "node-b") is None
    mapped_memory.release(layout)
    assert not os.path.exists(layout.path)
    assert torch.equal(model[0].weight.detach(), before["0.weight"])


def test_files_no_coordinator_attached_are_removed_at_the_end_of_the_run(model_in_mapped_memory):
    _, _, layout, tag = model_in_mapped_memory
    mapped_memory.remove_leftovers(tag)
    assert not os.path.exists(layout.path)


def test_the_chunked_average_is_bitwise_the_plain_mean_and_gives_each_distance_to_it():
    torch.manual_seed(1)
    values = [torch.randn(1000, 7) for _ in range(3)]
    out = torch.empty(1000, 7)
    mean, squares = average_pass(values, None, out, chunk=256)
    assert mean is out
    assert torch.equal(out, (values[0] + values[1] + values[2]) / 3), "the same operations, element by element"
    expected = [float(((v.double() - out.double()) ** 2).sum()) for v in values]
    assert squares == pytest.approx(expected, rel=1e-5)
    weighted, _ = average_pass(values, [0.5, 0.25, 0.25], chunk=256)
    assert torch.equal(weighted, (values[0] * 0.5).add_(values[1], alpha=0.25).add_(values[2], alpha=0.25))
    none, again = average_pass(values, None, keep=False, chunk=256)
    assert none is None and again == pytest.approx(squares, rel=1e-6)
    only_mean, no_distances = average_pass(values, None, distances=False, chunk=256)
    assert torch.equal(only_mean, out) and no_distances is None
