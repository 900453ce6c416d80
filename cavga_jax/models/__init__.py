"""The networks: CAVGA's generator and discriminator (`cavga`), their encoders
and decoders (`backbones`, `efficientnet`), shared layers (`layers`) and the
Grad-CAM attention (`attention`)."""
