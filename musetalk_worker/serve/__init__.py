"""A self-hosted HTTP API on the worker's engine and job schema: ``python -m musetalk_worker.serve --models DIR``.

``POST /generate`` takes a face and a speech file (multipart) plus any job
option as a form field and answers the lip-synced mp4. The models load once at
start; jobs run one at a time on the device through :class:`~musetalk_worker.worker.Worker`,
so validation, limits and error messages are the worker's own.

Modules: ``app`` (the routes), ``jobs`` (the one-at-a-time device queue),
``receive`` (multipart uploads streamed to disk), ``fields`` (form strings
typed by the job schema), ``errors`` (the JSON error shape and HTTP statuses),
``settings`` (the server's options), ``__main__`` (the command).
"""
