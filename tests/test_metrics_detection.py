"""Box IoU, VOC AP and COCO mAP: hand-worked examples and pycocotools on random detections."""

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from seqlab import metrics


def test_box_iou_by_hand_and_against_loops():
  a = np.array([[0.0, 0.0, 2.0, 2.0]])
  b = np.array([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 4.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
  # Overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1) = 1/7; touching edge and disjoint: 0.
  np.testing.assert_allclose(metrics.box_iou(a, b), [[1 / 7, 0.0, 0.0]])
  b_xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)
  a_xywh = np.array([[0.0, 0.0, 2.0, 2.0]])
  np.testing.assert_allclose(metrics.box_iou(a_xywh, b_xywh, box_format="xywh"),
                             [[1 / 7, 0.0, 0.0]])
  # Zero-area boxes have IoU 0 (empty union counts as no overlap).
  assert metrics.box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0

  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 10, size=(2, 6, 2))
  boxes1 = np.concatenate([xy[0], xy[0] + rng.uniform(0, 5, (6, 2))], 1)
  boxes2 = np.concatenate([xy[1], xy[1] + rng.uniform(0, 5, (6, 2))], 1)
  expected = np.zeros((6, 6))
  for i, (x1, y1, x2, y2) in enumerate(boxes1):
    for j, (u1, v1, u2, v2) in enumerate(boxes2):
      inter = max(0.0, min(x2, u2) - max(x1, u1)) * max(0.0, min(y2, v2) - max(y1, v1))
      expected[i, j] = inter / ((x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter)
  np.testing.assert_allclose(metrics.box_iou(boxes1, boxes2), expected, rtol=1e-12)


def test_average_precision_hand_worked():
  # Ranked detections TP, FP, TP, TP, FP with 4 ground-truth boxes:
  #   recall    .25  .25  .50  .75  .75
  #   precision 1    1/2  2/3  3/4  3/5
  # Envelope: 1 at r <= .25, 3/4 up to r = .75, nothing beyond.
  # All-point: .25 * 1 + .25 * 3/4 + .25 * 3/4 = 0.625.
  # 11-point: r = 0, .1, .2 -> 1; r = .3 ... .7 (5 points) -> 3/4; r = .8, .9, 1 -> 0:
  #   (3 + 5 * 3/4) / 11 = 27/44.
  scores = [0.6, 0.9, 0.5, 0.8, 0.7]  # shuffled: ranks 4, 1, 5, 2, 3
  is_tp = [True, True, False, False, True]
  recall, precision = metrics.precision_recall(scores, is_tp, num_positives=4)
  np.testing.assert_allclose(recall, [.25, .25, .5, .75, .75])
  np.testing.assert_allclose(precision, [1, 1 / 2, 2 / 3, 3 / 4, 3 / 5])
  assert metrics.average_precision(recall, precision) == pytest.approx(0.625)
  assert metrics.average_precision(recall, precision,
                                   interpolation="11_point") == pytest.approx(27 / 44)


def test_voc_map_hand_worked():
  box_a, box_b = [0, 0, 10, 10], [20, 20, 30, 30]
  detections = [
      {"boxes": [[0, 0, 10, 9], [1, 0, 10, 10]], "scores": [0.95, 0.9], "labels": [0, 0]},
      {"boxes": [[20, 20, 30, 29], [50, 50, 60, 60]], "scores": [0.8, 0.7], "labels": [0, 2]},
  ]
  ground_truths = [{"boxes": [box_a], "labels": [0]},
                   {"boxes": [box_b, box_b], "labels": [0, 1]}]
  # Class 0 (2 boxes): .95 TP, .9 FP (duplicate of a taken box), .8 TP.
  #   precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> all-point 1/2 * 1 + 1/2 * 2/3 = 5/6;
  #   11-point: r <= .5 (6 points) -> 1, r >= .6 (5 points) -> 2/3: (6 + 10/3) / 11 = 28/33.
  # Class 1: one box, no detections -> 0. Class 2: no ground truth -> not averaged.
  result = metrics.mean_average_precision(detections, ground_truths)
  assert result.ap_per_class == pytest.approx({0: 5 / 6, 1: 0.0})
  assert result.map == pytest.approx(5 / 12)
  eleven = metrics.mean_average_precision(detections, ground_truths, interpolation="11_point")
  assert eleven.ap_per_class[0] == pytest.approx(28 / 33)


def test_voc_map_difficult_by_hand():
  box_a, box_b, box_c = [0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 10]
  ground_truths = [{"boxes": [box_a, box_b], "labels": [0, 0], "difficult": [False, True]},
                   {"boxes": [box_c], "labels": [0]}]
  detections = [{"boxes": [box_b, box_a, box_b, [50, 50, 60, 60]],
                 "scores": [0.9, 0.8, 0.7, 0.6], "labels": [0, 0, 0, 0]},
                {"boxes": [box_c], "scores": [0.5], "labels": [0]}]
  # .9 and .7 hit the difficult box: ignored, both (a difficult box is never used up).
  # The rest: .8 TP, .6 FP, .5 TP over 2 positives -> recall 1/2, 1/2, 1, precision
  # 1, 1/2, 2/3: all-point AP 1/2 * 1 + 1/2 * 2/3 = 5/6.
  result = metrics.mean_average_precision(detections, ground_truths)
  assert result.ap_per_class == pytest.approx({0: 5 / 6})
  # Without the flag: 3 positives; TP, TP, FP (box b taken), FP, TP -> recall 1/3, 2/3, 2/3,
  # 2/3, 1 with precision 1, 1, 2/3, 1/2, 3/5: AP 2/3 + 1/3 * 3/5 = 13/15.
  plain = [{k: v for k, v in g.items() if k != "difficult"} for g in ground_truths]
  assert metrics.mean_average_precision(detections, plain).map == pytest.approx(13 / 15)
  # A class whose only boxes are difficult has no positives: skipped, as classes without
  # ground truth.
  ground_truths[1] = {"boxes": [box_c, box_c], "labels": [0, 3], "difficult": [False, True]}
  assert metrics.mean_average_precision(detections, ground_truths).ap_per_class.keys() == {0}


def _voc_devkit(detections, ground_truths, label, iou_threshold, eleven_point):
  """VOCevaldet.m + VOCap.m of the VOC devkit, transcribed loop for loop (xyxy, no +1)."""
  gts = []
  for gt in ground_truths:
    keep = np.asarray(gt["labels"]) == label
    difficult = np.asarray(gt.get("difficult", np.zeros(keep.size, bool)), bool)[keep]
    gts.append((np.asarray(gt["boxes"], float).reshape(-1, 4)[keep], difficult,
                np.zeros(int(keep.sum()), bool)))
  num_positives = sum(int((~d).sum()) for _, d, _ in gts)
  found = [(float(score), i, np.asarray(box, float))
           for i, det in enumerate(detections)
           for box, score, lab in zip(det["boxes"], det["scores"], det["labels"]) if lab == label]
  order = sorted(range(len(found)), key=lambda k: -found[k][0])  # stable, as Matlab's sort
  tp, fp = np.zeros(len(found)), np.zeros(len(found))
  for d, k in enumerate(order):
    _, i, bb = found[k]
    boxes, difficult, taken = gts[i]
    ovmax, jmax = -math.inf, -1
    for j, bbgt in enumerate(boxes):
      iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0])
      ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1])
      if iw > 0 and ih > 0:
        ua = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (bbgt[2] - bbgt[0]) * (bbgt[3] - bbgt[1]) - iw * ih
        ov = iw * ih / ua
        if ov > ovmax:
          ovmax, jmax = ov, j
    if ovmax >= iou_threshold:
      if not difficult[jmax]:
        if not taken[jmax]:
          tp[d], taken[jmax] = 1, True
        else:
          fp[d] = 1
    else:
      fp[d] = 1
  tp, fp = np.cumsum(tp), np.cumsum(fp)
  rec = tp / num_positives
  with np.errstate(invalid="ignore"):
    prec = tp / (fp + tp)  # 0 / 0 = NaN before the first counted detection; max skips NaN
  if eleven_point:
    return sum(np.nanmax(np.concatenate([[0.0], prec[rec >= t]])) / 11
               for t in np.arange(0, 1.1, 0.1))
  mrec, mpre = np.concatenate([[0], rec, [1]]), np.concatenate([[0], prec, [0]])
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = np.fmax(mpre[i], mpre[i + 1])
  steps = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
  return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def test_voc_map_with_difficult_equals_devkit_transcription():
  detections, ground_truths = _random_detection_set(seed=4, num_images=10)
  rng = np.random.default_rng(5)

  def to_xyxy(b):
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)

  detections = [{**d, "boxes": to_xyxy(d["boxes"])} for d in detections]
  ground_truths = [{**g, "boxes": to_xyxy(g["boxes"]),
                    "difficult": rng.random(len(g["labels"])) < 0.3} for g in ground_truths]
  assert sum(int(g["difficult"].sum()) for g in ground_truths) >= 5
  for eleven_point in (False, True):
    for iou_threshold in (0.3, 0.5, 0.7):
      result = metrics.mean_average_precision(
          detections, ground_truths, iou_threshold=iou_threshold,
          interpolation="11_point" if eleven_point else "all_point")
      expected = {c: _voc_devkit(detections, ground_truths, c, iou_threshold, eleven_point)
                  for c in (1, 2, 3)}
      assert result.ap_per_class == pytest.approx(expected, abs=1e-12)


