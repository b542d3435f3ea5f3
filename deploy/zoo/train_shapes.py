"""Train YOLO-Shapes on the synthetic shapes data set and write the shipped files.

    pip install pycocotools torchvision
    python -m deploy.zoo.train_shapes               # writes deploy/zoo/data/{yolo_shapes,shapes_val,shapes_train}.*
    python -m deploy.zoo.train_shapes --out /tmp/s  # somewhere else

Data: every epoch draws ``IMAGES_PER_EPOCH`` fresh images, ``generate(n, TRAIN_SEED + epoch)`` (new
images are the augmentation), on a second thread while the previous epoch trains; the held-out split is
``generate(128, VAL_SEED)``. Deterministic: seed 0 for torch and one torch thread (``--threads``; the
count is recorded), so a rerun on the same torch build reproduces the weights. The weights are stored in
float16 (half the file; the final mAP is measured with exactly those values).

Loss (YOLOv5 / YOLOv7's, written out here): each ground-truth box is assigned, on every level, to
the anchors whose width and height ratios to it are below 4, at its centre cell and the two
neighbouring cells nearest to its centre (offset 0.5); box loss ``1 - CIoU`` of the decoded prediction
``xy = 2 sigmoid - 0.5 + cell``, ``wh = (2 sigmoid)^2 anchor``; objectness BCE on every cell with the
(detached, clamped) CIoU as the target of assigned cells, levels weighted 4 / 1 / 0.4; class BCE on
assigned cells. Gains box 0.05, objectness 0.04, class 0.2 (YOLOv5's 0.05 / 1.0 / 0.5 with more weight
on objectness and classes than its image-size and class-count scaling gives: a short run learns them
faster). AdamW (lr 3e-3, weight decay 5e-4 on conv weights only), linear warm-up over 3 % of the steps,
then cosine decay to 1 %, batch 64, gradient norm clipped at 10. About 12 minutes on one busy CPU core.

Evaluation (:func:`evaluate`): score = objectness x class probability of the best class, boxes above
0.001 kept, ``torchvision.ops.batched_nms`` at IoU 0.6, at most 100 per image (YOLO's mAP settings),
COCO mAP by :func:`runtimes.detection.coco_map` (pycocotools).
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtimes.detection import coco_map

from .shapes import ANCHORS, CLASSES, DATA_DIR, SIZE, TRAIN_SEED, VAL_SEED, WIDTH, generate, yolo_shapes

SEED = 0
EPOCHS = 50
IMAGES_PER_EPOCH = 2048
VAL_IMAGES = 128
CALIBRATION_IMAGES = 128
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 5e-4
WARMUP = 0.03  # fraction of the steps
THREADS = 1  # torch's; the next epoch's images are drawn on a second thread meanwhile
CONF, IOU, MAX_DET = 0.001, 0.6, 100

ANCHOR_T = 4.0  # a box is assigned to anchors within this width / height ratio
BALANCE = (4.0, 1.0, 0.4)  # objectness weight per level, strides 8, 16, 32
GAIN_BOX, GAIN_OBJ, GAIN_CLS = 0.05, 0.04, 0.2


# ------------------------------------------------------------------------------------------------ loss

def ciou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of boxes ``a`` and ``b`` (..., 4) given as cx, cy, w, h (Zheng et al. 2020)."""
    a1, a2 = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b1, b2 = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    inter = (torch.min(a2, b2) - torch.max(a1, b1)).clamp(min=0).prod(-1)
    union = a[..., 2:].prod(-1) + b[..., 2:].prod(-1) - inter + eps
    iou = inter / union
    hull = (torch.max(a2, b2) - torch.min(a1, b1)).square().sum(-1) + eps
    centre = (a[..., :2] - b[..., :2]).square().sum(-1)
    v = (4 / math.pi ** 2) * (torch.atan(b[..., 2] / (b[..., 3] + eps))
                              - torch.atan(a[..., 2] / (a[..., 3] + eps))).square()
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre / hull + v * alpha)


