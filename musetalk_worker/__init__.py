"""Lip-sync engines (MuseTalk 1.5/1.0, LatentSync 1.6/1.5): face video or image + speech audio -> lip-synced mp4.

Nothing heavy is imported here: ``load_engine`` (or an engine class's
``from_config``) loads the models when called.
"""

from .engine import LipSyncResult, load_engine
from .errors import ErrorCode, LipSyncError
from .options import EngineConfig, LatentSyncOptions, MuseTalkOptions

__all__ = ["EngineConfig", "ErrorCode", "LatentSyncOptions", "LipSyncError", "LipSyncResult", "MuseTalkOptions",
           "load_engine"]