def _random_detection_set(seed, num_images=12, num_classes=4, dyadic=False):
  """Ground truth plus noisy detections (shifted copies, false positives, score ties)."""
  rng = np.random.default_rng(seed)

  def coords(n, lo, hi):
    x = rng.uniform(lo, hi, n)
    return np.round(x * 4) / 4 if dyadic else x

  detections, ground_truths = [], []
  for i in range(num_images):
    g = 0 if i == 3 else int(rng.integers(1, 7))  # image 3 has no ground truth
    gt = np.stack([coords(g, 0, 200), coords(g, 0, 200), coords(g, 4, 130), coords(g, 4, 130)], 1)
    gt_labels = rng.integers(1, num_classes, g)  # class num_classes has no ground truth
    jitter = rng.normal(0, 6, gt.shape) * [1, 1, 0.5, 0.5]
    keep = rng.random(g) < 0.85
    shifted = np.abs(gt + (np.round(jitter * 4) / 4 if dyadic else jitter))[keep]
    num_fp = int(rng.integers(0, 5))
    fp = np.stack([coords(num_fp, 0, 200), coords(num_fp, 0, 200), coords(num_fp, 4, 90),
                   coords(num_fp, 4, 90)], 1)
    boxes = np.concatenate([shifted, fp, shifted[:1]])  # plus a duplicate detection
    labels = np.concatenate([gt_labels[keep], rng.integers(1, num_classes + 1, num_fp),
                             gt_labels[keep][:1]])
    if i == 5:  # more than 100 detections of one class on one image: maxDets matters
      extra = np.stack([coords(110, 0, 200), coords(110, 0, 200), coords(110, 4, 90),
                        coords(110, 4, 90)], 1)
      boxes = np.concatenate([boxes, extra])
      labels = np.concatenate([labels, np.full(110, 1)])
    scores = np.round(rng.random(len(boxes)), 2)  # rounding creates ties
    detections.append({"boxes": boxes.reshape(-1, 4), "scores": scores,
                       "labels": labels.astype(np.int64)})
    ground_truths.append({"boxes": gt, "labels": gt_labels.astype(np.int64)})
  return detections, ground_truths