def _targets(gt_boxes: torch.Tensor, gt_classes: torch.Tensor) -> torch.Tensor:
    """Rows ``(image, class, cx, cy, w, h)`` in pixels of the real (unpadded) boxes."""
    image, slot = torch.nonzero(gt_classes >= 0, as_tuple=True)
    b = gt_boxes[image, slot]
    return torch.stack((image.float(), gt_classes[image, slot].float(), (b[:, 0] + b[:, 2]) / 2,
                        (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), 1)


_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5


def yolo_loss(maps: list[torch.Tensor], gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
              detect: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss of the raw maps ``(B, na, ny, nx, 5 + nc)`` and its parts (box, obj, cls), detached."""
    targets = _targets(gt_boxes, gt_classes)
    lbox, lobj, lcls = (torch.zeros(()) for _ in range(3))
    for level, (p, stride) in enumerate(zip(maps, detect.strides)):
        ny, nx = p.shape[2:4]
        anchors = detect.anchor_grid[level].view(-1, 2) / stride  # (na, 2) in cells
        tobj = torch.zeros(p.shape[:4])
        if len(targets):
            t = targets.clone()
            t[:, 2:] /= stride
            ratio = t[None, :, 4:6] / anchors[:, None]  # (na, nt, 2)
            a, ti = torch.nonzero(torch.max(ratio, 1 / ratio).amax(2) < ANCHOR_T, as_tuple=True)
            t = t[ti]
            gxy = t[:, 2:4]
            gxi = torch.tensor([nx, ny], dtype=torch.float32) - gxy
            j, k = ((gxy % 1 < 0.5) & (gxy > 1)).T
            l, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
            use = torch.stack((torch.ones_like(j), j, k, l, m))  # (5, n): centre cell and the nearer neighbours
            t, a = t.repeat(5, 1, 1)[use], a.repeat(5, 1)[use]
            offsets = (torch.zeros_like(gxy)[None] + _OFFSETS[:, None])[use]
            gij = (t[:, 2:4] - offsets).long()
            gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
            b = t[:, 0].long()
            if len(b):
                ps = p[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[a]
                iou = ciou(torch.cat((pxy, pwh), 1), torch.cat((t[:, 2:4] - torch.stack((gi, gj), 1), t[:, 4:6]), 1))
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)
                cls_target = F.one_hot(t[:, 1].long(), detect.nc).float()
                lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], cls_target)
        lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * BALANCE[level]
    lbox, lobj, lcls = lbox * GAIN_BOX, lobj * GAIN_OBJ, lcls * GAIN_CLS
    return (lbox + lobj + lcls) * len(gt_boxes), torch.stack((lbox, lobj, lcls)).detach()


# ------------------------------------------------------------------------------------------ evaluation

def postprocess(decoded: torch.Tensor, conf: float = CONF, iou: float = IOU, max_det: int = MAX_DET
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image ``(boxes xyxy, scores, classes)`` from IDetect's decoded ``(B, N, 5 + nc)`` output:
    score = objectness x best class probability, kept above ``conf``, class-wise NMS at ``iou``,
    the ``max_det`` best."""
    from torchvision.ops import batched_nms

    out = []
    for pred in decoded:
        scores, classes = (pred[:, 5:] * pred[:, 4:5]).max(1)
        keep = scores > conf
        xywh, scores, classes = pred[keep, :4], scores[keep], classes[keep]
        boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        keep = batched_nms(boxes, scores, classes, iou)[:max_det]
        out.append((boxes[keep].numpy(), scores[keep].numpy(), classes[keep].numpy()))
    return out


@torch.no_grad()
def detect(model: nn.Module, images: np.ndarray, batch: int = 128) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detections of ``model`` (put in eval mode) on float32 ``images`` ``(N, 3, SIZE, SIZE)``."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        out += postprocess(model(torch.from_numpy(images[i:i + batch]))[0])
    return out


def evaluate(model: nn.Module, images: np.ndarray, gt_boxes: np.ndarray, gt_classes: np.ndarray) -> dict[str, float]:
    """COCO mAP@0.5 and mAP@0.5:0.95 of ``model`` on ``images``."""
    return coco_map(detect(model, images), gt_boxes, gt_classes)


# ------------------------------------------------------------------------------------------------ training

def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    ids = {id(p) for p in decay}
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in ids], "weight_decay": 0.0}]


