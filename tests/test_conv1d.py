"""conv1d.py: Conv1d over sequences is trained on selected channels, exactly and as costed."""

import pytest
import torch
import torch.nn as nn

from helpers import check_exact_conversion, swapped_and_plain

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny shapes; the cores are shared


def _sequence_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(5, 12, 3, padding=1), nn.GELU(),
        nn.Conv1d(12, 12, 5, padding=4, dilation=2, groups=12), nn.SiLU(),
        nn.Conv1d(12, 9, 1, stride=2), nn.ReLU(), nn.Conv1d(9, 6, 3, groups=3),
        nn.Flatten(), nn.Linear(6 * 7, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv1d_net_is_exact_and_measured_bytes_equal_the_cost_model(seed):
    x = torch.randn(3, 5, 17, dtype=torch.float64)
    controller, trady, plain = check_exact_conversion(_sequence_net(), x, keep_ratio=0.15, seed=seed)
    assert not controller.profile.other_modules
    assert [l.kind for l in controller.layers] == ["conv"] * 4 + ["linear"]
    assert 0 < trady < plain


def test_trained_conv1d_keeps_only_its_selected_channels_and_unbatched_input_works():
    conv = nn.Conv1d(6, 4, 3, padding=1).double()
    x0 = torch.randn(2, 6, 11, dtype=torch.float64)
    grad, grad_plain, saved, _, swapped = swapped_and_plain(conv, x0)
    torch.testing.assert_close(grad, grad_plain, rtol=1e-12, atol=1e-12)
    assert saved == 2 * 6 * 11 * 8          # every channel selected: the whole input
    swapped[0].selected_channels = torch.tensor([4, 1])
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    y = swapped[0](x)
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
