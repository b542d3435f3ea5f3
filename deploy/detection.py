"""Detection end to end: boxes with NMS inside the artifact (or on the host, said so), verified by box
matching, mAP per stage, pictures.

A YOLO-style detector's eval output 0 is ``(batch, boxes, 5 + nc)``: centre x, centre y, width, height in
pixels, objectness and class probabilities (``IDetect``'s decode). :func:`find_head` recognises such a
model by its head module (``nc``, ``no = nc + 5``, ``na`` anchors per level); ``--nms`` on anything else is
refused.

With ``--nms`` (``exporters.nms.NmsOptions``), :func:`nms_stages` appends NMS to the fp32 ONNX file
(``model.nms.onnx``, the standard ``NonMaxSuppression`` operator, ``exporters.nms.add_nms``: outputs
``num_dets``, ``boxes`` xyxy, ``scores``, ``classes`` per image, batch-dynamic with ``--dynamic``) and
converts that file for OpenVINO (``model.nms.xml``) and TensorRT (``model.nms.engine``, GPU only). Every
other stage (TFLite, pt2, INT8, ...) ends before NMS; its runner's output is passed through the same NMS on the host
(``runtimes.detection.nms``), and the report says where NMS ran for each stage.

Verification (:func:`verify`): NMS output is discontinuous, so it is not compared elementwise. The
pre-NMS stages are verified elementwise as usual (``verify_stages``); a stage ending in NMS is compared
with the host NMS of the training model's outputs by matching boxes (``runtimes.detection.
match_detections``: IoU, score and class within tolerances; a detection present in one and not the
other passes only when a threshold decision within tolerance explains it, and is reported). With
ground truth in the samples (``gt_boxes``, ``gt_classes``: the shipped ``yolo_shapes`` held-out
split), every stage gets mAP@0.5 and mAP@0.5:0.95 (pycocotools) at the run's NMS settings, and one
held-out image per stage is drawn with its detections into ``detections/<stage>.png``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from exporters.nms import NmsOptions
from runtimes.core import first_line

from .forms import derived_form, main_stage
from .record import ExportRecord, PipelineError, StageRecord, VerificationRecord
from .resources import read_npz
from .stages import batch_of, open_stage, run_batched
from .tasks import DETECTIONS, ends_in_nms, host_nms, per_image

__all__ = ["Plan", "plan", "find_head", "ends_in_nms", "nms_stages", "read_ground_truth", "verify", "draw",
           "label_rectangles", "class_names", "detect_images", "read_image", "NmsOptions", "PICTURES"]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

PICTURES = "detections"  # folder of the run directory holding one drawn held-out image per stage
OUTPUTS = DETECTIONS


def _noop(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ the head

def find_head(model: nn.Module) -> nn.Module | None:
    """The YOLO-style detection head of ``model`` (a ``*Detect`` module with ``nc``, ``no = nc + 5``, ``na``),
    or None."""
    for m in model.modules():
        nc, no, na = (getattr(m, k, None) for k in ("nc", "no", "na"))
        if "Detect" in type(m).__name__ and isinstance(nc, int) and no == nc + 5 and isinstance(na, int):
            return m
    return None


def require_head(model: nn.Module, spec: str) -> nn.Module:
    """``model``'s detection head; :class:`PipelineError` naming ``--nms`` when it has none."""
    head = find_head(model)
    if head is None:
        raise PipelineError(f"--nms needs a YOLO-style detection head (a *Detect module with nc, no = nc + 5 and na "
                            f"anchors, whose eval output 0 is (batch, boxes, 5 + nc)) and {spec} has none; drop --nms")
    return head


def output_fits(output0: np.ndarray, nc: int) -> bool:
    return output0.ndim == 3 and output0.shape[-1] == nc + 5


