"""Export, load and predict (pcamlib.deploy): the model folder reproduces the run.

One tiny run is trained once per module on learnable toy data (resnet18, 64 train rows,
1 epoch, whole 96x96 patches) and exported with ONNX; the tests compare the model
folder's predictions with the run's own (``pcamlib.evaluate.predict_probs`` on the
Learner of ``load_best_learner``) and feed every kind of bad input and bad model folder.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import make_profile, write_toy_pcam

import pcamlib.runs as R
import pcamlib.train as T
from pcamlib import config, deploy
from pcamlib.cli import main
from pcamlib.evaluate import predict_probs
from pcamlib.importer import import_kaggle
from pcamlib.pcam import PCamSplit, file_name

ARCH = "resnet18"
TOY_SIZES = {"train": 64, "valid": 32, "test": 32}
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("empty_weights_cache")

needs_kaggle = pytest.mark.skipif(
    not config.SHARED_KAGGLE_MINI.is_dir(),
    reason=f"shared Kaggle mini sample not found at {config.SHARED_KAGGLE_MINI}",
)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 1-epoch resnet18 run on toy data (no centre crop)."""
    root = tmp_path_factory.mktemp("deploy")
    data_dir = write_toy_pcam(root / "pcam", sizes=TOY_SIZES)
    profile = make_profile(data_dir, epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = T.train(profile, ARCH, runs_root=root / "runs", progress=False, device=CPU)
    learn, _ = R.load_best_learner(profile, ARCH, runs_root=root / "runs", device=CPU)
    return {"root": root, "data_dir": data_dir, "profile": profile,
            "run_dir": result.run_dir, "learn": learn}


@pytest.fixture(scope="module")
def toy_model(toy_run):
    """The toy run exported with ONNX."""
    out = toy_run["root"] / "model"
    result = deploy.export_model(toy_run["run_dir"], out, onnx=True)
    return {"dir": out, "result": result, "classifier": deploy.load_model(out, device=CPU)}


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"path": str, "row": "Int64"})


# ------------------------------------------------------------------------ model round trip


