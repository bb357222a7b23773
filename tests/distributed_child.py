"""``pcamlib`` under ``torchrun`` with instruments, for tests/test_distributed.py.

Usage::

    torchrun --standalone --nproc_per_node 2 tests/distributed_child.py \
        --record DIR [--watch ROOT] [--kill-after-epoch N] -- train --profile sample ...

Every rank runs ``pcamlib.cli.main`` with the arguments after ``--``, and

- records the epoch order of each loader it iterates (``DIR/rows-rank<r>.jsonl``: one line
  per ``get_idxs`` call with the loader's kind, rank, world size, batch size and row
  positions), appended as it goes so that a killed process leaves its lines;
- with ``--watch``, records every file-system write Python makes under ROOT (opening for
  writing, renaming, creating or removing; ``DIR/writes-rank<r>.jsonl``), through an
  audit hook, so that a test can tell which ranks wrote there;
- with ``--kill-after-epoch N``, ends every rank with exit status 3 right after epoch N
  was recorded (checkpoint written), without any clean-up: a kill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

KILL_STATUS = 3


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--watch", type=Path, default=None)
    parser.add_argument("--kill-after-epoch", type=int, default=None)
    args = parser.parse_args(argv[:split])
    rank = int(os.environ.get("RANK", "0"))
    args.record.mkdir(parents=True, exist_ok=True)
    rows_log = args.record / f"rows-rank{rank}.jsonl"
    writes_log = args.record / f"writes-rank{rank}.jsonl"

    if args.watch is not None:
        watched = str(args.watch.resolve())
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        recording = [False]

        def audit(event: str, event_args: tuple) -> None:
            if recording[0]:
                return
            paths: list = []
            if event == "open":
                path, mode, flags = event_args
                writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                    (mode is None and isinstance(flags, int) and flags & write_flags)
                paths = [path] if writing else []
            elif event in ("os.rename", "os.replace"):
                paths = list(event_args[:2])
            elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.unlink", "os.truncate",
                           "shutil.rmtree", "shutil.move", "os.symlink", "os.link"):
                paths = [event_args[0]]
            hits = [str(p) for p in paths if isinstance(p, str | bytes | os.PathLike)
                    and os.path.abspath(os.fsdecode(p)).startswith(watched)]
            if hits:
                recording[0] = True
                try:
                    _append(writes_log, {"event": event, "paths": hits})
                finally:
                    recording[0] = False

        sys.addaudithook(audit)

    from pcamlib.data import PCamDataLoader

    get_idxs = PCamDataLoader.get_idxs

    def recording_get_idxs(self):
        idxs = get_idxs(self)
        _append(rows_log, {"kind": "train" if self.shuffle else "eval", "rank": self.rank,
                           "world_size": self.world_size, "bs": self.bs, "n": self.n,
                           "rows": [int(i) for i in idxs]})
        return idxs

    PCamDataLoader.get_idxs = recording_get_idxs

    if args.kill_after_epoch is not None:
        import torch.distributed as dist

        from pcamlib import train as T

        after_epoch = T._RunKeeper.after_epoch

        def killing_after_epoch(self):
            after_epoch(self)
            if self.phase.first_epoch + self.epoch == args.kill_after_epoch:
                if dist.is_initialized():
                    dist.barrier()  # every rank is past the epoch: rank 0 has written it
                sys.stdout.flush()
                os._exit(KILL_STATUS)

        T._RunKeeper.after_epoch = killing_after_epoch

    from pcamlib.cli import main as pcamlib_main

    return pcamlib_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
