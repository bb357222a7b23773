"""Several processes, one run: torchrun / accelerate launch on the CPU with gloo.

The launched tests train resnet18 for 2 epochs on a small toy split (150 train rows,
global batch 32, so 128 rows per epoch in 4 steps and 22 left out, as in one process;
96 valid rows in validation batches of 64 and 32, which two ranks share unevenly; 64 test
rows, one batch, so rank 1 predicts nothing there). One uninterrupted 2-process run
(``tests/distributed_child.py`` records every rank's loader order and file writes) is the
reference for the others. Each launch starts Python processes that import torch and
fastai, so these tests are few and marked slow; the unit tests at the end run in one
process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pcamlib.runs as R
import pcamlib.train as T
from pcamlib.data import pcam_dataloaders
from pcamlib.distributed import Processes, rank_seed
from pcamlib.errors import InputError
from pcamlib.pcam import PCamWriter
from pcamlib.profiles import get_profile

REPO = Path(__file__).resolve().parent.parent
CHILD = REPO / "tests" / "distributed_child.py"
BIN = Path(sys.executable).parent
ARCH = "resnet18"
SIZES = {"train": 150, "valid": 96, "test": 64}
SETTINGS = {"epochs": 2, "bs": 32, "pretrained": "no", "n_boot": 20, "lr_find_iters": 10}
COMPARED = ["epoch", "phase", "phase_epoch", "train_loss", "valid_loss", "accuracy", "auc"]
TIMEOUT = 600


def write_toy_pcam(root: Path, sizes=SIZES, seed: int = 0) -> Path:
    """Learnable toy PCam (label 1 = dark blue centre), noisy enough to spread predictions."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        x = rng.integers(60, 220, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8)
        x[y == 1, 40:56, 40:56, 2] = rng.integers(30, 140, (int(y.sum()), 16, 16),
                                                   dtype=np.uint8)
        with PCamWriter(root, split, n) as writer:
            writer.write(x, y)
    return root


def profile_for(data_dir: Path, **overrides):
    return get_profile("sample", data_dir=data_dir, archs=[ARCH], **{**SETTINGS, **overrides})


def cli_args(command: str, data_dir: Path, runs: Path, **overrides) -> list[str]:
    args = [command, "--data-dir", str(data_dir), "--archs", ARCH, "--runs-dir", str(runs),
            "--quiet"]
    for key, value in {**SETTINGS, **overrides}.items():
        args += ["--set", f"{key}={value}"]
    return args


def child_env(tmp: Path) -> dict:
    """The test's pcamlib first on the path; one thread each; no user Accelerate config."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf-home"), PYTHONWARNINGS="ignore")
    return env


def torchrun(nproc: int) -> list[str]:
    exe = BIN / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cmd: list[str], tmp: Path, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=tmp, env=child_env(tmp), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == expect, \
        f"{cmd}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_toy_pcam(tmp_path_factory.mktemp("toy") / "pcam")


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """The reference: 2 processes, 2 epochs, uninterrupted, with loader and write records."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    runs, record = tmp / "runs", tmp / "record"
    proc = launch([*torchrun(2), str(CHILD), "--record", str(record), "--watch", str(tmp / "runs"),
                   "--", *cli_args("train", data_dir, runs)], tmp)
    run_dir = R.run_dir_for(profile_for(data_dir), ARCH, runs)
    return {"tmp": tmp, "runs": runs, "run_dir": run_dir, "record": record, "stdout": proc.stdout,
            "history": R.read_history(run_dir)}


# --------------------------------------------------------------------------- launched


