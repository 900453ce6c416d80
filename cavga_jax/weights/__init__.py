"""Weights from elsewhere: ImageNet weights into the encoder (`pretrained`),
PyTorch state dicts to our variables (`torch_weights`) and PyTorch
checkpoints read without torch and without running code (`torch_pickle`)."""
