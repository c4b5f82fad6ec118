"""Finding a weight file in a models folder, or saying how to get it (nothing is downloaded at run time)."""

from __future__ import annotations

from pathlib import Path

from .errors import ErrorCode, LipSyncError


def require(models_dir: Path, relative: str) -> Path:
    """The path of a model file, or a ``models_missing`` error that says how to get it."""
    path = Path(models_dir) / relative
    if not path.exists():
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"model file '{relative}' is missing from {models_dir}. Fetch the weights with "
            f"`python -m builder.fetch_weights --dest {models_dir}`.",
            stage="load",
        )
    return path
