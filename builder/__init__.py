"""Build-time tools: the weights downloader (``python -m builder.fetch_weights``) and its UNet converter."""