def check_output(output0: np.ndarray, nc: int, spec: str) -> None:
    """Refuse a head whose recorded output 0 is not ``(batch, boxes, 5 + nc)``."""
    if not output_fits(output0, nc):
        raise PipelineError(f"--nms: {spec}'s output 0 has shape {tuple(output0.shape)}, not (batch, boxes, "
                            f"{nc + 5}) as its {nc}-class detection head implies; drop --nms")


def class_names(model: nn.Module, nc: int) -> list[str]:
    """The model's class names (YOLOv7 models carry ``names``), else ``class 0``, ``class 1``, ..."""
    names = getattr(model, "names", None) or getattr(find_head(model), "names", None)
    if isinstance(names, (list, tuple)) and len(names) == nc and all(isinstance(n, str) for n in names):
        return list(names)
    return [f"class {i}" for i in range(nc)]


def can_score() -> bool:
    """Whether mAP can be computed here (pycocotools is installed)."""
    import importlib.util

    return importlib.util.find_spec("pycocotools") is not None


# ------------------------------------------------------------------------------------------- ground truth

def read_ground_truth(path: str, count: int) -> dict[str, np.ndarray] | None:
    """``gt_boxes`` (N, K, 4) xyxy pixels and ``gt_classes`` (N, K), -1 padding, from a samples ``.npz``; None
    when it has none."""
    data = read_npz(path, "samples file")
    if "gt_boxes" not in data and "gt_classes" not in data:
        return None
    if not {"gt_boxes", "gt_classes"} <= set(data):
        raise PipelineError(f"{path} holds only one of gt_boxes / gt_classes; save both: gt_boxes (N, K, 4) xyxy "
                            "pixels and gt_classes (N, K) with -1 for padding")
    boxes, classes = data["gt_boxes"], data["gt_classes"]
    if boxes.shape[:1] != (count,) or boxes.ndim != 3 or boxes.shape[2] != 4 or classes.shape != boxes.shape[:2] \
            or classes.dtype.kind not in "iu":
        raise PipelineError(f"{path}: gt_boxes must be ({count}, K, 4) and gt_classes ({count}, K) integers, got "
                            f"{tuple(boxes.shape)} and {tuple(classes.shape)} {classes.dtype}")
    return {"gt_boxes": boxes.astype(np.float32), "gt_classes": classes.astype(np.int64)}


# ------------------------------------------------------------------------------------ a conversion's part

@dataclass
class Plan:
    """What a conversion does for a detector (:func:`plan`); for any other model every step is a no-op.

    ``truth``: the samples' ground-truth boxes (recorded beside them); ``settle``: whether the training model's
    recorded outputs are raw detections (then ``options`` are the NMS settings every stage is scored with);
    ``stages``: the NMS stages of ``--nms``; ``guard_nms``: what an INT8 detector is judged at; ``verify``: the
    detections of every stage, their mAP and pictures, and the model's own ``fuse()`` form."""

    model: nn.Module
    spec: str
    nms: NmsOptions | None = None  # --nms
    head: nn.Module | None = None
    truth: dict | None = None
    options: NmsOptions | None = None

    def settle(self, vdir: Path) -> None:
        """Read the training model's recorded output 0: a detector's raw head output (``--nms`` requires it)."""
        if self.head is None:
            return
        output0 = read_npz(vdir / "reference.npz")["output0"]
        if self.nms is not None:
            check_output(output0, self.head.nc, self.spec)
        if output_fits(output0, self.head.nc):
            self.options = self.nms or NmsOptions()

    def stages(self, made: Sequence[StageRecord], folder: Path, wanted: Sequence[str],
               progress: Progress | None = None) -> list[StageRecord]:
        return nms_stages(made, folder, wanted, self.nms, progress) if self.nms is not None else []

    def guard_nms(self) -> dict | None:
        """The NMS settings an INT8 detector with ground truth is judged by (its mAP@0.5 drop), else None."""
        return asdict(self.options) if self.options is not None and self.truth is not None else None

    def verify(self, root: Path, stages: Sequence[StageRecord], results: dict, outputs: dict, args: tuple,
               progress: Progress | None = None) -> dict:
        """The run's detection record ({} for a model that is not a detector); adds to ``results``."""
        if self.options is None:
            return {}
        found = verify(root, stages, results, self.options, outputs, names=class_names(self.model, self.head.nc),
                       progress=progress)
        found["in_artifact"] = self.nms is not None
        onnx_stage = main_stage(stages, "onnx")
        if onnx_stage is not None and onnx_stage.path and getattr(results.get(onnx_stage.name), "passed", False):
            found["own_fuse"] = own_fuse(self.model, args, root / onnx_stage.path, progress)
        return found

    def rescore(self, root: Path, stages: Sequence[StageRecord], results: dict, outputs: dict) -> None:
        """The detection metrics (NMS on the host, mAP) of ``stages`` verified again (an INT8 fallback), into
        ``results``; no pictures, no NMS-fusion check."""
        if self.options is not None:
            verify(root, stages, results, self.options, outputs, names=class_names(self.model, self.head.nc),
                   pictures=False)


