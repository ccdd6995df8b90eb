"""Detection metrics: box IoU, average precision (VOC), COCO-style mAP.

Boxes are float [N, 4] in "xyxy" (x1, y1, x2, y2) or "xywh" (x, y, width, height) format,
continuous coordinates (area = width * height, no "+1" pixel convention).

Per-image inputs for the mAP functions (one mapping per image, same order in both lists):
  detections[i]    = {"boxes": [D, 4], "scores": [D], "labels": [D] int}
  ground_truths[i] = {"boxes": [G, 4], "labels": [G] int, and optionally
                      "areas": [G] (COCO only; default box area; COCO annotations carry the
                                segment area instead),
                      "iscrowd": [G] bool (COCO only; pycocotools' crowd regions),
                      "difficult": [G] bool (VOC only; the VOC devkit's difficult flags)}
Each metric ignores the other's flag.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BOX_FORMATS = ("xyxy", "xywh")
INTERPOLATIONS = ("all_point", "11_point")
# Exactly pycocotools' Params: np.linspace(.5, .95, 10) and np.linspace(0, 1, 101).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1)
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1)
COCO_AREA_ALL = (0.0, 1e5**2)


def _check_boxes(boxes: Any, name: str, box_format: str) -> np.ndarray:
  if box_format not in BOX_FORMATS:
    raise ValueError(f"box_format={box_format!r} is not one of {BOX_FORMATS}")
  b = np.asarray(boxes, dtype=np.float64)
  if b.size == 0:
    b = b.reshape(0, 4)
  if b.ndim != 2 or b.shape[1] != 4:
    raise ValueError(f"{name} must have shape [N, 4], got {b.shape}")
  bad = np.flatnonzero(~np.all(np.isfinite(b), axis=1))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}]={b[bad[0]].tolist()} is not finite")
  if box_format == "xyxy":
    bad = np.flatnonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}]={b[bad[0]].tolist()} is degenerate: x2 < x1 or "
                       "y2 < y1 (box_format='xyxy')")
  else:
    bad = np.flatnonzero((b[:, 2] < 0) | (b[:, 3] < 0))
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}]={b[bad[0]].tolist()} is degenerate: negative width "
                       "or height (box_format='xywh')")
  return b


def box_iou(boxes1: Any, boxes2: Any, *, box_format: str = "xyxy") -> np.ndarray:
  """Pairwise intersection over union, float64 [N, M]; 0 where the union is empty."""
  b1 = _check_boxes(boxes1, "boxes1", box_format)
  b2 = _check_boxes(boxes2, "boxes2", box_format)
  if box_format == "xywh":
    return _iou_xywh(b1, b2)
  iw = np.maximum(np.minimum(b1[:, None, 2], b2[None, :, 2]) -
                  np.maximum(b1[:, None, 0], b2[None, :, 0]), 0.0)
  ih = np.maximum(np.minimum(b1[:, None, 3], b2[None, :, 3]) -
                  np.maximum(b1[:, None, 1], b2[None, :, 1]), 0.0)
  inter = iw * ih
  area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
  area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
  union = area1[:, None] + area2[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _iou_xywh(d: np.ndarray, g: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
  """IoU [D, G] of xywh boxes; for a crowd ground truth, intersection / detection area."""
  # Same float operations, in the same order, as pycocotools' C bbIou, so COCO matching
  # decisions at an IoU threshold are bit-identical.
  w = np.minimum(d[:, None, 2] + d[:, None, 0], g[None, :, 2] + g[None, :, 0]) - np.maximum(
      d[:, None, 0], g[None, :, 0])
  h = np.minimum(d[:, None, 3] + d[:, None, 1], g[None, :, 3] + g[None, :, 1]) - np.maximum(
      d[:, None, 1], g[None, :, 1])
  inter = w * h
  det_area = (d[:, 2] * d[:, 3])[:, None]
  union = det_area + (g[:, 2] * g[:, 3])[None, :] - inter
  if crowd is not None:
    union = np.where(crowd[None, :], det_area, union)
  overlap = (w > 0) & (h > 0)
  return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _check_scores(scores: Any, name: str) -> np.ndarray:
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(s))
  if bad.size:
    raise ValueError(f"{name}[{bad[0]}]={s[bad[0]]} is not finite")
  return s


def precision_recall(scores: Any, is_true_positive: Any,
                     num_positives: int) -> tuple[np.ndarray, np.ndarray]:
  """Recall and precision after each detection ranked by score (stable, descending).

  Returns (recall [D], precision [D]): recall_k = TP_k / num_positives,
  precision_k = TP_k / k over the top-k detections.
  """
  s = _check_scores(scores, "scores")
  tp = np.asarray(is_true_positive, dtype=bool).reshape(-1)
  if tp.shape != s.shape:
    raise ValueError(f"is_true_positive has {tp.size} entries but scores has {s.size}")
  if not num_positives > 0:
    raise ValueError(f"num_positives={num_positives} must be > 0")
  if tp.sum() > num_positives:
    raise ValueError(f"{int(tp.sum())} true positives exceed num_positives={num_positives}")
  tp_cum = np.cumsum(tp[np.argsort(-s, kind="mergesort")])
  ranks = np.arange(1, s.size + 1)
  return tp_cum / num_positives, tp_cum / ranks


def average_precision(recall: Any, precision: Any, *, interpolation: str = "all_point") -> float:
  """AP from a ranked precision/recall curve (Pascal VOC).

  The precision envelope p_interp(r) = max_{r' >= r} p(r') removes the zig-zags.
  "all_point" (VOC 2010+): area under the envelope, sum over recall steps
  (r_k - r_{k-1}) * p_interp(r_k). "11_point" (VOC 2007): mean of p_interp at
  r = 0, 0.1, ..., 1 (0 where that recall is never reached).
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
  rec = np.asarray(recall, dtype=np.float64).reshape(-1)
  prec = np.asarray(precision, dtype=np.float64).reshape(-1)
  if rec.shape != prec.shape:
    raise ValueError(f"len(recall)={rec.size} != len(precision)={prec.size}")
  for name, v in (("recall", rec), ("precision", prec)):
    bad = np.flatnonzero(~np.isfinite(v) | (v < 0) | (v > 1))
    if bad.size:
      raise ValueError(f"{name}[{bad[0]}]={v[bad[0]]} is not in [0, 1]")
  if np.any(np.diff(rec) < 0):
    raise ValueError("recall must be non-decreasing (detections ranked by score)")
  if interpolation == "11_point":
    return float(np.mean([prec[rec >= t].max() if np.any(rec >= t) else 0.0
                          for t in np.linspace(0.0, 1.0, 11)]))
  mrec = np.concatenate([[0.0], rec, [1.0]])
  mpre = np.concatenate([[0.0], prec, [0.0]])
  mpre = np.maximum.accumulate(mpre[::-1])[::-1]
  steps = np.flatnonzero(mrec[1:] != mrec[:-1])
  return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclasses.dataclass(frozen=True)