def _pycocotools(detections, ground_truths, labels):
  images, annotations, results = [], [], []
  for i, (det, gt) in enumerate(zip(detections, ground_truths)):
    images.append({"id": i + 1})
    crowd = gt.get("iscrowd", np.zeros(len(gt["labels"]), bool))
    for box, label, is_crowd in zip(gt["boxes"], gt["labels"], crowd):
      annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                          "category_id": int(label), "bbox": [float(v) for v in box],
                          "area": float(box[2] * box[3]), "iscrowd": int(is_crowd)})
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
      results.append({"image_id": i + 1, "category_id": int(label),
                      "bbox": [float(v) for v in box], "score": float(score)})
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations,
                       "categories": [{"id": int(c)} for c in labels]}
    coco_gt.createIndex()
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator


def test_coco_map_equals_pycocotools():
  detections, ground_truths = _random_detection_set(seed=0)
  ours = metrics.coco_map(detections, ground_truths, box_format="xywh")
  ref = _pycocotools(detections, ground_truths, ours.labels)
  assert ours.labels.tolist() == [1, 2, 3, 4]
  np.testing.assert_allclose(ours.iou_thresholds, ref.params.iouThrs, rtol=0, atol=0)
  # Area range "all", maxDets = 100 is index [..., 0, 2] of pycocotools' arrays.
  np.testing.assert_allclose(ours.precision, ref.eval["precision"][:, :, :, 0, 2], atol=1e-6)
  np.testing.assert_allclose(ours.recall, ref.eval["recall"][:, :, 0, 2], atol=1e-6)
  assert ours.map == pytest.approx(ref.stats[0], abs=1e-6)
  assert ours.map_50 == pytest.approx(ref.stats[1], abs=1e-6)
  assert ours.map_75 == pytest.approx(ref.stats[2], abs=1e-6)
  assert 0.1 < ours.map < 0.9  # a non-trivial set: neither all hits nor all misses
  # The small / medium / large area ranges (ignored boxes) agree as well.
  for a, area_range in enumerate(ref.params.areaRng[1:], start=1):
    got = metrics.coco_map(detections, ground_truths, box_format="xywh",
                           area_range=tuple(area_range))
    np.testing.assert_allclose(got.precision, ref.eval["precision"][:, :, :, a, 2], atol=1e-6)
    assert got.map == pytest.approx(ref.stats[a + 2], abs=1e-6)  # stats[3:6]: S, M, L


