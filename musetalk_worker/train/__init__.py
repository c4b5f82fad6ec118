"""Fine-tuning MuseTalk on one's own footage: prepare a cache, fit a LoRA (or the whole UNet), load it.

- ``python -m musetalk_worker.train prepare --videos DIR --out CACHE --models DIR``: :mod:`.prepare`
- ``python -m musetalk_worker.train fit --data CACHE --models DIR --out ADAPTER_DIR --steps N``: :mod:`.fit`
- :func:`.adapter.load_adapter` / :func:`.adapter.use_adapter` / :func:`.adapter.unload_adapter`: using one.
"""
