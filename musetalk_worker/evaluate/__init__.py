"""Lip-sync scores: SyncNet's LSE-D / LSE-C / offset (Wav2Lip's protocol) and mouth-region PSNR / L1.

``python -m musetalk_worker.evaluate VIDEO [--audio AUDIO] [--reference VIDEO] --models DIR`` prints them
as one JSON line; :class:`score.Scorer` is the same from Python.
"""