def plan(model: nn.Module, spec: str, nms: NmsOptions | None, samples_path: str | None, count: int | None,
         notes: list[str]) -> Plan:
    """The detector part of converting ``model`` (``spec`` on the command line), checked before any work: its
    head (``--nms`` needs one), the ground truth of ``count`` samples in ``samples_path`` (mAP needs
    pycocotools: without it a note says so)."""
    head = require_head(model, spec) if nms is not None else find_head(model)
    truth = read_ground_truth(samples_path, count) if samples_path and count is not None else None
    if truth is not None and head is not None and not can_score():
        truth = None
        notes.append("the samples carry detection ground truth, but mAP needs pycocotools: pip install pycocotools "
                     "(or the 'detect' extra)")
    return Plan(model, spec, nms, head, truth)


# ----------------------------------------------------------------------------------------------- export

def nms_stages(made: Sequence[StageRecord], folder: Path, wanted: Sequence[str], opts: NmsOptions,
               progress: Progress | None = None) -> list[StageRecord]:
    """``onnx-nms`` (the fp32 ONNX stage with NMS appended) and, when OpenVINO / TensorRT are wanted,
    ``openvino-nms`` / ``tensorrt-nms`` (converted from it)."""
    from exporters import targets as registry
    from exporters.onnx import describe_onnx

    progress = progress or _noop
    folder = Path(os.path.abspath(folder))
    onnx_stage = main_stage(made, "onnx")
    if onnx_stage is None or onnx_stage.export.error or onnx_stage.precision != "fp32":
        why = "its fp32 ONNX export failed" if onnx_stage is not None else "no fp32 ONNX stage was made"
        return [StageRecord("onnx-nms", ExportRecord("onnx", parent="onnx", error=f"not made: {why}", main=False))]
    source = onnx_stage.export.artifact_in(folder)
    meta = {"nms": asdict(opts), "outputs": list(OUTPUTS)}

    def with_nms():
        import onnx

        from exporters.nms import add_nms

        path = folder / "model.nms.onnx"
        onnx.save(add_nms(onnx.load(source.path), opts), path)
        art = describe_onnx(path, parent=source.path)
        art.metadata.update(meta)
        art.note(f"NMS in the graph (NonMaxSuppression): conf {opts.conf}, IoU {opts.iou}, at most {opts.max_det} "
                 f"per image{', class-agnostic' if opts.agnostic else ''}")
        return art

    def converted():
        from exporters.openvino import export_openvino

        art = export_openvino(out[0].export.artifact_in(folder), folder / "model.nms.xml")
        art.metadata.update(meta)
        art.note("NMS in the graph: converted from model.nms.onnx")
        return art

    def engine():  # GPU only: not exercised on a machine without a CUDA GPU and TensorRT
        from exporters.tensorrt import export_tensorrt

        art = export_tensorrt(out[0].export.artifact_in(folder), folder / "model.nms.engine")
        art.metadata.update(meta)
        art.note("NMS in the graph: TensorRT's ONNX parser builds NonMaxSuppression from model.nms.onnx")
        return art

    out = [derived_form(registry.get("onnx"), "onnx-nms", onnx_stage, folder, with_nms, what="onnx with NMS",
                        progress=progress)]
    for target, make in (("openvino", converted), ("tensorrt", engine)):
        if target in wanted and not out[0].export.error:
            out.append(derived_form(registry.get(target), f"{target}-nms", out[0], folder, make,
                                    what=f"{target} with NMS", progress=progress))
    return out