def test_rebuilt_model_has_the_keys_and_shapes_of_best_pth(toy_run):
    best = torch.load(toy_run["run_dir"] / "best.pth", map_location="cpu", weights_only=True)
    rebuilt = deploy.build_model(ARCH).state_dict()
    learner = toy_run["learn"].model.state_dict()
    assert list(rebuilt) == list(best) == list(learner)
    assert {k: tuple(v.shape) for k, v in rebuilt.items()} \
        == {k: tuple(v.shape) for k, v in best.items()}
    conv = deploy.build_model(ARCH)[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("tta", [False, True])
def test_exported_model_reproduces_the_run(toy_run, toy_model, tta):
    data = PCamSplit(toy_run["data_dir"], "test")
    expected = predict_probs(toy_run["learn"], data, tta=tta)
    got = toy_model["classifier"].predict(data.read_images(np.arange(len(data))), tta=tta)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.ptp(expected) > 0.01  # a trained model, not a constant


def test_model_json_describes_the_run(toy_run, toy_model):
    spec = toy_model["result"].spec.raw
    params = json.loads((toy_run["run_dir"] / "params.json").read_text())
    outcome = json.loads((toy_run["run_dir"] / "run.json").read_text())
    assert spec["format"] == "pcamlib-model" and spec["format_version"] == 1
    assert spec["architecture"] == ARCH
    assert spec["input"] == {"height": 96, "width": 96, "channels": 3, "channel_order": "RGB",
                             "dtype": "uint8", "label_region": "centre 32x32"}
    assert spec["centre_crop"] is None
    assert spec["normalisation"]["mean"] == params["resolved"]["normalisation"]["mean"]
    assert spec["normalisation"]["std"] == params["resolved"]["normalisation"]["std"]
    assert spec["normalisation"]["source"] == "train split"
    assert spec["class_names"] == ["normal", "tumour"] and spec["threshold"] == 0.5
    assert spec["versions"]["torch"] == torch.__version__
    assert spec["data"]["data_dir"] == params["data_dir"]
    assert spec["data"]["identity"] == params["identity"]["data"]
    assert spec["training"]["best_epoch"] == outcome["best_epoch"]
    assert spec["metrics"] is None  # not evaluated
    assert "pcamlib evaluate" in " ".join(toy_model["result"].notes)
    assert spec["weights"]["sha256"] == deploy._sha256(toy_model["dir"] / "model.safetensors")
    assert sorted(p.name for p in toy_model["dir"].iterdir()) == [
        "model.json", "model.onnx", "model.safetensors"]


def test_metrics_and_centre_crop_are_carried_over(toy_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(toy_run["run_dir"], run_dir)
    params = json.loads((run_dir / "params.json").read_text())
    params["identity"]["centre_crop"] = 64
    (run_dir / "params.json").write_text(json.dumps(params))
    pd.DataFrame([{"arch": ARCH, "split": "test", "variant": "plain", "metric": "auc",
                   "value": 0.75, "ci_low": 0.6, "ci_high": 0.9}]).to_csv(
        run_dir / "metrics.csv", index=False)
    result = deploy.export_model(run_dir, tmp_path / "model")
    assert result.spec.centre_crop == 64 and result.notes == []
    assert result.spec.raw["metrics"] == [{"split": "test", "variant": "plain", "metric": "auc",
                                           "value": 0.75, "ci_low": 0.6, "ci_high": 0.9}]
    classifier = deploy.load_model(tmp_path / "model", device=CPU)
    # The crop is part of the pipeline: a 96x96 batch reaches the network as 64x64.
    seen = []
    classifier.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    classifier.predict(np.zeros((2, 96, 96, 3), np.uint8))
    assert tuple(seen[0]) == (2, 3, 64, 64)


def test_loading_never_unpickles(toy_model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load_model unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    classifier = deploy.load_model(toy_model["dir"], device=CPU)
    x = np.full((1, 96, 96, 3), 128, np.uint8)
    assert classifier.predict(x)[0] == toy_model["classifier"].predict(x)[0]


def test_onnx_graph_matches_pytorch(toy_run, toy_model):
    import onnxruntime

    entry = toy_model["result"].spec.raw["onnx"]
    assert entry["max_abs_diff_vs_torch"] <= 1e-4
    assert entry["max_abs_diff_vs_torch"] == toy_model["result"].onnx_max_abs_diff
    session = onnxruntime.InferenceSession(str(toy_model["dir"] / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    data = PCamSplit(toy_run["data_dir"], "test")
    for n in (3, 17):  # the batch dimension is dynamic
        images = data.read_images(np.arange(n))
        onnx_probs = session.run(None, {"images": images})[0]
        assert onnx_probs.shape == (n, 2)
        np.testing.assert_allclose(onnx_probs[:, 1], toy_model["classifier"].predict(images),
                                   rtol=0, atol=1e-4)


# -------------------------------------------------------------------------- predict


def test_predict_pcam_directory_and_h5_file(toy_run, toy_model, tmp_path):
    data_dir = toy_run["data_dir"]
    out = tmp_path / "preds.csv"
    result = deploy.predict_to_csv(toy_model["classifier"], [str(data_dir)], out,
                                   batch_size=20, progress=False)
    table = _read_csv(out)
    assert list(table.columns) == ["path", "row", "prob_tumour", "pred"]
    assert result.rows == len(table) == sum(TOY_SIZES.values())
    start = 0
    for split in ("train", "valid", "test"):  # PCam split order
        n = TOY_SIZES[split]
        part = table.iloc[start:start + n]
        start += n
        assert (part.path == os.path.join(str(data_dir), file_name(split, "x"))).all()
        assert part.row.tolist() == list(range(n))
        expected = predict_probs(toy_run["learn"], PCamSplit(data_dir, split))
        # Batches of 20 here, of 64 there: float32 kernels differ in the last digits.
        np.testing.assert_allclose(part.prob_tumour, expected, rtol=0, atol=1e-5)
        assert (part.pred == (part.prob_tumour >= 0.5)).all()
    # One _x.h5 file as input, with TTA.
    x_file = data_dir / file_name("test", "x")
    deploy.predict_to_csv(toy_model["dir"], [x_file], out, tta=True, progress=False,
                          device=CPU)
    table = _read_csv(out)
    assert (table.path == str(x_file)).all()
    expected = predict_probs(toy_run["learn"], PCamSplit(data_dir, "test"), tta=True)
    np.testing.assert_allclose(table.prob_tumour, expected, rtol=0, atol=1e-6)


@needs_kaggle
def test_predict_kaggle_folder_equals_its_import(toy_model, tmp_path, capsys):
    train_dir = config.SHARED_KAGGLE_MINI / "train"
    out = tmp_path / "kaggle.csv"
    assert main(["predict", str(toy_model["dir"]), str(train_dir), "--out", str(out),
                 "--quiet", "--batch-size", "4", "--device", "cpu"]) == 0
    assert "predicted 15 patches" in capsys.readouterr().out
    table = _read_csv(out)
    assert len(table) == 15 and table.row.isna().all()
    assert table.path.tolist() == sorted(str(train_dir / p.name)
                                         for p in train_dir.glob("*.tif"))
    # The same patches through the importer and the HDF5 path give the same probabilities.
    dest = tmp_path / "imported"
    import_kaggle(config.SHARED_KAGGLE_MINI, dest, progress=False)
    by_id = {}
    for split in ("train", "valid", "test"):
        data = PCamSplit(dest, split)
        probs = toy_model["classifier"].predict(data.read_images(np.arange(len(data))))
        by_id.update(zip(data.meta()["kaggle_id"], probs, strict=True))
    ids = [Path(p).stem for p in table.path]
    np.testing.assert_allclose(table.prob_tumour, [by_id[i] for i in ids], rtol=0, atol=1e-5)


def _bad_folder(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    files = {}
    for i in range(3):
        files[f"good{i}"] = root / f"good{i}.png"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
            files[f"good{i}"])
    files["text"] = root / "notes.png"
    files["text"].write_text("not an image")
    files["size"] = root / "wide.png"
    Image.fromarray(np.zeros((96, 100, 3), np.uint8)).save(files["size"])
    files["grey"] = root / "sub" / "grey.jpg"
    files["grey"].parent.mkdir()
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(files["grey"])
    files["corrupt"] = root / "sub" / "corrupt.tif"  # a valid header, truncated pixel data
    Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(files["corrupt"])
    files["corrupt"].write_bytes(files["corrupt"].read_bytes()[:4000])
    return files


def test_predict_bad_images_error_or_skip(toy_model, tmp_path, capsys):
    files = _bad_folder(tmp_path / "in")
    out = tmp_path / "out" / "preds.csv"
    with pytest.raises(deploy.PredictInputError) as err:
        deploy.predict_to_csv(toy_model["classifier"], [tmp_path / "in"], out, progress=False)
    message = str(err.value)
    assert "notes.png: cannot decode image" in message
    assert "expected a 96x96 RGB image" in message
    assert "--skip-bad" in message
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing partial
    for name, words in (("size", ["image is 100x96", "expected 96x96"]),
                        ("grey", ["image mode is 'L'", "expected 'RGB'"]),
                        ("corrupt", ["cannot decode image", "expected a 96x96 RGB image"])):
        with pytest.raises(deploy.PredictInputError) as err:
            deploy.predict_to_csv(toy_model["classifier"], [files[name]], out, progress=False)
        assert str(files[name]) in str(err.value)
        assert all(w in str(err.value) for w in words)

    assert main(["predict", str(toy_model["dir"]), str(tmp_path / "in"), "--out", str(out),
                 "--skip-bad", "--quiet"]) == 0
    printed = capsys.readouterr().out
    table = _read_csv(out)
    assert sorted(Path(p).name for p in table.path) == ["good0.png", "good1.png", "good2.png"]
    assert "skipped 4 bad images" in printed
    for name in ("text", "size", "grey", "corrupt"):
        assert str(files[name]) in printed


def test_predict_bad_inputs_name_the_file(toy_model, tmp_path):
    model = toy_model["classifier"]
    out = tmp_path / "p.csv"
    with pytest.raises(FileNotFoundError, match="nowhere.png: input not found"):
        deploy.predict_to_csv(model, [tmp_path / "nowhere.png"], out, progress=False)
    text = tmp_path / "list.txt"
    text.write_text("x")
    with pytest.raises(deploy.PredictInputError, match=r"list\.txt: not a supported input.*"
                                                       r"found a \.txt file"):
        deploy.predict_to_csv(model, [text], out, progress=False)
    wrong = tmp_path / "wrong_x.h5"
    with h5py.File(wrong, "w") as fh:
        fh.create_dataset("x", data=np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(deploy.PredictInputError,
                       match=r"wrong_x\.h5: dataset 'x' is \(2, 64, 64, 3\) uint8; "
                             r"expected \(N, 96, 96, 3\) uint8"):
        deploy.predict_to_csv(model, [wrong], out, progress=False)
    garbage = tmp_path / "garbage_x.h5"
    garbage.write_bytes(b"\0" * 100)
    with pytest.raises(deploy.PredictInputError, match="garbage_x.h5: not a readable HDF5"):
        deploy.predict_to_csv(model, [garbage], out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(deploy.PredictInputError, match="empty: folder holds no images"):
        deploy.predict_to_csv(model, [tmp_path / "empty"], out, progress=False)
    assert not out.exists()


def test_interrupted_predict_leaves_no_partial_csv(toy_run, toy_model, tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("previous results\n")

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deploy.predict_to_csv(toy_model["classifier"], [toy_run["data_dir"]], out,
                              batch_size=8, progress=False, on_batch=interrupt)
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


def test_csv_probabilities_read_back_exactly(toy_run, toy_model, tmp_path):
    out = tmp_path / "p.csv"
    x_file = toy_run["data_dir"] / file_name("valid", "x")
    deploy.predict_to_csv(toy_model["classifier"], [x_file], out, progress=False)
    with out.open() as fh:
        written = [float(r["prob_tumour"]) for r in csv.DictReader(fh)]
    data = PCamSplit(toy_run["data_dir"], "valid")
    assert written == toy_model["classifier"].predict(data.read_images(np.arange(32))).tolist()


# ------------------------------------------------------------------- bad model folders


def _copy_model(toy_model, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(toy_model["dir"], target)
    return target


def _edit_json(model_dir: Path, **changes) -> None:
    path = model_dir / "model.json"
    spec = json.loads(path.read_text())
    spec.update(changes)
    path.write_text(json.dumps(spec))


def test_missing_model_files(toy_model, tmp_path):
    with pytest.raises(deploy.ModelFileNotFoundError, match="nothing: model folder not found"):
        deploy.load_model(tmp_path / "nothing")
    model_dir = _copy_model(toy_model, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(deploy.ModelFileNotFoundError,
                       match=r"model\.safetensors: not found; .*model\.json names it"):
        deploy.load_model(model_dir)
    (model_dir / "model.json").unlink()
    with pytest.raises(deploy.ModelFileNotFoundError,
                       match=r"model\.json: not found; a model folder holds"):
        deploy.load_model(model_dir)


@pytest.mark.parametrize(("changes", "words"), [
    ({"format_version": 2}, ["model.json", "format_version is 2",
                             "reads format version 1 only", "newer"]),
    ({"format": "something-else"}, ["model.json", "format is 'something-else'",
                                    "expected 'pcamlib-model'"]),
    ({"architecture": "resnet34"}, ["model.safetensors", "do not fit the architecture",
                                    "missing"]),
    ({"architecture": "not_a_net"}, ["'not_a_net' is not a torchvision model"]),
    ({"centre_crop": 31}, ["model.json", "centre_crop", "31"]),
    ({"threshold": 1.5}, ["model.json", "threshold must be in (0, 1)", "1.5"]),
    ({"input": {"height": 64, "width": 64, "channels": 3}},
     ["model.json", "input must be", "'height': 96", "'height': 64"]),
    ({"class_names": ["a", "b", "c"]}, ["model.json", "2 classes", "['a', 'b', 'c']"]),
])
def test_bad_model_json(toy_model, tmp_path, changes, words):
    model_dir = _copy_model(toy_model, tmp_path)
    _edit_json(model_dir, **changes)
    with pytest.raises(deploy.ModelFormatError) as err:
        deploy.load_model(model_dir, device=CPU)
    for word in words:
        assert word in str(err.value)


def test_not_json_and_changed_weights(toy_model, tmp_path):
    model_dir = _copy_model(toy_model, tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(deploy.ModelFormatError,
                       match=r"model\.safetensors: sha256 is [0-9a-f]+, but model\.json expects"):
        deploy.load_model(model_dir)
    (model_dir / "model.json").write_text("{not json")
    with pytest.raises(deploy.ModelFormatError, match=r"model\.json: not valid JSON"):
        deploy.load_model(model_dir)


def test_cli_reports_an_unknown_format_version(toy_model, tmp_path, capsys):
    model_dir = _copy_model(toy_model, tmp_path)
    _edit_json(model_dir, format_version=99)
    assert main(["predict", str(model_dir), str(tmp_path), "--out", str(tmp_path / "p.csv"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "format_version is 99" in err


# --------------------------------------------------------------------------- export errors


def test_export_errors_name_the_file_and_command(toy_run, tmp_path):
    with pytest.raises(deploy.RunDirError, match="run directory not found.*pcamlib train"):
        deploy.export_model(tmp_path / "no-run", tmp_path / "m")
    for name, words in (("best.pth", "pcamlib train"), ("run.json", "not finished"),
                        ("params.json", "pcamlib train --profile")):
        run_dir = tmp_path / f"without-{name}"
        shutil.copytree(toy_run["run_dir"], run_dir)
        (run_dir / name).unlink()
        with pytest.raises(deploy.RunDirError, match=words) as err:
            deploy.export_model(run_dir, tmp_path / "m")
        assert str(run_dir / name) in str(err.value)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(toy_run["run_dir"], unfinished)
    (unfinished / "run.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(ValueError, match="complete is False, expected true"):
        deploy.export_model(unfinished, tmp_path / "m")
    pickled = tmp_path / "pickled"
    shutil.copytree(toy_run["run_dir"], pickled)
    torch.save({"weights": object()}, pickled / "best.pth")
    with pytest.raises(ValueError, match=r"best\.pth: refused to load"):
        deploy.export_model(pickled, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_cli_export_refuses_to_replace_unless_asked(toy_run, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["export", str(toy_run["run_dir"]), "--out", str(out),
                 "--threshold", "0.3"]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((out / "model.json").read_text())["threshold"] == 0.3
    assert main(["export", str(toy_run["run_dir"]), "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(toy_run["run_dir"]), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "model.json").read_text())["threshold"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