@pytest.mark.slow
def test_each_epoch_is_one_process_epoch_split_between_ranks(two_process_run, data_dir):
    """Training: every step's rows are one process's batch, no row twice in an epoch."""
    logs = [read_jsonl(two_process_run["record"] / f"rows-rank{r}.jsonl") for r in (0, 1)]
    train = [[e for e in log if e["kind"] == "train"] for log in logs]
    assert [len(t) for t in train] == [2, 2]  # one epoch order per epoch on each rank
    # One process with the same seed and global batch: its epoch orders.
    single = pcam_dataloaders(data_dir, mean=[0.5] * 3, std=[0.2] * 3, bs=32, seed=42,
                              device="cpu", num_workers=0).train
    for epoch in range(2):
        single.randomize()
        order = single.get_idxs()
        steps = len(order) // 32
        assert steps == 4  # 150 rows: 4 steps of 32, 22 rows left out as in one process
        ranks = [t[epoch]["rows"] for t in train]
        assert [t[epoch]["bs"] for t in train] == [16, 16]
        assert [len(r) for r in ranks] == [64, 64]
        assert not set(ranks[0]) & set(ranks[1])
        for step in range(steps):
            together = ranks[0][step * 16:(step + 1) * 16] + ranks[1][step * 16:(step + 1) * 16]
            assert together == order[step * 32:(step + 1) * 32], f"epoch {epoch} step {step}"
        seen = ranks[0] + ranks[1]
        assert len(set(seen)) == len(seen) == 128
        assert set(seen) == set(order[:128])
    assert train[0][0]["rows"] != train[0][1]["rows"], "each epoch has its own order"
    # Validation: whole batches of 2 x bs dealt to the ranks, rank 1 getting the short one.
    valid = [[e for e in log if e["kind"] == "eval" and e["n"] == 96] for log in logs]
    assert valid[0] and valid[1]
    assert valid[0][0]["rows"] == list(range(64)) and valid[1][0]["rows"] == list(range(64, 96))


@pytest.mark.slow
def test_only_rank_zero_writes(two_process_run):
    record, run_dir = two_process_run["record"], two_process_run["run_dir"]
    rank0 = read_jsonl(record / "writes-rank0.jsonl")
    rank1 = read_jsonl(record / "writes-rank1.jsonl")
    assert rank1 == [], f"rank 1 wrote under runs/: {rank1[:5]}"
    written = {Path(p).name for w in rank0 for p in w["paths"]}
    # The audit hook saw rank 0 write every file of the run (so it would see rank 1's).
    for name in ("params.json", "history.csv", "checkpoint.pth", "best.pth", "run.json"):
        assert name in written, (name, sorted(written))
    assert sorted(p.name for p in run_dir.iterdir()) == \
        ["best.pth", "checkpoint.pth", "history.csv", "params.json", "run.json"]
    assert two_process_run["stdout"].count("resnet18: best epoch") == 1  # rank 0 prints