def own_fuse(model: nn.Module, args: tuple, ours: Path, progress: Progress | None = None) -> dict:
    """ONNX op counts of the model's own ``fuse()`` form (YOLOv5/YOLOv7 models carry one) exported the same way
    as ours (torch.export, the dynamo exporter, onnxsim), beside those of our ONNX file ``ours``; ``{}`` for a
    model without ``fuse``, ``{"error": ...}`` when its form does not export."""
    import contextlib
    import copy
    import io
    import tempfile

    from exporters.onnx import describe_onnx, export_onnx

    if not callable(getattr(model, "fuse", None)):
        return {}
    (progress or _noop)("exporting the model's own fuse() form the same way, to compare ONNX node counts")
    theirs = copy.deepcopy(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as tmp:
            fused = theirs.fuse() or theirs
            fused.eval()
            art = export_onnx(fused, args, Path(tmp) / "fuse.onnx")
    except Exception as e:  # noqa: BLE001 - a comparison, not a stage: its failure is reported, not raised
        return {"error": f"{type(e).__name__}: {first_line(e)}"}
    mine = describe_onnx(ours).metadata["ops"]
    return {"ours": dict(mine), "fuse": dict(art.metadata["ops"]), "ours_nodes": sum(mine.values()),
            "fuse_nodes": sum(art.metadata["ops"].values()), "file": ours.name}


# ----------------------------------------------------------------------------------------- verification

def _host(pred: np.ndarray, opts: NmsOptions) -> dict[str, np.ndarray]:
    return host_nms(pred, asdict(opts))


def _run_nms_stage(runner, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """The four NMS outputs of ``runner`` on the rows of ``x`` in chunks of ``batch``."""
    try:
        return run_batched(runner, x, batch, names=OUTPUTS)
    except PipelineError as e:
        raise PipelineError(f"{str(e).rstrip('.')}; rerun deploy convert --nms") from e


def verify(root: Path, stages: Sequence[StageRecord], results: dict[str, VerificationRecord], opts: NmsOptions,
           outputs: dict, *, names: Sequence[str] = (), trust_pickle: bool = False, pictures: bool = True,
           progress: Progress | None = None) -> dict:
    """Detections of every stage: the stages ending in NMS verified by box matching against the host NMS of
    the training model's outputs (their records added to ``results``), mAP per stage when the samples carry
    ground truth, pictures. ``outputs`` holds the other stages' outputs (``verify_stages(outputs=...)``).
    Returns the run's detection record."""
    from runtimes.detection import match_detections


    progress = progress or _noop
    vdir = root / "verify"
    seeded_in = next(iter(read_npz(vdir / "inputs.npz").values()))
    reference = read_npz(vdir / "reference.npz")["output0"]
    samples = read_npz(vdir / "samples.npz") if (vdir / "samples.npz").exists() else None
    truth = {k: samples.pop(k) for k in ("gt_boxes", "gt_classes")} if samples and "gt_boxes" in samples else None
    x_samples = samples["input0"] if samples else None
    ref = {"seeded": _host(reference, opts)}
    samples_pred = read_npz(vdir / "samples_reference.npz")["output0"] if samples else None
    if samples:
        ref["samples"] = _host(samples_pred, opts)

    training = stages[0]
    dets: dict[str, dict[str, np.ndarray]] = {training.name: ref.get("samples", ref["seeded"])}
    results.setdefault(training.name, VerificationRecord(True, "reference")).detection["nms"] = "host"
    for s in stages[1:]:
        if s.export.error:
            continue
        if not ends_in_nms(s):
            got = outputs.get((s.name, "samples")) or outputs.get((s.name, "seeded"))
            if got is not None and s.name in results:
                dets[s.name] = _host(got[0], opts)
                results[s.name].detection["nms"] = "host"
            continue
        v = results[s.name] = VerificationRecord(detection={"nms": "graph"})
        progress(f"verifying {s.name} ({s.path}) by matching its detections")
        try:
            runner = open_stage(s, root, trust_pickle=trust_pickle).activate()
        except Exception as e:  # a corrupt or missing file is this stage's failure, not the run's
            v.passed, v.reason = False, f"cannot open: {first_line(e)}"
            continue
        reasons = []
        try:
            checks = {"seeded": (seeded_in, ref["seeded"], reference)}
            if samples:
                checks["samples"] = (x_samples, ref["samples"], samples_pred)
            for on, (x, expected, candidates) in checks.items():
                got = _run_nms_stage(runner, x, batch_of(s, len(x)))
                match = match_detections(expected, got, conf=opts.conf, iou=opts.iou, max_det=opts.max_det,
                                         agnostic=opts.agnostic, candidates=candidates)
                v.checks[on] = {**asdict(match), "summary": match.summary()}
                if not match.passed:
                    reasons.append(f"{on}: {match.summary()}")
                dets[s.name] = got
        except Exception as e:  # noqa: BLE001 - the stage fails, saying why; the others go on
            reasons.append(f"{type(e).__name__}: {first_line(e)}")
        finally:
            runner.deactivate()
        if not any(int(r["num_dets"].sum()) for r in ref.values()):
            v.notes.append(f"the training model detects nothing above --conf {opts.conf:g} on these inputs, so the "
                           "matching compared empty lists: lower --conf (a random-weight YOLO head scores about "
                           "1e-4) or pass --inputs with real images")
        v.passed, v.reason = not reasons, "; ".join(reasons)
        v.detection["summary"] = "; ".join(f"{on}: {c.get('summary', '')}" for on, c in v.checks.items())
        log.info("stage %s: %s", s.name, "pass" if v.passed else f"FAIL: {v.reason}")

    record = {"nms": asdict(opts), "names": list(names), "matched_on": "seeded" + (" and samples" if samples else "")}
    if truth is not None:
        from runtimes.detection import coco_map

        progress(f"mAP of every stage on {len(x_samples)} held-out images (pycocotools)")
        for name, d in dets.items():
            results[name].detection.update(coco_map(per_image(d), truth["gt_boxes"], truth["gt_classes"]))
        if pictures:
            record["pictures"] = _pictures(root, x_samples, dets, names)
    return record


# ------------------------------------------------------------------------------------------------ pictures

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def label_rectangles(boxes: np.ndarray, sizes: Sequence[tuple[int, int]], width: int, height: int) -> np.ndarray:
    """Where the labels of ``boxes`` ((N, 4) xyxy, picture pixels) go in a ``width`` x ``height`` picture: (N, 4)
    integer rectangles x0, y0, x1, y1 (x1, y1 exclusive), label i being ``sizes[i]`` = (w, h) pixels.

    Greedy, in the boxes' order (``draw`` passes them best score first): each label tries above its box,
    inside its top edge, below it, inside its bottom edge, then every other row, nearest first; on each row
    at the box's left edge, then right-aligned with its right edge. Every position is clamped into the picture, and the
    first that meets no label already placed is taken. Labels therefore always lie inside the picture (one
    larger than the picture starts at its top-left corner) and overlap only when no free position is left,
    then at their first choice."""
    placed = np.zeros((len(boxes), 4), dtype=np.int64)
    for i, (box, (w, h)) in enumerate(zip(boxes, sizes)):
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        above = y0 - h
        rows = [above, y0, y1, y1 - h] + sorted(range(height - h + 1), key=lambda y: abs(y - above))
        ys = np.clip(rows, 0, max(0, height - h))
        xs = np.clip([x0, x1 - w], 0, max(0, width - w))
        corners = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), -1).reshape(-1, 2)  # row by row
        rects = np.concatenate([corners, corners + [w, h]], 1)
        free = ~_intersect(rects, placed[:i]).any(1)
        placed[i] = rects[int(np.argmax(free))] if free.any() else rects[0]
    return placed


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) whether rectangles ``a`` and ``b`` (xyxy, x1 and y1 exclusive) share a pixel."""
    a, b = a[:, None], b[None]
    return ((a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3]))


def _font(size: int):
    """Pillow's built-in font at ``size`` px; its fixed-size bitmap font where Pillow lacks FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except ImportError:
        return ImageFont.load_default()