class _Image:
  det_boxes: np.ndarray
  det_scores: np.ndarray
  det_labels: np.ndarray
  gt_boxes: np.ndarray
  gt_labels: np.ndarray
  gt_areas: np.ndarray
  gt_crowd: np.ndarray
  gt_difficult: np.ndarray


def _prepare(detections: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
             box_format: str) -> list[_Image]:
  if isinstance(detections, Mapping) or isinstance(ground_truths, Mapping):
    raise ValueError("detections and ground_truths must be sequences with one mapping per image")
  detections, ground_truths = list(detections), list(ground_truths)
  if not detections or not ground_truths:
    raise ValueError(f"need at least one image: len(detections)={len(detections)}, "
                     f"len(ground_truths)={len(ground_truths)}")
  if len(detections) != len(ground_truths):
    raise ValueError(f"len(detections)={len(detections)} != "
                     f"len(ground_truths)={len(ground_truths)}")
  images = []
  for i, (det, gt) in enumerate(zip(detections, ground_truths)):
    for name, keys, value in ((f"detections[{i}]", ("boxes", "scores", "labels"), det),
                              (f"ground_truths[{i}]", ("boxes", "labels"), gt)):
      missing = [k for k in keys if k not in value]
      if missing:
        raise ValueError(f"{name} is missing keys {missing}")
    det_boxes = _check_boxes(det["boxes"], f"detections[{i}]['boxes']", box_format)
    det_scores = _check_scores(det["scores"], f"detections[{i}]['scores']")
    det_labels = _check_labels(det["labels"], f"detections[{i}]['labels']")
    gt_boxes = _check_boxes(gt["boxes"], f"ground_truths[{i}]['boxes']", box_format)
    gt_labels = _check_labels(gt["labels"], f"ground_truths[{i}]['labels']")
    if not det_boxes.shape[0] == det_scores.size == det_labels.size:
      raise ValueError(f"detections[{i}] has {det_boxes.shape[0]} boxes, {det_scores.size} "
                       f"scores, {det_labels.size} labels")
    if gt_boxes.shape[0] != gt_labels.size:
      raise ValueError(f"ground_truths[{i}] has {gt_boxes.shape[0]} boxes, {gt_labels.size} "
                       "labels")
    if box_format == "xyxy":  # COCO matching runs on xywh
      det_boxes = np.concatenate([det_boxes[:, :2], det_boxes[:, 2:] - det_boxes[:, :2]], 1)
      gt_boxes = np.concatenate([gt_boxes[:, :2], gt_boxes[:, 2:] - gt_boxes[:, :2]], 1)
    gt_areas = gt_boxes[:, 2] * gt_boxes[:, 3]
    if "areas" in gt:
      gt_areas = _check_scores(gt["areas"], f"ground_truths[{i}]['areas']")
      if gt_areas.size != gt_labels.size:
        raise ValueError(f"ground_truths[{i}] has {gt_areas.size} areas, {gt_labels.size} labels")
    flags = [_check_flags(gt.get(key), gt_labels.size, f"ground_truths[{i}]['{key}']")
             for key in ("iscrowd", "difficult")]
    images.append(_Image(det_boxes, det_scores, det_labels, gt_boxes, gt_labels, gt_areas,
                         *flags))
  if sum(im.gt_labels.size for im in images) == 0:
    raise ValueError("ground_truths contain no boxes; average precision is undefined")
  return images


