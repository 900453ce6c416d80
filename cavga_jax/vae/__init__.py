"""The VAE explanation of Liu et al. (CVPR 2020): the convolutional VAE
(`conv_vae`), its per-unit attention (`explain`) and the disentanglement
measures (`disentanglement`)."""
