"""Measures of a map: localization (`pixel_metrics`), detection
(`image_metrics`) and the checks of their inputs (`metric_checks`)."""
