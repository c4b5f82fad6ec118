"""Optional face restoration (GFPGAN v1.4) of generated faces, shared by the engines.

- :mod:`.align`: five points from the 68 landmarks, smoothed over the source
  frames, and the similarity that maps a face onto the FFHQ-512 template.
- :mod:`.network`: the GFPGAN network (through spandrel's architecture code),
  loaded from the image's safetensors conversion, and its input/output scaling.
- :mod:`.warp`: sampling grids in and out of the aligned square and the
  weights that mix the restored pixels into a face, on the device.

spandrel (the architecture code) is imported only when the weights are loaded.
"""