def draw(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, names: Sequence[str] = (),
         scale: int = 1):
    """A PIL image of ``image`` ((3, H, W) floats in [0, 1], or (H, W, 3) uint8) with its boxes drawn,
    enlarged ``scale`` times (nearest neighbour) so that small inputs stay readable. Each box's label (class
    and score, on a filled rectangle of the box's colour) is placed by :func:`label_rectangles`: inside the
    picture and clear of the other labels."""
    from PIL import Image, ImageDraw

    arr = image if image.dtype == np.uint8 else (np.clip(np.transpose(image, (1, 2, 0)), 0, 1) * 255).round()
    pic = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if scale > 1:
        pic = pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)
    pen = ImageDraw.Draw(pic)
    font, pad = _font(max(10, min(pic.size) // 32)), 2
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")  # the best score's label placed first
    boxes, scores, classes = (np.asarray(a)[order] for a in (boxes, scores, classes))
    colours = [COLOURS[int(c) % len(COLOURS)] for c in classes]
    texts = [f"{names[int(c)] if int(c) < len(names) else int(c)} {float(s):.2f}" for s, c in zip(scores, classes)]
    bounds = [pen.textbbox((0, 0), t, font=font) for t in texts]
    sizes = [(r - left + 2 * pad, b - top + 2 * pad) for left, top, r, b in bounds]
    for box, colour in zip(boxes, colours):
        pen.rectangle(tuple(float(v) * scale for v in box), outline=colour, width=max(1, scale // 2))
    placed = label_rectangles(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale, sizes, *pic.size)
    for (x0, y0, x1, y1), (left, top, _, _), text, colour in zip(placed.tolist(), bounds, texts, colours):
        pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)
        pen.text((x0 + pad - left, y0 + pad - top), text, fill=ink, font=font)
    return pic


def _pictures(root: Path, x: np.ndarray, dets: dict[str, dict[str, np.ndarray]], names: Sequence[str]) -> dict:
    """The first held-out image drawn with each stage's detections: ``{stage: relative path}``."""
    folder = root / PICTURES
    folder.mkdir(exist_ok=True)
    scale = max(1, 256 // max(x.shape[-2:]))
    out = {}
    for name, d in dets.items():
        k = int(d["num_dets"].reshape(-1)[0])
        path = folder / f"{name}.png"
        draw(x[0], d["boxes"][0, :k], d["scores"][0, :k], d["classes"][0, :k], names, scale).save(path)
        out[name] = f"{PICTURES}/{name}.png"
    return out


# -------------------------------------------------------------------------------------------- deploy detect

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class Found:
    """The detections on one image, in its own pixel coordinates (clipped to it), and where they were drawn."""

    image: str
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    picture: str


def _images(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise PipelineError(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)}); pass an image or a folder of "
                                "them")
        return found
    if not p.is_file():
        raise PipelineError(f"image {path} does not exist; pass an image file or a folder of images")
    return [p]


def read_image(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(original RGB uint8 (H0, W0, 3), model input (3, H, W) float32 in [0, 1])``: the image resized to
    ``size`` (bilinear, aspect ratio not kept) and divided by 255, as YOLO-style models take it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineError(f"cannot read image {path} ({first_line(e)}); pass a PNG, JPEG or BMP file") from e
    h, w = size
    x = np.asarray(rgb.resize((w, h), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255.0
    return np.asarray(rgb), np.ascontiguousarray(x)


def pick_stage(record, runtime: str | None) -> StageRecord:
    """The stage ``deploy detect`` runs: on ``runtime`` (default: the first that ran), the one ending in NMS
    if there is one, else the fp32 main stage (NMS then on the host)."""
    from exporters import targets as registry

    usable = [s for s in record.stages[1:] if s.passed and s.export.artifact is not None]
    runtimes = list(dict.fromkeys(registry.get(s.format).runtime for s in usable))
    if runtime is not None and runtime not in runtimes:
        raise PipelineError(f"the run has no verified {runtime} artifact; choose --runtime from "
                            f"{', '.join(runtimes) or '(none: the run has no verified artifact)'}")
    mine = [s for s in usable if registry.get(s.format).runtime == (runtime or (runtimes or [None])[0])]
    if not mine:
        raise PipelineError("the run has no verified artifact to run; rerun deploy convert")
    with_nms = [s for s in mine if ends_in_nms(s)]
    plain = [s for s in mine if s.export.main and s.precision == "fp32"] or mine
    return (with_nms or plain)[0]


def detect_images(run_dir: str | os.PathLike, images: str, *, runtime: str | None = None,
                  out: str | os.PathLike | None = None, force: bool = False,
                  progress: Progress | None = None) -> tuple[StageRecord, list[Found], list[str]]:
    """Run a converted detector's artifact on ``images`` (a file or a folder) and draw its detections: one PNG
    (``out``, default ``<image stem>.detections.png`` in the current folder) for one image, a folder
    of PNGs for a folder. An existing output is replaced only with ``force``. Returns the stage run, the
    detections per image and the class names."""
    from .record import load_record

    progress = progress or _noop
    root = Path(run_dir)
    record = load_record(root)
    if not record.detection.get("nms"):
        raise PipelineError(f"{run_dir} is not a detector's run (its model has no YOLO-style detection head); "
                            "deploy detect needs the output directory of deploy convert on a detector")
    opts = NmsOptions(**record.detection["nms"])
    names = record.detection.get("names") or []
    files = _images(images)
    single = not Path(images).is_dir()
    target = Path(out) if out else Path(f"{files[0].stem}.detections.png" if single else
                                        f"{Path(images).name}.detections")
    if target.exists() and not force:
        raise PipelineError(f"{target} exists; pass --force to replace it or --out elsewhere")
    stage = pick_stage(record, runtime)
    shape = stage.export.artifact.inputs[0].shape
    size = (int(shape[2]), int(shape[3]))
    progress(f"running {stage.name} ({stage.path}) on {len(files)} image(s) at {size[0]}x{size[1]}"
             + ("" if ends_in_nms(stage) else "; NMS on the host"))
    pictures = target if not single else None
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
    found, batch = [], batch_of(stage, 1)
    runner = open_stage(stage, root).activate()
    try:
        for f in files:
            original, x = read_image(f, size)
            if ends_in_nms(stage):
                dets = _run_nms_stage(runner, x[None], batch)
            else:
                dets = _host(run_batched(runner, x[None], batch)[0], opts)
            (boxes, scores, classes), = per_image(dets)
            h0, w0 = original.shape[:2]
            boxes = boxes * np.array([w0 / size[1], h0 / size[0]] * 2, dtype=np.float32)
            boxes = np.clip(boxes, 0, np.array([w0, h0, w0, h0], dtype=np.float32))
            picture = target if single else pictures / f"{f.stem}.png"
            draw(original, boxes, scores, classes, names, max(1, 512 // max(h0, w0))).save(picture)
            found.append(Found(str(f), boxes, scores, classes, str(picture)))
    finally:
        runner.deactivate()
    return stage, found, list(names)
