"""The one table formatter (trady_triton/tables.py) and the LambdaLR learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from trady_triton import train as T
from trady_triton.tables import markdown_table, mib, pct, text_table


def test_text_table_pads_aligns_and_rules_the_header():
    text = text_table(["name", "value"], [["a", "1.5"], ["longer", "22"]], align="lr")
    assert text.split("\n") == ["name    value",
                                "------  -----",
                                "a         1.5",
                                "longer     22"]
    right = text_table(["x", "yy"], [["10", "3"]])
    assert right.split("\n") == [" x  yy", "--  --", "10   3"]


def test_text_table_names_the_allowed_align_values():
    with pytest.raises(ValueError, match=r"align='lrl': give one letter \(l or r\) or one per "
                                         r"column \(2\)"):
        text_table(["a", "b"], [["1", "2"]], align="lrl")


def test_markdown_table_and_number_formats():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]).split("\n") == \
        ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]
    assert mib(3 * 2 ** 20 + 2 ** 19) == "3.50" and mib(2 ** 20, 3) == "1.000"
    assert mib(None) == "-" and pct(None) == "-" and pct(0.1234) == "12.3"


@pytest.mark.parametrize("total,warmup", [(17, 5), (9, 0), (4, 3)])
def test_lambdalr_schedule_follows_lr_at(total, warmup):
    base = 0.07
    weight = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([weight], lr=base)
    scheduler = T.warmup_cosine(optimizer, total, warmup)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [T.lr_at(s, total, warmup, base) for s in range(total)]
    for got, want in zip(seen, expected):
        assert math.isclose(got, want, rel_tol=1e-15, abs_tol=1e-18)
    assert seen[0] < base if warmup else seen[0] == pytest.approx(base)