@pytest.mark.slow
def test_run_records_processes_and_identity(two_process_run):
    run_dir = two_process_run["run_dir"]
    run = json.loads((run_dir / "run.json").read_text())
    processes = run["processes"]
    assert processes["world_size"] == 2 and processes["backend"] == "gloo"
    assert processes["launcher"] == "torchrun"
    assert processes["batch_size"] == 32 and processes["batch_per_process"] == 16
    assert processes["batch_semantics"].startswith("global")
    assert processes["lr_scaling"].startswith("none")
    assert [r["seed"] for r in processes["ranks"]] == [42, rank_seed(42, 1)]
    identity = json.loads((run_dir / "params.json").read_text())["identity"]
    assert identity["distributed"] == {"world_size": 2, "batch_per_process": 16,
                                       "sync_batchnorm": False}
    assert identity["bs"] == 32
    checkpoint = R.load_checkpoint(run_dir / "checkpoint.pth")
    rngs = checkpoint["rng"]
    assert isinstance(rngs, list) and len(rngs) == 2
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"]), "ranks draw their own numbers"
    assert rngs[0]["train_dl"] == rngs[1]["train_dl"], "one epoch order on every rank"
    history = two_process_run["history"]
    assert history["epoch"].tolist() == [0, 1]
    assert history["valid_loss"].notna().all() and (history["seconds"] > 0).all()


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_history(two_process_run, data_dir,
                                                            tmp_path):
    runs = tmp_path / "runs"
    launch([*torchrun(2), str(CHILD), "--record", str(tmp_path / "record"),
            "--kill-after-epoch", "0", "--", *cli_args("train", data_dir, runs)],
           tmp_path, expect=1)  # torchrun reports the killed processes
    run_dir = R.run_dir_for(profile_for(data_dir), ARCH, runs)
    assert (run_dir / "checkpoint.pth").is_file()
    assert not (run_dir / "run.json").exists(), "a killed run must not look complete"
    assert R.read_history(run_dir)["epoch"].tolist() == [0]

    launch([*torchrun(2), "-m", "pcamlib", *cli_args("train", data_dir, runs)], tmp_path)
    resumed = R.read_history(run_dir)
    reference = two_process_run["history"]
    pd.testing.assert_frame_equal(resumed[COMPARED], reference[COMPARED], check_exact=True)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["resumed_from"] == 1 and run["complete"] is True
    best = R.load_checkpoint(run_dir / "best.pth")
    best_ref = R.load_checkpoint(two_process_run["run_dir"] / "best.pth")
    assert all(torch.equal(best[k], best_ref[k]) for k in best_ref)


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(two_process_run, data_dir, tmp_path):
    copies = {}
    for name in ("one", "two"):
        copies[name] = tmp_path / name
        shutil.copytree(two_process_run["runs"], copies[name])
    one = launch([sys.executable, "-m", "pcamlib", *cli_args("evaluate", data_dir, copies["one"])],
                 tmp_path)
    two = launch([*torchrun(2), "-m", "pcamlib", *cli_args("evaluate", data_dir, copies["two"])],
                 tmp_path)
    profile = profile_for(data_dir)
    dirs = {name: R.run_dir_for(profile, ARCH, root) for name, root in copies.items()}
    for name in ("predictions.csv", "metrics.csv", "evaluation.json"):
        assert (dirs["one"] / name).read_bytes() == (dirs["two"] / name).read_bytes(), name
    predictions = pd.read_csv(dirs["two"] / "predictions.csv")
    assert predictions.groupby("split").size().to_dict() == SIZES
    assert predictions["prob"].nunique() > 10, "a model that predicts one value proves little"
    # The training-time validation of the kept epoch was gathered the same way.
    validate = json.loads((dirs["two"] / "evaluation.json").read_text())["fastai_validate"]
    history = two_process_run["history"].set_index("epoch")
    best_epoch = json.loads((dirs["two"] / "run.json").read_text())["best_epoch"]
    assert validate["valid_loss"] == pytest.approx(history.loc[best_epoch, "valid_loss"],
                                                   rel=1e-6)
    assert validate["auc"] == pytest.approx(history.loc[best_epoch, "auc"], rel=1e-12)
    assert two.stdout.count("Only one model") == 1 == one.stdout.count("Only one model")


@pytest.mark.slow
def test_accelerate_launch_trains_with_lr_find_on_rank_zero(data_dir, tmp_path):
    runs = tmp_path / "runs"
    exe = BIN / "accelerate"
    launcher = [str(exe)] if exe.exists() else \
        [sys.executable, "-m", "accelerate.commands.accelerate_cli"]
    launch([*launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "pcamlib",
            *cli_args("train", data_dir, runs, epochs=1, lr_policy="find")], tmp_path)
    run_dir = R.run_dir_for(profile_for(data_dir, epochs=1, lr_policy="find"), ARCH, runs)
    run = json.loads((run_dir / "run.json").read_text())
    found = json.loads((run_dir / "lr_find.json").read_text())
    assert run["processes"]["launcher"] == "accelerate launch"
    assert run["processes"]["world_size"] == 2
    assert run["lr"] == found["chosen"] == found["suggestions"]["valley"]
    assert 0 < len(found["lrs"]) <= 10
    assert not (run_dir / "models").exists(), "lr_find's temporary weights are removed"
    assert R.read_history(run_dir)["epoch"].tolist() == [0]