def _check_flags(flags: Any, size: int, name: str) -> np.ndarray:
  if flags is None:
    return np.zeros(size, dtype=bool)
  f = np.asarray(flags).reshape(-1)
  if f.size != size:
    raise ValueError(f"{name} has {f.size} entries for {size} boxes")
  if f.size and not (np.issubdtype(f.dtype, np.bool_) or np.issubdtype(f.dtype, np.integer)):
    raise ValueError(f"{name} must be bools or 0 / 1, got dtype {f.dtype}")
  if np.any((f != 0) & (f != 1)):
    raise ValueError(f"{name} must be bools or 0 / 1, got {f.tolist()}")
  return f.astype(bool)


def _check_labels(labels: Any, name: str) -> np.ndarray:
  lab = np.asarray(labels).reshape(-1)
  if lab.size and not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"{name} must be integers, got dtype {lab.dtype}")
  return lab.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class DetectionAP:
  """mAP = mean of ap_per_class over classes with (non-difficult) ground truth."""
  map: float
  ap_per_class: dict[int, float]


def mean_average_precision(detections: Sequence[Mapping[str, Any]],
                           ground_truths: Sequence[Mapping[str, Any]], *,
                           iou_threshold: float = 0.5, interpolation: str = "all_point",
                           box_format: str = "xyxy") -> DetectionAP:
  """Pascal VOC mAP at one IoU threshold.

  Per class, detections from all images are ranked by score (stable); each is matched to the
  ground-truth box of its image with the highest IoU (the first on ties), as the VOC devkit
  (VOCevaldet.m): IoU >= iou_threshold on a "difficult" box -> ignored (neither TP nor FP,
  and the box may absorb any number of detections); on another box -> a true positive if
  that box is not yet taken, else a false positive; below the threshold -> a false
  positive. Difficult boxes do not count as positives. AP by `average_precision` over the
  detections that are not ignored. Classes without (non-difficult) ground truth are skipped.
  """
  if not 0 <= iou_threshold <= 1:
    raise ValueError(f"iou_threshold={iou_threshold} must be in [0, 1]")
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
  images = _prepare(detections, ground_truths, box_format)
  classes = np.unique(np.concatenate([im.gt_labels for im in images]))
  ap: dict[int, float] = {}
  for c in classes.tolist():
    scores, matches = [], []
    for im in images:
      d = np.flatnonzero(im.det_labels == c)
      if d.size == 0:
        continue
      gt = im.gt_boxes[im.gt_labels == c]
      difficult = im.gt_difficult[im.gt_labels == c]
      ious = _iou_xywh(im.det_boxes[d], gt)
      taken = np.zeros(gt.shape[0], dtype=bool)
      for k in np.argsort(-im.det_scores[d], kind="mergesort"):
        # Matching within an image only depends on the score order inside that image.
        j = int(np.argmax(ious[k])) if gt.shape[0] else -1
        covered = j >= 0 and ious[k, j] >= iou_threshold
        if covered and difficult[j]:
          continue  # an ignored detection changes neither TP nor FP counts
        hit = covered and not taken[j]
        if hit:
          taken[j] = True
        scores.append(im.det_scores[d][k])
        matches.append(hit)
    num_gt = sum(int(np.sum((im.gt_labels == c) & ~im.gt_difficult)) for im in images)
    if num_gt == 0:
      continue
    if not scores:
      ap[c] = 0.0
      continue
    recall, precision = precision_recall(scores, matches, num_gt)
    ap[c] = average_precision(recall, precision, interpolation=interpolation)
  if not ap:
    raise ValueError("every ground-truth box is difficult; average precision is undefined")
  return DetectionAP(map=float(np.mean(list(ap.values()))), ap_per_class=ap)


