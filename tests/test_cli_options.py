"""The command's run options come from RunConfig's fields, and resolve() alone checks them."""

from __future__ import annotations

import dataclasses

import pytest

from trady_triton import cli
from trady_triton.config import RunConfig

# fields a caller sets in code only (the command stops and resumes through --resume)
CODE_ONLY = {"max_epochs_this_call"}


def _dests(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def test_every_runconfig_field_is_an_option_and_no_option_retyped():
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    parser = cli.build_parser()
    assert fields - CODE_ONLY <= _dests(parser)
    args = parser.parse_args([])
    config = cli._config_from_args(args)
    default = RunConfig()
    for name in fields - CODE_ONLY:
        want = "d-topk" if name == "policy" else getattr(default, name)
        assert getattr(config, name) == want, name


def test_option_values_reach_the_config_by_field_name():
    args = cli.build_parser().parse_args(
        ["--model", "mcunet-in1", "--warmup-epochs", "2", "--lr", "0.03", "--train-subset",
         "all", "--test-subset", "7", "--coverage", "0.9", "--threads", "2", "--policy",
         "trady"])
    config = cli._config_from_args(args)
    assert (config.model, config.warmup_epochs, config.lr, config.train_subset,
            config.test_subset, config.coverage, config.threads, config.policy) == \
        ("mcunet-in1", 2, 0.03, 0, 7, 0.9, 2, "d-topk")


@pytest.mark.parametrize("args,message", [
    (["--threads", "0"], "threads=0: allowed values are integers >= 1"),
    (["--max-batches", "-1"], "max_batches=-1: allowed values are integers >= 1"),
    (["--val-subset", "0"], "val_subset=0: allowed values are integers >= 1"),
    (["--coverage", "1.5"], "coverage=1.5: allowed values are in (0, 1]"),
    (["--train-subset", "many"], "'many': allowed values are integers >= 1 or 'all'"),
    (["--resolution", "4"], "resolution=4: allowed values are integers >= 8"),
])
def test_out_of_range_options_exit_2_with_resolves_message(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
