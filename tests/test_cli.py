"""The ``pcamlib`` command line: each subcommand reaches its function; errors are one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pcamlib.cli as cli
from pcamlib import config
from pcamlib.cli import _overrides, main
from pcamlib.pcam import file_name, validate_split


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for command in ("download", "import", "sample", "validate", "train", "evaluate",
                    "reproduce", "refresh-notebooks"):
        assert command in text


def test_sample_then_validate(tmp_path, capsys):
    dest = tmp_path / "s"
    assert main(["sample", "--dest", str(dest), "--train", "64", "--valid", "32", "--test", "32",
                 "--quiet"]) == 0
    assert validate_split(dest, "train").length == 64
    assert main(["validate", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "train: 64 rows, 32 positives, meta CSV: ok" in out


def test_validate_reports_the_bad_file(tmp_path, capsys):
    dest = tmp_path / "s"
    main(["sample", "--dest", str(dest), "--train", "64", "--valid", "32", "--test", "32",
          "--quiet"])
    (dest / file_name("valid", "y")).unlink()
    assert main(["validate", str(dest)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and file_name("valid", "y") in err and "not found" in err


def test_full_size_validation_names_expected_length(tmp_path, capsys):
    dest = tmp_path / "s"
    main(["sample", "--dest", str(dest), "--train", "64", "--valid", "32", "--test", "32",
          "--quiet"])
    assert main(["validate", str(dest), "--splits", "train", "--full-size"]) == 1
    assert "262,144" in capsys.readouterr().err


def test_unknown_profile_field_is_an_error(tmp_path, capsys):
    assert main(["train", "--profile", "sample", "--set", "epoch=2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "unknown profile parameter" in err and "'epoch'" in err and "epochs" in err


@pytest.mark.parametrize("pair, message", [
    ("bs=0", "bs must be a positive integer"),
    ("patience=-1", "patience must be an integer >= 0"),
    ("lrs={\"resnet\": -0.1}", "learning rate for 'resnet' must be a number in (0, 10)"),
])
def test_bad_parameter_values(pair, message, capsys):
    assert main(["train", "--profile", "sample", "--set", pair, "--quiet"]) == 1
    assert message in capsys.readouterr().err


def test_set_values_parse_as_json_or_text():
    assert _overrides(["epochs=3", "lr_policy=find", "augment={\"max_rotate\": 5}"]) == {
        "epochs": 3, "lr_policy": "find", "augment": {"max_rotate": 5}}
    with pytest.raises(ValueError, match="key=value"):
        _overrides(["epochs"])


@pytest.mark.shared
@pytest.mark.skipif(not config.SHARED_KAGGLE_MINI.is_dir(),
                    reason="../shared/data/kaggle-hcd-mini is absent (outside the project's CI)")
def test_import_kaggle_mini(tmp_path, capsys):
    dest = tmp_path / "k"
    assert main(["import", "kaggle", str(config.SHARED_KAGGLE_MINI), "--dest", str(dest),
                 "--quiet"]) == 0
    total = sum(validate_split(dest, s).length for s in ("train", "valid", "test"))
    assert total == 15


def test_train_has_no_arch_option_only_archs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--arch", "resnet18"])
    assert exit_.value.code == 2
    assert "--arch" in capsys.readouterr().err


def test_set_data_dir_is_the_data_directory(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["train", "--profile", "sample", "--set", f"data_dir={missing}",
                 "--archs", "resnet18", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err


def test_data_dir_given_twice_must_agree(tmp_path, capsys):
    code = main(["evaluate", "--profile", "sample", "--data-dir", str(tmp_path / "a"),
                 "--set", f"data_dir={tmp_path / 'b'}", "--quiet"])
    assert code == 1
    assert "disagree" in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(cli, "_cmd_validate", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["validate", str(tmp_path)])
    monkeypatch.setattr(cli, "_cmd_validate", lambda args: [][1])
    with pytest.raises(IndexError):
        main(["validate", str(tmp_path)])


def test_python_dash_m_pcamlib():
    result = subprocess.run([sys.executable, "-m", "pcamlib", "--help"], capture_output=True,
                            text=True, cwd=config.REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "reproduce" in result.stdout and "evaluate" in result.stdout
