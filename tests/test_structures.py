from __future__ import annotations

import pytest
import torch

from distill.structures import Detections


def test_fields_must_have_the_same_length() -> None:
    with pytest.raises(ValueError, match="scores has 2 rows but boxes has 1"):
        Detections(torch.zeros(1, 4), torch.zeros(2), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        Detections(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"keypoints must be \[N, K, 3\]"):
        Detections(
            torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.int64), keypoints=torch.zeros(1, 5)
        )


def test_index_keeps_fields_aligned() -> None:
    det = Detections(
        torch.arange(12.0).reshape(3, 4),
        torch.tensor([0.1, 0.9, 0.5]),
        torch.tensor([0, 1, 2]),
        keypoints=torch.arange(18.0).reshape(3, 2, 3),
        masks=torch.rand(3, 4, 4),
    )
    sub = det.index(det.scores > 0.3)
    assert len(sub) == 2
    assert sub.labels.tolist() == [1, 2]
    assert torch.equal(sub.keypoints, det.keypoints[1:])
    assert len(Detections.empty()) == 0
