"""MuseTalk lip-sync engine: face video or image + speech audio -> lip-synced mp4.

Nothing heavy is imported here; ``LipSyncPipeline`` loads its models when you
call ``LipSyncPipeline.from_models``.
"""

from .errors import ErrorCode, LipSyncError
from .options import EngineOptions

__all__ = ["EngineOptions", "ErrorCode", "LipSyncError", "LipSyncPipeline", "LipSyncResult"]


def __getattr__(name):
    # The pipeline pulls in torch and diffusers; import it only when asked for.
    if name in ("LipSyncPipeline", "LipSyncResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