def test_coco_map_xyxy_input_and_dyadic_ties_match_pycocotools():
  # Quarter-pixel coordinates make the xyxy <-> xywh conversion exact.
  detections, ground_truths = _random_detection_set(seed=1, num_images=8, dyadic=True)
  # Plus IoUs on the thresholds: a 10 x h box inside a 10 x 10 one has IoU h / 10 = 0.5,
  # 0.55, ..., 0.95 (up to rounding, which must go the same way as in pycocotools).
  for h in np.arange(5.0, 10.0, 0.5):
    detections.append({"boxes": np.array([[0.0, 0.0, 10.0, h]]), "scores": np.array([0.5]),
                       "labels": np.array([1])})
    ground_truths.append({"boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "labels": np.array([1])})
  ref = _pycocotools(detections, ground_truths, [1, 2, 3, 4])

  def to_xyxy(b):
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)

  ours = metrics.coco_map([{**d, "boxes": to_xyxy(d["boxes"])} for d in detections],
                          [{**g, "boxes": to_xyxy(g["boxes"])} for g in ground_truths])
  np.testing.assert_allclose(ours.precision, ref.eval["precision"][:, :, :, 0, 2], atol=1e-6)
  assert ours.map == pytest.approx(ref.stats[0], abs=1e-6)
  per_class = [ref.eval["precision"][:, :, k, 0, 2] for k in range(3)]
  assert ours.ap_per_class == pytest.approx({k + 1: float(p.mean())
                                             for k, p in enumerate(per_class)})


def _with_crowds(detections, ground_truths, seed):
  """Marks some ground truths crowd and adds crowd regions holding several detections."""
  rng = np.random.default_rng(seed)
  detections, ground_truths = [dict(d) for d in detections], [dict(g) for g in ground_truths]
  for i, (det, gt) in enumerate(zip(detections, ground_truths)):
    crowd = rng.random(len(gt["labels"])) < 0.25
    if i % 3 == 0:  # a crowd region of class 1 with 2-4 detections inside and one across
      x, y = rng.uniform(0, 100, 2)
      region = np.array([[x, y, 120.0, 90.0]])
      n = int(rng.integers(2, 5))
      inside = np.stack([x + rng.uniform(0, 80, n), y + rng.uniform(0, 60, n),
                         rng.uniform(8, 40, n), rng.uniform(8, 30, n)], 1)
      across = np.array([[x - 30.0, y + 10.0, 60.0, 40.0]])  # half inside: crowd IoU 1/2
      gt["boxes"] = np.concatenate([gt["boxes"], region])
      gt["labels"] = np.concatenate([gt["labels"], [1]])
      crowd = np.concatenate([crowd, [True]])
      det["boxes"] = np.concatenate([det["boxes"], inside, across])
      det["scores"] = np.concatenate([det["scores"], np.round(rng.random(n + 1), 2)])
      det["labels"] = np.concatenate([det["labels"], np.full(n + 1, 1)])
    gt["iscrowd"] = crowd
  return detections, ground_truths


def test_coco_map_with_crowd_boxes_equals_pycocotools():
  detections, ground_truths = _with_crowds(*_random_detection_set(seed=2, num_images=10), seed=3)
  assert sum(int(g["iscrowd"].sum()) for g in ground_truths) >= 8
  ref = _pycocotools(detections, ground_truths, [1, 2, 3, 4])
  for a, area_range in enumerate(ref.params.areaRng):
    got = metrics.coco_map(detections, ground_truths, box_format="xywh",
                           area_range=tuple(area_range))
    np.testing.assert_allclose(got.precision, ref.eval["precision"][:, :, :, a, 2], atol=1e-6)
    np.testing.assert_allclose(got.recall, ref.eval["recall"][:, :, a, 2], atol=1e-6)
  # Crowd flags matter here: scoring the crowd regions as ordinary boxes changes mAP.
  plain = metrics.coco_map(detections, [{k: v for k, v in g.items() if k != "iscrowd"}
                                        for g in ground_truths], box_format="xywh")
  ours = metrics.coco_map(detections, ground_truths, box_format="xywh")
  assert ours.map == pytest.approx(ref.stats[0], abs=1e-6)
  assert abs(plain.map - ours.map) > 1e-3


def test_coco_map_crowd_by_hand():
  # Class 1: an ordinary box and a crowd region 0..100 x 0..100. Detections by score:
  #   .9, .8 inside the region: crowd IoU = intersection / detection area = 1 -> ignored,
  #     both (a crowd region is never used up);
  #   .7 half outside it: crowd IoU 100 / 200 = 1/2 -> ignored at IoU 0.5, a FP above;
  #   .6 on the ordinary box: TP. Crowd regions are not positives: 1 positive.
  # AP = 1 at IoU 0.5; 1/2 (precision 1/2 at recall 1) at the 9 other thresholds.
  ground_truths = [{"boxes": [[200, 200, 20, 20], [0, 0, 100, 100]], "labels": [1, 1],
                    "iscrowd": [False, True]}]
  detections = [{"boxes": [[10, 10, 10, 10], [50, 50, 20, 20], [90, 0, 20, 10],
                           [200, 200, 20, 20]],
                 "scores": [0.9, 0.8, 0.7, 0.6], "labels": [1, 1, 1, 1]}]
  ours = metrics.coco_map(detections, ground_truths, box_format="xywh")
  ref = _pycocotools(detections, ground_truths, [1])
  np.testing.assert_allclose(ours.precision, ref.eval["precision"][:, :, :, 0, 2], atol=1e-12)
  np.testing.assert_allclose(ours.recall, 1.0)
  assert ours.map_50 == pytest.approx(1.0) and ours.map_75 == pytest.approx(0.5)
  assert ours.map == pytest.approx((1 + 9 * 0.5) / 10)


def test_coco_map_class_without_detections():
  detections = [{"boxes": np.array([[0.0, 0.0, 10.0, 10.0]]), "scores": np.array([0.9]),
                 "labels": np.array([1])}]
  ground_truths = [{"boxes": np.array([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 4.0, 4.0]]),
                    "labels": np.array([1, 2])}]
  ours = metrics.coco_map(detections, ground_truths, box_format="xywh")
  ref = _pycocotools(detections, ground_truths, [1, 2])
  np.testing.assert_allclose(ours.precision, ref.eval["precision"][:, :, :, 0, 2], atol=1e-6)
  # Class 1 is found perfectly (AP 1, up to COCO's tp / (tp + fp + eps)), class 2 never.
  assert ours.ap_per_class == pytest.approx({1: 1.0, 2: 0.0})
  assert ours.map == pytest.approx(0.5) and ours.map == pytest.approx(ref.stats[0], abs=1e-12)


