"""Checkpoint mid-training and resume: bit-identical to an uninterrupted run.

Model + optimizer + controller go into one torch.save file that loads with
torch.load(weights_only=True); ranking files and controller states are
validated on load.
"""

import json
import math

import pytest
import torch
import torch.nn as nn

import trady_triton as tt
from trady_triton.ranking import LayerRanking

from helpers import small_net

EXAMPLE = torch.randn(4, 3, 15, 13, generator=torch.Generator().manual_seed(0))
EPOCHS, STEPS = 3, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(epoch, step):
    g = torch.Generator().manual_seed(100 * epoch + step)
    return torch.randn(4, 3, 15, 13, generator=g), torch.randint(0, 5, (4,), generator=g)


def _fresh(seed=11, perturb=False):
    net = small_net()
    if perturb:                      # a resumed process starts from other weights
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
    controller = tt.convert(net, 0.3, example_input=EXAMPLE, policy="d-topk", seed=seed)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.05)
    controller.mask_optimizer(optimizer)
    return net, controller, optimizer


def _run(net, controller, optimizer, start=(0, 0), stop=None):
    """Train from (epoch, step) up to but excluding ``stop`` (epoch, step)."""
    epoch, step = start
    while epoch < EPOCHS:
        if step == 0:
            controller.resample(epoch)
        while step < STEPS:
            if stop is not None and (epoch, step) == stop:
                return
            x, y = _batch(epoch, step)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            step += 1
        epoch, step = epoch + 1, 0


@pytest.mark.filterwarnings("ignore:no layer ranking")
@pytest.mark.parametrize("stop", [(1, 2), (2, 0)])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, stop):
    net, controller, optimizer = _fresh()
    _run(net, controller, optimizer)
    expected = net.state_dict()
    expected_optimizer = optimizer.state_dict()

    net, controller, optimizer = _fresh()
    _run(net, controller, optimizer, stop=stop)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "controller": controller.state_dict(), "position": list(stop)}, path)
    del net, controller, optimizer

    resumed, controller, optimizer = _fresh(seed=999, perturb=True)   # seed comes from the file
    state = torch.load(path, weights_only=True)
    resumed.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    controller.load_state_dict(state["controller"])
    epoch, step = state["position"]
    assert controller.epoch == epoch and controller.seed == 11
    _run(resumed, controller, optimizer, start=(epoch, step))
    for key, value in expected.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    got = optimizer.state_dict()["state"]
    for index, entry in expected_optimizer["state"].items():
        for name, value in entry.items():
            assert torch.equal(got[index][name], value), (index, name)


def test_controller_state_is_validated_on_load():
    _, controller, _ = _fresh()
    good = controller.state_dict()
    _, other, _ = _fresh()
    for bad, message in [({**good, "version": 99}, "version"),
                         ({**good, "policy": "s-topk"}, "policy"),
                         ({**good, "pool": good["pool"] + ["nope"]}, "pool layers"),
                         ({**good, "selection": {"nope": torch.tensor([0])}}, "unknown"),
                         ({**good, "selection": {good["pool"][0]: torch.tensor([10_000])}},
                          "channels must be")]:
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(bad)


def _write(path, payload):
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_ranking_files_are_validated_on_load(tmp_path):
    ok = {"format": "trady-ranking", "version": 1,
          "architectures": {"small": {"scores": {"0": 1.0, "5": 2.0}, "steps": 3}}}
    assert tt.load_ranking(_write(tmp_path / "ok.json", ok), "small").scores == {"0": 1.0, "5": 2.0}
    cases = {
        "broken.json": ("{not json", "not readable JSON"),
        "format.json": ({**ok, "format": "other"}, "format="),
        "version.json": ({**ok, "version": 2}, "version"),
        "archs.json": ({**ok, "architectures": []}, "architectures"),
        "arch.json": ({**ok, "architectures": {"other": ok["architectures"]["small"]}}, "no ranking"),
        "nan.json": ({**ok, "architectures": {"small": {"scores": {"0": math.nan}}}}, "finite"),
        "negative.json": ({**ok, "architectures": {"small": {"scores": {"0": -1.0}}}}, "non-negative"),
        "empty.json": ({**ok, "architectures": {"small": {"scores": {}}}}, "scores"),
        "steps.json": ({**ok, "architectures": {"small": {"scores": {"0": 1.0}, "steps": -2}}}, "steps"),
    }
    for name, (payload, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            tt.load_ranking(_write(tmp_path / name, payload), "small")
    with pytest.raises(ValueError, match="this model does not have"):
        tt.convert(small_net(), 0.3, example_input=EXAMPLE,
                   ranking=LayerRanking("small", {"0": 1.0, "ghost.conv": 2.0}, 1))
    # a ranking file that fits the model drives the pool
    path = _write(tmp_path / "fits.json", ok)
    controller = tt.convert(small_net(), 0.3, example_input=EXAMPLE, ranking=path, arch="small")
    assert set(controller.pool) <= {"0", "5"}


def test_checkpoint_holds_only_weights_only_types(tmp_path):
    net, controller, optimizer = _fresh()
    _run(net, controller, optimizer, stop=(0, 2))
    path = tmp_path / "c.pt"
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "controller": controller.state_dict()}, path)
    state = torch.load(path, weights_only=True)      # raises on any pickled object
    assert state["controller"]["epoch"] == 0
    assert set(state["controller"]["selection"]) == set(controller.selection)
