"""Detectors sharing `detect(case) -> Landmarks`: the heatmap model and the weight-free atlas; `load_detector` builds any."""