@pytest.mark.slow
def test_one_process_cannot_resume_a_two_process_run(two_process_run, data_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(two_process_run["runs"], runs)
    run_dir = R.run_dir_for(profile_for(data_dir), ARCH, runs)
    (run_dir / "run.json").unlink()  # unfinished: training would resume from the checkpoint
    before = (run_dir / "checkpoint.pth").stat().st_mtime_ns
    with pytest.raises(R.RunMismatchError) as err:
        T.train(profile_for(data_dir), ARCH, runs_root=runs, progress=False, device="cpu")
    assert "distributed.world_size: run 2, requested '(absent)'" in str(err.value)
    assert (run_dir / "checkpoint.pth").stat().st_mtime_ns == before
    # Evaluation does not care how many processes trained a run.
    shutil.copy(two_process_run["run_dir"] / "run.json", run_dir / "run.json")
    assert R.finished_run(profile_for(data_dir), ARCH, runs).identity["distributed"][
        "world_size"] == 2


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_loaders_read_their_shards_through_workers_and_ring(make_pcam_dir, workers):
    """Each rank's loader (workers and transfer ring included) reads its batches' rows."""
    root = make_pcam_dir({"train": 200, "valid": 70}, index_pixels=True)
    kwargs = dict(mean=[0.0] * 3, std=[1 / 255] * 3, seed=3, device="cpu",
                  num_workers=workers, channels_last=False)
    single = pcam_dataloaders(root, bs=40, val_bs=32, **kwargs)
    ranks = [pcam_dataloaders(root, bs=20, val_bs=32, rank=r, world_size=2, **kwargs)
             for r in (0, 1)]
    single.train.randomize()
    order = single.train.get_idxs()
    for name in ("train", "valid"):
        read = []
        for dls in ranks:
            rows = []
            for xb, yb in getattr(dls, name):
                pixels = xb[:, :, 0, 0].round().long()  # normalised back to 0..255
                ids = (pixels[:, 0] + 256 * pixels[:, 1]).tolist()
                assert yb.tolist() == [i % 2 for i in ids]
                rows.append(ids)
            assert len(rows) == len(getattr(dls, name))
            read.append(rows)
        if name == "train":  # 200 rows: 5 steps of 40, 20 per rank per step
            assert [len(r) for r in read] == [5, 5]
            steps = [a + b for a, b in zip(read[0], read[1], strict=True)]
            assert steps == [order[i * 40:(i + 1) * 40] for i in range(5)]
        else:  # 70 rows: batches 0 and 2 (32 + 6 rows) on rank 0, batch 1 on rank 1
            assert read[0] == [list(range(32)), list(range(64, 70))]
            assert read[1] == [list(range(32, 64))]


def test_global_batch_must_split_over_the_processes():
    with pytest.raises(InputError, match=r"bs=32 .* 3 processes; got 10.6667 rows"):
        Processes(rank=0, world_size=3).check_batch(32)
    assert Processes(rank=1, world_size=4).check_batch(32) == 8
    assert Processes().identity(32, False) is None


def test_train_split_must_fill_one_step_on_every_rank(make_pcam_dir):
    root = make_pcam_dir({"train": 50, "valid": 8})
    with pytest.raises(InputError, match="50 rows, fewer than one step of 32 rows on each of 2"):
        pcam_dataloaders(root, mean=[0.5] * 3, std=[0.2] * 3, bs=32, rank=0, world_size=2,
                         device="cpu")


def test_checkpoint_of_another_process_count_is_refused(tmp_path):
    states = [{"torch": torch.zeros(1)}] * 2
    assert R.rank_rng_state(states, 1, 2, tmp_path) is states[1]
    with pytest.raises(R.CheckpointError, match="RNG states of 2 process.*3 are resuming"):
        R.rank_rng_state(states, 0, 3, tmp_path)
    with pytest.raises(R.CheckpointError, match="RNG states of 1 process.*2 are resuming"):
        R.rank_rng_state({"torch": torch.zeros(1)}, 0, 2, tmp_path)


def test_only_train_and_evaluate_run_under_a_launcher(monkeypatch, capsys, tmp_path):
    from pcamlib.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [rank 1 of 2] pcamlib validate was launched as 2 processes")
    assert "only train and evaluate" in err
