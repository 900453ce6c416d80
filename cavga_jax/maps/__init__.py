"""Anomaly maps: the per-batch maps (`anomaly_maps`), the unit a map fitted on
normal images is (`fitted_map`), the fitted maps (`calibration`,
`feature_gaussian`, `feature_knn`, `detector`) and their combinations
(`combined_maps`)."""