def test_detection_bad_input():
  with pytest.raises(ValueError, match=r"boxes1\[1\]=\[3.0, 0.0, 1.0, 2.0\] is degenerate"):
    metrics.box_iou([[0, 0, 1, 1], [3, 0, 1, 2]], [[0, 0, 1, 1]])
  with pytest.raises(ValueError, match="negative width"):
    metrics.box_iou([[0, 0, -1, 1]], [[0, 0, 1, 1]], box_format="xywh")
  good_gt = [{"boxes": [[0, 0, 1, 1]], "labels": [1]}]
  with pytest.raises(ValueError, match=r"detections\[0\]\['scores'\]\[1\]=nan"):
    metrics.coco_map([{"boxes": [[0, 0, 1, 1]] * 2, "scores": [0.5, math.nan],
                       "labels": [1, 1]}], good_gt)
  with pytest.raises(ValueError, match=r"ground_truths\[0\]\['boxes'\]\[0\].*degenerate"):
    metrics.mean_average_precision([{"boxes": [], "scores": [], "labels": []}],
                                   [{"boxes": [[2, 0, 1, 1]], "labels": [1]}])
  with pytest.raises(ValueError, match=r"len\(detections\)=2 != len\(ground_truths\)=1"):
    metrics.coco_map([{"boxes": [], "scores": [], "labels": []}] * 2, good_gt)
  with pytest.raises(ValueError, match=r"\['iscrowd'\] has 2 entries for 1 boxes"):
    metrics.coco_map([{"boxes": [], "scores": [], "labels": []}],
                     [{**good_gt[0], "iscrowd": [0, 1]}])
  with pytest.raises(ValueError, match=r"\['difficult'\] must be bools or 0 / 1"):
    metrics.mean_average_precision([{"boxes": [], "scores": [], "labels": []}],
                                   [{**good_gt[0], "difficult": [2]}])
  with pytest.raises(ValueError, match="every ground-truth box is difficult"):
    metrics.mean_average_precision([{"boxes": [], "scores": [], "labels": []}],
                                   [{**good_gt[0], "difficult": [True]}])
  with pytest.raises(ValueError, match="need at least one image"):
    metrics.coco_map([], [])
  with pytest.raises(ValueError, match=r"scores\[0\]=nan"):
    metrics.precision_recall([math.nan], [True], 1)
  with pytest.raises(ValueError, match="interpolation='voc'"):
    metrics.average_precision([0.5], [1.0], interpolation="voc")
  with pytest.raises(ValueError, match="recall must be non-decreasing"):
    metrics.average_precision([0.5, 0.25], [1.0, 1.0])
