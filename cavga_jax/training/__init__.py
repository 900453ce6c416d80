"""Training machinery: the CAVGA step and its losses (`cavga_step`, `losses`),
synthetic anomalies (`synthesis`: CAVGA_w's training and the detector's
validation), the state (`train_state`), the loop (`training_loop`), one
setup of a run (`run_setup`), the trained detector's training
(`detector_training`) and training's pictures (`training_pictures`)."""
