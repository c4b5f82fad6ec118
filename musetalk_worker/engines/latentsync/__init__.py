"""LatentSync 1.5 / 1.6 (ByteDance): audio-conditioned latent diffusion with a UNet3D, in 16-frame chunks."""
