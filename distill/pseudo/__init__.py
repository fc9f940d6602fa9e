"""Pseudo-labels: score calibration and the pseudo-label COCO file."""
