from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.transforms import ResizeFlip

sizes = st.integers(min_value=16, max_value=2000)


@settings(max_examples=200, deadline=None)
@given(
    height=sizes,
    width=sizes,
    view=st.integers(min_value=32, max_value=1600),
    flip=st.booleans(),
    data=st.data(),
)
def test_boxes_and_keypoints_map_back_for_every_size_and_flip(height, width, view, flip, data) -> None:
    out_h, out_w = resized_shape(height, width, view, 4000)
    t = ResizeFlip(height, width, out_h, out_w, flip)
    xs = sorted(data.draw(st.lists(st.floats(0, width), min_size=2, max_size=2)))
    ys = sorted(data.draw(st.lists(st.floats(0, height), min_size=2, max_size=2)))
    box = torch.tensor([[xs[0], ys[0], xs[1], ys[1]]], dtype=torch.float64).float()
    view_box = t.apply_boxes(box)
    assert torch.all(view_box[:, 2] >= view_box[:, 0] - 1e-3)
    assert torch.allclose(t.inverse_boxes(view_box), box, atol=1e-3 * max(height, width), rtol=1e-4)
    # a keypoint mapped into the view (by the box mapping of a degenerate box) comes back where it was
    point = torch.tensor([[xs[0], ys[0], xs[0], ys[0]]])
    view_point = t.apply_boxes(point)[0]
    kp = torch.tensor([[[float(view_point[0]), float(view_point[1]), 1.0]]])
    back = t.inverse_keypoints(kp, None)
    assert torch.allclose(back[0, 0, :2], point[0, :2], atol=1e-3 * max(height, width), rtol=1e-4)


def resized_shape(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """The (h, w) torchvision gives an image whose shorter side is resized to ``size`` (longer side capped).

    Mirrors ``torch.nn.functional.interpolate(scale_factor=s, recompute_scale_factor=True)``: floor(dim * s).
    """
    scale = min(size / min(height, width), max_size / max(height, width))
    return math.floor(height * scale), math.floor(width * scale)


def test_flip_maps_x_to_width_minus_x_and_swaps_channels() -> None:
    t = ResizeFlip(100, 200, 50, 100, flip=True)  # half size, mirrored
    # in the view, keypoint 0 ("left") at x=10 -> original x = 200 - 20 = 180, and it becomes keypoint 1
    kps = torch.tensor([[[10.0, 5.0, 0.9], [40.0, 6.0, 0.8]]])
    back = t.inverse_keypoints(kps, torch.tensor([1, 0]))
    assert torch.allclose(back[0, 1], torch.tensor([180.0, 10.0, 0.9]))
    assert torch.allclose(back[0, 0], torch.tensor([120.0, 12.0, 0.8]))
    box = torch.tensor([[10.0, 0.0, 30.0, 10.0]])
    assert torch.allclose(t.inverse_boxes(box), torch.tensor([[140.0, 0.0, 180.0, 20.0]]))


def test_resized_shape_matches_torch_interpolate() -> None:
    for h, w, s, m in [
        (480, 640, 800, 1333),
        (300, 301, 256, 512),
        (1000, 100, 400, 600),
        (17, 33, 100, 150),
    ]:
        scale = min(s / min(h, w), m / max(h, w))
        out = torch.nn.functional.interpolate(
            torch.zeros(1, 1, h, w),
            scale_factor=scale,
            recompute_scale_factor=True,
            mode="bilinear",
            align_corners=False,
        )
        assert resized_shape(h, w, s, m) == tuple(out.shape[-2:])


def test_orientation_groups_keep_input_order_and_results_come_back_in_place() -> None:
    from distill.transforms import orientation_groups, per_orientation

    shapes = [(100, 150), (150, 100), (120, 120), (200, 90), (90, 91)]
    images = [torch.zeros(3, h, w) for h, w in shapes]
    assert orientation_groups(images) == [[0, 2, 4], [1, 3]]
    assert orientation_groups(images[:1]) == [[0]]
    calls: list[list[tuple[int, int]]] = []

    def sizes(group: list[torch.Tensor]) -> list[tuple[int, int]]:
        calls.append([tuple(i.shape[-2:]) for i in group])
        return [tuple(i.shape[-2:]) for i in group]

    assert per_orientation(sizes, images) == shapes
    assert calls == [[(100, 150), (120, 120), (90, 91)], [(150, 100), (200, 90)]]
