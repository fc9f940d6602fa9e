"""Test-time augmentation: fusing the detections of several views (scales × flips) of one image."""