@dataclasses.dataclass(frozen=True)
class CocoAP:
  """COCO bbox evaluation at one area range and max-detections setting.

  precision [T, R, K]: interpolated precision at IoU threshold t, recall threshold r and class
  labels[k]; recall [T, K]; both -1 for a class without (non-ignored) ground truth, as in
  pycocotools. map averages precision over entries > -1 (AP@[.5:.95] with the default
  thresholds), map_50 / map_75 at IoU 0.5 / 0.75 (NaN if that threshold is not evaluated or
  nothing is valid), ap_per_class[label] averages over T and R.
  """
  map: float
  map_50: float
  map_75: float
  ap_per_class: dict[int, float]
  precision: np.ndarray
  recall: np.ndarray
  labels: np.ndarray
  iou_thresholds: np.ndarray


def coco_map(detections: Sequence[Mapping[str, Any]], ground_truths: Sequence[Mapping[str, Any]],
             *, box_format: str = "xyxy", iou_thresholds: Any = COCO_IOU_THRESHOLDS,
             max_detections: int = 100,
             area_range: tuple[float, float] = COCO_AREA_ALL) -> CocoAP:
  """COCO-style mAP, matching pycocotools' COCOeval (bbox) exactly, crowd boxes included.

  Per image and class: detections sorted by score (stable), the top `max_detections` kept;
  at each IoU threshold each detection greedily takes the unmatched ground truth with the
  highest IoU >= threshold (ties go to the later box). Crowd ground truths ("iscrowd") and
  those outside `area_range` are ignored: they come last in the matching, so a detection
  takes one only when no ordinary box qualifies; a detection matched to one is neither
  TP nor FP, and they are not counted in recall. A crowd box's IoU is intersection /
  detection area, and it stays available for any number of detections. Unmatched
  detections outside `area_range` are ignored too. Per class, all images' detections are
  ranked by score, and precision is read from the envelope at 101 recall points
  (0, 0.01, ..., 1). Labels are the union of ground-truth and detection labels, images are
  taken in list order (pycocotools: image id order, detections and annotations in file
  order).
  """
  thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
  if thresholds.size == 0 or np.any(~np.isfinite(thresholds) | (thresholds < 0) |
                                     (thresholds > 1)):
    raise ValueError(f"iou_thresholds={thresholds.tolist()} must be non-empty, in [0, 1]")
  if not (isinstance(max_detections, (int, np.integer)) and max_detections > 0):
    raise ValueError(f"max_detections={max_detections} must be a positive integer")
  lo, hi = (float(a) for a in area_range)
  if not lo <= hi:
    raise ValueError(f"area_range={area_range} must be (low, high) with low <= high")
  images = _prepare(detections, ground_truths, box_format)
  labels = np.unique(np.concatenate([np.concatenate([im.gt_labels, im.det_labels])
                                     for im in images]))
  num_t, num_r = thresholds.size, COCO_RECALL_THRESHOLDS.size
  precision = -np.ones((num_t, num_r, labels.size))
  recall = -np.ones((num_t, labels.size))
  for k, c in enumerate(labels.tolist()):
    per_image = [_coco_evaluate_image(im, c, thresholds, max_detections, lo, hi)
                 for im in images]
    per_image = [e for e in per_image if e is not None]
    scores = np.concatenate([e[0] for e in per_image])
    order = np.argsort(-scores, kind="mergesort")
    dt_matched = np.concatenate([e[1] for e in per_image], axis=1)[:, order]
    dt_ignore = np.concatenate([e[2] for e in per_image], axis=1)[:, order]
    num_gt = int(np.count_nonzero(~np.concatenate([e[3] for e in per_image])))
    if num_gt == 0:
      continue
    tp_sum = np.cumsum(dt_matched & ~dt_ignore, axis=1).astype(np.float64)
    fp_sum = np.cumsum(~dt_matched & ~dt_ignore, axis=1).astype(np.float64)
    num_d = scores.size
    for t in range(num_t):
      rc = tp_sum[t] / num_gt
      pr = tp_sum[t] / (fp_sum[t] + tp_sum[t] + np.spacing(1))
      recall[t, k] = rc[-1] if num_d else 0.0
      if num_d == 0:
        precision[t, :, k] = 0.0
        continue
      pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope
      # First rank reaching each recall threshold; thresholds never reached get 0.
      idx = np.searchsorted(rc, COCO_RECALL_THRESHOLDS, side="left")
      precision[t, :, k] = np.where(idx < num_d, pr[np.minimum(idx, num_d - 1)], 0.0)
  return CocoAP(
      map=_mean_valid(precision),
      map_50=_mean_at(precision, thresholds, 0.5),
      map_75=_mean_at(precision, thresholds, 0.75),
      ap_per_class={int(c): _mean_valid(precision[:, :, k]) for k, c in enumerate(labels)
                    if np.any(precision[:, :, k] > -1)},
      precision=precision, recall=recall, labels=labels, iou_thresholds=thresholds)


