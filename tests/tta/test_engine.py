"""The multi-view engine: identity for one view, exact flip un-swapping, heatmap fusion on hand-made maps."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.backends import load_model
from distill.models.base import PreparedBatch
from distill.models.config import ModelConfig
from distill.models.torchvision import decode_heatmaps
from distill.structures import Detections
from distill.transforms import ResizeFlip
from distill.tta.engine import FusionConfig, MultiViewEngine
from distill.tta.views import parse_views
from tests.test_transforms import resized_shape


def _images(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 150, 170, generator=generator), torch.rand(3, 160, 128, generator=generator)]


def test_one_view_equals_plain_inference_exactly(trained_tiny_model: Path) -> None:
    detector = load_model(trained_tiny_model)
    views = parse_views("none", test_size=detector.config.test_size, max_size=detector.config.max_size)
    images = _images()
    plain = detector.predict(images, score_thresh=0.0)
    engine = MultiViewEngine(detector, views, FusionConfig(view_score_thresh=0.0))
    fused = engine.predict(images)
    for p, f in zip(plain, fused, strict=True):
        d = f.detections
        assert len(p) > 0
        assert (
            torch.equal(p.boxes, d.boxes)
            and torch.equal(p.scores, d.scores)
            and torch.equal(p.labels, d.labels)
        )
        assert torch.equal(p.masks, d.masks)
        assert torch.equal(p.keypoints, d.keypoints)
        assert torch.all(f.agreement == 1.0)


def test_portrait_and_landscape_images_are_never_padded_into_one_batch(trained_tiny_model: Path) -> None:
    # a 4:3 and a 3:4 photo in one batch would each be padded to ~1.4x their pixels; the engine runs each
    # orientation as its own batch, so a mixed batch gives exactly what each image gives on its own
    detector = load_model(trained_tiny_model)
    size, cap = detector.config.test_size, detector.config.max_size
    views = parse_views("0.75x,1x:flip", test_size=size, max_size=cap)
    engine = MultiViewEngine(detector, views, FusionConfig(view_score_thresh=0.0, max_detections=20))
    generator = torch.Generator().manual_seed(3)
    landscape = [torch.rand(3, 120, 160, generator=generator), torch.rand(3, 130, 150, generator=generator)]
    portrait = torch.rand(3, 160, 120, generator=generator)
    mixed = [landscape[0], portrait, landscape[1]]
    prepared: list[list[tuple[int, int]]] = []
    prepare = detector.prepare

    def recording_prepare(images, **kwargs):
        prepared.append([tuple(i.shape[-2:]) for i in images])
        return prepare(images, **kwargs)

    detector.prepare = recording_prepare  # type: ignore[method-assign]
    together = engine.predict(mixed)
    detector.prepare = prepare  # type: ignore[method-assign]
    assert {len(shapes) for shapes in prepared} == {1, 2}
    assert all(len({h > w for h, w in shapes}) == 1 for shapes in prepared)
    alone = [*engine.predict(landscape), *engine.predict([portrait])]
    for got, want in zip(together, [alone[0], alone[2], alone[1]], strict=True):
        assert len(want.detections) > 0
        assert torch.equal(got.detections.boxes, want.detections.boxes)
        assert torch.equal(got.detections.masks, want.detections.masks)
        assert torch.equal(got.detections.keypoints, want.detections.keypoints)
        assert torch.equal(got.agreement, want.agreement)


def test_one_view_keeps_the_same_number_of_detections_as_a_multi_view_run(trained_tiny_model: Path) -> None:
    # max_detections bounds every view set alike: a single-view baseline with the detector's 100 detections
    # per image against 20 fused ones made single-view AP look better than it was (recall at 5x the count)
    detector = load_model(trained_tiny_model)
    views = parse_views("none", test_size=detector.config.test_size, max_size=detector.config.max_size)
    images = _images()
    plain = detector.predict(images, score_thresh=0.0)
    assert all(len(p) > 3 for p in plain)
    top3 = MultiViewEngine(detector, views, FusionConfig(view_score_thresh=0.0, max_detections=3))
    for p, f in zip(plain, top3.predict(images), strict=True):
        d = f.detections
        best = torch.sort(p.scores, descending=True, stable=True).indices[:3]
        assert len(d) == 3
        assert torch.equal(d.boxes, p.boxes[best]) and torch.equal(d.scores, p.scores[best])
        # the heads ran on 3 RoIs here and on 100 there: oneDNN's convolutions may round differently by batch
        assert torch.allclose(d.masks, p.masks[best], atol=1e-5, rtol=0)
        assert torch.allclose(d.keypoints, p.keypoints[best], atol=1e-4, rtol=0)


def test_flipped_view_of_a_flipped_image_is_the_mirrored_plain_view(trained_tiny_model: Path) -> None:
    detector = load_model(trained_tiny_model)
    size, cap = detector.config.test_size, detector.config.max_size
    image = _images(1)[0]
    every = FusionConfig(view_score_thresh=0.0)
    plain_views = parse_views(f"{size}", test_size=size, max_size=cap)
    plain = MultiViewEngine(detector, plain_views, every).predict([image])[0]
    flip_only = parse_views(f"{size}:flip", test_size=size, max_size=cap)
    flip_only = type(flip_only)(tuple(v for v in flip_only if v.flip), size, "flip only")
    mirrored = MultiViewEngine(detector, flip_only, every).predict([image.flip(-1)])[0]
    a, b = plain.detections, mirrored.detections
    width = image.shape[-1]
    assert len(a) > 0 and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    expected_boxes = torch.stack(
        [width - a.boxes[:, 2], a.boxes[:, 1], width - a.boxes[:, 0], a.boxes[:, 3]], 1
    )
    assert torch.allclose(b.boxes, expected_boxes, atol=1e-3)
    flip = torch.tensor(detector.config.keypoint_flip_indices())
    keypoint_rows = detector.is_keypoint_class(a.labels)
    assert keypoint_rows.any()
    ka, kb = a.keypoints[keypoint_rows], b.keypoints[keypoint_rows]
    # left/right swapped back: keypoint k of the mirrored run is keypoint flip[k] of the plain run, mirrored.
    # The plain view decodes its heatmaps on view-scale boxes and the flipped one on original boxes, so the
    # argmax grid differs by about a pixel, and where a weak model's heatmap is flat the argmax can jump:
    # compare medians, and against the hypothesis that channels were not swapped.
    swapped = torch.hypot(kb[..., 0] - (width - ka[:, flip, 0]), kb[..., 1] - ka[:, flip, 1])
    unswapped = torch.hypot(kb[..., 0] - (width - ka[..., 0]), kb[..., 1] - ka[..., 1])
    assert swapped.median() <= 1.5
    assert unswapped.median() > 3 * swapped.median() + 3.0


class _PerfectKeypointDetector:
    """A stand-in detector that 'sees' one object with known keypoints and emits ideal heatmaps in any view.

    In a flipped view it labels keypoints by chirality, as a real model does: its LEFT channel peaks where the
    mirrored image shows the left side, i.e. at the mirrored position of the original RIGHT keypoint.
    """

    def __init__(self, config: ModelConfig, box: list[float], keypoints: list[list[float]]) -> None:
        self.config = config
        self.device = torch.device("cpu")
        self.box = torch.tensor([box])
        self.kps = torch.tensor(keypoints)  # [K, 2] original coordinates
        self.flip = torch.tensor(config.keypoint_flip_indices())
        self.has_masks, self.has_keypoints = False, True

    def eval(self) -> None: ...

    def keypoint_flip_indices(self) -> torch.Tensor:
        return self.flip

    def is_keypoint_class(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(labels, dtype=torch.bool)

    def decode_keypoints(self, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return decode_heatmaps(logits, boxes)

    def prepare(self, images, size=None, flip=False, max_size=None) -> PreparedBatch:
        h, w = images[0].shape[-2:]
        scale = size / min(h, w)
        t = ResizeFlip(h, w, round(h * scale), round(w * scale), flip)
        return PreparedBatch(torch.zeros(1), [(t.out_height, t.out_width)], [t])

    def features(self, batch: PreparedBatch) -> OrderedDict:
        return OrderedDict(x=torch.zeros(1))

    def detect(self, feats, batch, **_: object) -> list[Detections]:
        t = batch.transforms[0]
        return [Detections(t.apply_boxes(self.box), torch.tensor([0.9]), torch.tensor([0]))]

    def keypoint_logits(self, feats, batch, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        t, box = batch.transforms[0], boxes[0][0]
        size = 56
        points = self.kps.clone()
        if t.flip:  # what the model sees: mirrored positions, channels labelled by chirality
            points[:, 0] = t.width - points[:, 0]
            points = points[self.flip]
        points[:, 0] *= t.out_width / t.width
        points[:, 1] *= t.out_height / t.height
        # a smooth peak (like a trained head's), so that resampling a small box's heatmap cannot miss it
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        col = (points[:, 0] - box[0]) / (box[2] - box[0]) * size
        row = (points[:, 1] - box[1]) / (box[3] - box[1]) * size
        dist2 = (grid[None, :, None] - row[:, None, None]) ** 2 + (
            grid[None, None, :] - col[:, None, None]
        ) ** 2
        return [(10.0 - dist2 / 8.0)[None]]


def test_heatmap_fusion_unflips_and_swaps_hand_made_heatmaps(tiny_config: ModelConfig) -> None:
    num = len(tiny_config.keypoint_names)
    box = [40.0, 20.0, 96.0, 132.0]
    truth = [[44.0 + 5 * k, 24.0 + 11 * k] for k in range(num)]  # all distinct, left/right at different x
    detector = _PerfectKeypointDetector(tiny_config, box, truth)
    views = parse_views("100,160,200:flip", test_size=160, max_size=400)
    fused = MultiViewEngine(detector, views).predict([torch.zeros(3, 150, 170)])[0]
    got = fused.detections.keypoints[0, :, :2]
    # every view agrees once flipped views are un-flipped and swapped; the heatmap grid is box/56 px
    assert torch.allclose(got, torch.tensor(truth), atol=2 * (box[3] - box[1]) / 56)
    assert fused.agreement.tolist() == [1.0]

    # an engine that reversed the width but did not swap channels would average left with right:
    detector.keypoint_flip_indices = lambda: torch.arange(num)
    wrong = MultiViewEngine(detector, views).predict([torch.zeros(3, 150, 170)])[0]
    assert not torch.allclose(wrong.detections.keypoints[0, :, :2], torch.tensor(truth), atol=4.0)


def test_recomputing_features_outside_the_cache_budget_changes_nothing(trained_tiny_model: Path) -> None:
    detector = load_model(trained_tiny_model)
    views = parse_views(
        "0.75x,1x:flip", test_size=detector.config.test_size, max_size=detector.config.max_size
    )
    images = _images(2)
    auto = MultiViewEngine(detector, views, FusionConfig(view_score_thresh=0.0))
    cached = auto.predict(images)
    assert auto.recomputed_views == 0  # the default budget (a share of the free RAM) holds this model's views
    recomputed = MultiViewEngine(detector, views, FusionConfig(view_score_thresh=0.0, feature_cache_mb=0.0))
    again = recomputed.predict(images)
    assert recomputed.recomputed_views == len(views)
    for a, b in zip(cached, again, strict=True):
        assert len(a.detections) > 0
        assert torch.equal(a.detections.boxes, b.detections.boxes)
        assert torch.equal(a.detections.masks, b.detections.masks)
        assert torch.equal(a.detections.keypoints, b.detections.keypoints)
        assert torch.equal(a.agreement, b.agreement)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(60, 400),
    width=st.integers(60, 400),
    sizes=st.lists(st.integers(64, 480), min_size=1, max_size=4, unique=True),
    flip=st.booleans(),
    data=st.data(),
)
def test_boxes_and_keypoints_come_back_to_the_original_for_any_views(
    tiny_config: ModelConfig, height: int, width: int, sizes: list[int], flip: bool, data
) -> None:
    num = len(tiny_config.keypoint_names)
    x1 = data.draw(st.floats(0, width * 0.5))
    y1 = data.draw(st.floats(0, height * 0.5))
    x2 = data.draw(st.floats(x1 + 20, width))
    y2 = data.draw(st.floats(y1 + 20, height))
    fractions = data.draw(
        st.lists(st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)), min_size=num, max_size=num)
    )
    truth = [[x1 + fx * (x2 - x1), y1 + fy * (y2 - y1)] for fx, fy in fractions]
    detector = _PerfectKeypointDetector(tiny_config, [x1, y1, x2, y2], truth)
    spec = ",".join(str(s) for s in sizes) + (":flip" if flip else "")
    fused = MultiViewEngine(detector, parse_views(spec, test_size=160, max_size=4000)).predict(
        [torch.zeros(3, height, width)]
    )[0]
    scale = max(height, width)
    assert torch.allclose(fused.detections.boxes, torch.tensor([[x1, y1, x2, y2]]), atol=1e-3 * scale)
    # heatmap cells are box/56 in each view: the fused argmax lies within two cells of the truth, plus half a
    # pixel of the decoding (torchvision decodes at integer pixels of the box: in the view when it is the one
    # unflipped view, as plain inference does, else in the original image)
    cell = torch.tensor([(x2 - x1) / 56, (y2 - y1) / 56])
    pixel = 1.0
    if len(sizes) == 1 and not flip:
        pixel = height / resized_shape(height, width, sizes[0], 4000)[0]
    error = (fused.detections.keypoints[0, :, :2] - torch.tensor(truth)).abs()
    assert torch.all(error <= 2 * cell + pixel / 2 + 1e-3 * scale)
    assert fused.agreement.tolist() == [1.0]


class _TwoObjectDetector(_PerfectKeypointDetector):
    """Sees a confident object and a doubtful one; records how many boxes the keypoint head was given."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, [10.0, 10.0, 60.0, 80.0], [[20.0, 20.0]] * len(config.keypoint_names))
        self.box = torch.tensor([[10.0, 10.0, 60.0, 80.0], [80.0, 20.0, 140.0, 100.0]])
        self.head_boxes: list[int] = []

    def detect(self, feats, batch, **_: object) -> list[Detections]:
        t = batch.transforms[0]
        return [Detections(t.apply_boxes(self.box), torch.tensor([0.9, 0.2]), torch.tensor([0, 0]))]

    def keypoint_logits(self, feats, batch, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
        self.head_boxes.append(len(boxes[0]))
        return [torch.zeros(len(boxes[0]), len(self.kps), 56, 56)]


def test_score_floor_runs_the_heads_only_on_boxes_that_can_become_pseudo_labels(
    tiny_config: ModelConfig,
) -> None:
    views = parse_views("100,160:flip", test_size=160, max_size=400)
    image = [torch.zeros(3, 150, 170)]
    everything = _TwoObjectDetector(tiny_config)
    assert len(MultiViewEngine(everything, views).predict(image)[0].detections) == 2
    assert everything.head_boxes == [2, 2, 2, 2]
    floored = _TwoObjectDetector(tiny_config)
    out = MultiViewEngine(floored, views, FusionConfig(score_floor=0.5)).predict(image)[0]
    assert out.detections.scores.tolist() == [pytest.approx(0.9)] and len(out.detections.keypoints) == 1
    assert floored.head_boxes == [1, 1, 1, 1]
    top1 = _TwoObjectDetector(tiny_config)
    MultiViewEngine(top1, views, FusionConfig(max_detections=1)).predict(image)
    assert top1.head_boxes == [1, 1, 1, 1]


def test_the_feature_cache_budget_is_given_or_a_quarter_of_the_available_ram() -> None:
    from distill.tta.engine import available_ram_bytes, feature_cache_bytes

    cpu = torch.device("cpu")
    assert feature_cache_bytes(512, cpu) == 512 * 2**20
    ram = available_ram_bytes()
    assert 2**26 < ram < 2**50  # between 64 MiB and 1 PiB: read from the machine
    assert abs(feature_cache_bytes(None, cpu) - ram / 4) < 0.05 * ram  # MemAvailable moves a little