def _split(images: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    return {"input0": images.astype(np.float16), "gt_boxes": boxes, "gt_classes": classes}


def train(out_dir: str | Path = DATA_DIR, epochs: int = EPOCHS, seed: int = SEED, threads: int = THREADS,
          images_per_epoch: int = IMAGES_PER_EPOCH, log=print) -> dict:
    """Train, write ``yolo_shapes.pt``, ``shapes_val.npz`` and ``shapes_train.npz`` (the INT8 calibration
    data) into ``out_dir``; return the training record."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    val = generate(VAL_IMAGES, VAL_SEED)
    val_split = _split(*val)
    x_val = val_split["input0"].astype(np.float32)  # evaluated on the values shipped
    model = yolo_shapes()
    opt = torch.optim.AdamW(_param_groups(model, WEIGHT_DECAY), lr=LR)
    steps_per_epoch = images_per_epoch // BATCH
    steps = epochs * steps_per_epoch
    warmup = max(1, int(WARMUP * steps))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = time.perf_counter()
    history = []
    pool = ThreadPoolExecutor(1)  # draws the next epoch's images while this one trains
    upcoming = pool.submit(generate, images_per_epoch, TRAIN_SEED)
    for epoch in range(epochs):
        images, boxes, classes = (torch.from_numpy(a) for a in upcoming.result())
        if epoch + 1 < epochs:
            upcoming = pool.submit(generate, images_per_epoch, TRAIN_SEED + epoch + 1)
        model.train()
        order = torch.randperm(images_per_epoch, generator=g)
        parts = torch.zeros(3)
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            loss, part = yolo_loss(model(images[idx]), boxes[idx], classes[idx], model.detect)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            parts += part
        line = (f"epoch {epoch + 1:3d}  box {parts[0] / steps_per_epoch:.4f}  obj {parts[1] / steps_per_epoch:.4f}  "
                f"cls {parts[2] / steps_per_epoch:.4f}  {time.perf_counter() - start:.0f} s")
        if (epoch + 1) % 5 == 0 or epoch == epochs - 1:
            m = evaluate(model, x_val, val_split["gt_boxes"], val_split["gt_classes"])
            history.append({"epoch": epoch + 1, **m})
            line += f"  held-out mAP@0.5 {m['map50']:.4f}  mAP@0.5:0.95 {m['map50_95']:.4f}"
        log(line)
    pool.shutdown()
    seconds = time.perf_counter() - start
    model.eval()
    # Shipped in float16 (half the file); the model holds exactly these values, and is evaluated with them.
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    final = evaluate(model, x_val, val_split["gt_boxes"], val_split["gt_classes"])
    calib = generate(CALIBRATION_IMAGES, TRAIN_SEED)  # the first epoch's first images
    meta = {
        "dataset": f"deploy.zoo.shapes.generate: {SIZE}x{SIZE} RGB, classes {', '.join(CLASSES)}, 1-4 objects",
        "train_seeds": f"generate({images_per_epoch}, {TRAIN_SEED} + epoch) for epoch in range({epochs})",
        "val_seed": VAL_SEED, "val_samples": VAL_IMAGES, "val_precision": "float16 images, evaluated as float32",
        "train_images": epochs * images_per_epoch, "seed": seed, "epochs": epochs, "batch": BATCH, "lr": LR,
        "width": WIDTH, "anchors": [list(a) for a in ANCHORS], "threads": threads,
        "nms": {"conf": CONF, "iou": IOU, "max_det": MAX_DET, "score": "obj * best class probability"},
        "map50": final["map50"], "map50_95": final["map50_95"], "history": history,
        "train_seconds": round(seconds, 1), "weights": "float16 (loaded into float32 parameters)",
        "torch": str(torch.__version__),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, out / "yolo_shapes.pt")
    np.savez_compressed(out / "shapes_val.npz", **val_split)
    np.savez_compressed(out / "shapes_train.npz", **_split(*calib))
    log(f"held-out mAP@0.5 {final['map50']:.4f}, mAP@0.5:0.95 {final['map50_95']:.4f} ({VAL_IMAGES} images) after "
        f"{seconds:.0f} s of training; wrote {out / 'yolo_shapes.pt'}, {out / 'shapes_val.npz'} and "
        f"{out / 'shapes_train.npz'}")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train YOLO-Shapes on synthetic shapes (needs torchvision, pycocotools).")
    p.add_argument("--out", default=str(DATA_DIR), help=f"output directory (default {DATA_DIR})")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--images-per-epoch", type=int, default=IMAGES_PER_EPOCH)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=THREADS)
    args = p.parse_args(argv)
    train(args.out, args.epochs, args.seed, args.threads, args.images_per_epoch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