def _mean_valid(values: np.ndarray) -> float:
  valid = values[values > -1]
  return float(valid.mean()) if valid.size else math.nan


def _mean_at(precision: np.ndarray, thresholds: np.ndarray, iou: float) -> float:
  t = np.flatnonzero(np.isclose(thresholds, iou, rtol=0, atol=1e-12))
  return _mean_valid(precision[t]) if t.size else math.nan


def _coco_evaluate_image(im: _Image, label: int, thresholds: np.ndarray, max_detections: int,
                         lo: float, hi: float):
  """pycocotools' evaluateImg for one image and class: (scores, matched, ignored, gt_ignored)."""
  d = np.flatnonzero(im.det_labels == label)
  g = np.flatnonzero(im.gt_labels == label)
  if d.size == 0 and g.size == 0:
    return None
  order = np.argsort(-im.det_scores[d], kind="mergesort")[:max_detections]
  dt, scores = im.det_boxes[d][order], im.det_scores[d][order]
  gt_ignore = im.gt_crowd[g] | (im.gt_areas[g] < lo) | (im.gt_areas[g] > hi)
  gt_order = np.argsort(gt_ignore, kind="mergesort")  # ignored ground truth last
  gt, gt_ignore, crowd = im.gt_boxes[g][gt_order], gt_ignore[gt_order], im.gt_crowd[g][gt_order]
  ious = _iou_xywh(dt, gt, crowd)
  num_t, num_d, num_g = thresholds.size, dt.shape[0], gt.shape[0]
  gt_taken = np.zeros((num_t, num_g), dtype=bool)
  dt_matched = np.zeros((num_t, num_d), dtype=bool)
  dt_ignore = np.zeros((num_t, num_d), dtype=bool)
  for t, threshold in enumerate(thresholds):
    for i in range(num_d):
      best, m = min(threshold, 1 - 1e-10), -1
      for j in range(num_g):
        if gt_taken[t, j] and not crowd[j]:  # a crowd region absorbs any number of detections
          continue
        if m > -1 and not gt_ignore[m] and gt_ignore[j]:
          break  # a real match beats any ignored ground truth (which come last)
        if ious[i, j] < best:
          continue
        best, m = ious[i, j], j
      if m == -1:
        continue
      dt_ignore[t, i] = gt_ignore[m]
      dt_matched[t, i] = True
      gt_taken[t, m] = True
  dt_area = dt[:, 2] * dt[:, 3]
  outside = (dt_area < lo) | (dt_area > hi)
  dt_ignore |= ~dt_matched & outside[None, :]
  return scores, dt_matched, dt_ignore, gt_ignore
