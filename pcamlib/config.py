"""Project paths, resolved from the repository root rather than the working directory."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the folder that holds ``pcamlib/``)."""

DATA_DIR = Path(os.environ.get("PCAM_DATA_ROOT", REPO_ROOT / "data"))
"""Where datasets live; raw data is never modified in place."""

SAMPLE_DATA_DIR = DATA_DIR / "sample"
"""The embedded, generated default dataset used when PCam is absent."""

PCAM_DATA_DIR = DATA_DIR / "pcam"
"""Default destination of ``pcamlib download`` (the official files)."""

REAL_SUBSET_DATA_DIR = DATA_DIR / "real-subset"
"""Default destination for the imported ``../shared`` real subset."""

RUNS_DIR = Path(os.environ.get("PCAM_RUNS_ROOT", REPO_ROOT / "runs"))
"""Training runs: history, checkpoints and predictions."""

REPORTS_DIR = Path(os.environ.get("PCAM_REPORTS_ROOT", REPO_ROOT / "reports"))
"""Generated reports, one folder per profile (tests point this elsewhere)."""

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
"""The numbered notebooks."""

SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
"""Read-only real data beside the checkout (absent for outside users)."""

SHARED_PCAM_SUBSET = SHARED_DATA_DIR / "pcam-real-subset"
"""24,000 real PCam patches as JPEG folders."""

SHARED_KAGGLE_MINI = SHARED_DATA_DIR / "kaggle-hcd-mini"
"""15 Kaggle-layout TIFF patches."""
