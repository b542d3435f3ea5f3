"""The training configs of WongKinYiu/yolov7 (``cfg/training/*.yaml``) as the dicts ``yaml.safe_load`` gives:
rows ``[from, number, module, args]`` with module names and Python arguments as strings, evaluated by
``parse_model`` in ``yolo.py``'s namespace.

The rows are generated from the few patterns the configs repeat, so each config reads as its layout; the
layer indices the yaml files mark in comments (``# 51``, ``# 63-P4/16`` ...) are asserted in
``tests/test_yolov7_checkpoints.py``. Widths are the repository's; :func:`config` sets ``width_multiple`` to
narrow them (``parse_model`` rounds every width up to a multiple of 8), the routing stays as it is.

* ELAN: two 1x1 branches of the same input, a chain of 3x3 convs on the second, some of them concatenated
  (``[-1, -3, -5, -6]`` in yolov7 and W6, ``[-1, -2, -3, -4, -5, -6]`` in their heads,
  ``[-1, -3, -5, -7, -8]`` in yolov7x, ``[-1, -2, -3, -4]`` in tiny), then a 1x1 merge.
* MP-conv downsampling (yolov7, yolov7x): ``MP`` then a 1x1, beside a 1x1 then a stride-2 3x3, concatenated
  (in the head also with an earlier pyramid level).
* W6 (P6, four levels, 64x stride): a ``ReOrg`` stem, stride-2 3x3 convs between its stages, and an
  ``IAuxDetect`` over four lead heads (layers 114-117) and four auxiliary heads (118-121).
"""

from __future__ import annotations

import copy

__all__ = ["CONFIGS", "config", "TINY", "BASE", "X", "W6"]

LEAKY = "nn.LeakyReLU(0.1)"
P5_ANCHORS = [[12, 16, 19, 36, 40, 28], [36, 75, 76, 55, 72, 146], [142, 110, 192, 243, 459, 401]]
TINY_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
P6_ANCHORS = [[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137], [140, 301, 303, 264, 238, 542],
              [436, 615, 739, 380, 925, 792]]


def _conv(c, k=1, s=1, frm=-1, act=None):
    return [frm, 1, "Conv", [c, k, s] + ([None, 1, act] if act else [])]


def _elan(c, out, *, mid=None, chain=4, cat=(-1, -3, -5, -6), frm=-1, act=None):
    """Two 1x1 branches of ``c``, ``chain`` 3x3 convs of ``mid`` on the second, ``cat`` concatenated, a 1x1 to
    ``out``."""
    mid = c if mid is None else mid
    return ([_conv(c, 1, 1, frm, act), _conv(c, 1, 1, -2, act)] + [_conv(mid, 3, 1, act=act) for _ in range(chain)]
            + [[list(cat), 1, "Concat", [1]], _conv(out, 1, 1, act=act)])


def _mp_down(c, with_level=None):
    """MP then 1x1, beside 1x1 then a stride-2 3x3; concatenated (with ``with_level`` in the head)."""
    cat = [-1, -3] + ([with_level] if with_level is not None else [])
    return [[-1, 1, "MP", []], _conv(c, 1, 1), _conv(c, 1, 1, -3), _conv(c, 3, 2), [cat, 1, "Concat", [1]]]


def _up(c, lateral, act=None):
    """1x1 on the coarse level, nearest 2x upsampling, 1x1 on the backbone's ``lateral`` layer, concatenated."""
    return [_conv(c, 1, 1, act=act), [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], _conv(c, 1, 1, lateral, act),
            [[-1, -2], 1, "Concat", [1]]]


def _cfg(anchors, backbone, head):
    return {"nc": 80, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": anchors, "backbone": backbone,
            "head": head}


def _tiny():
    elan = lambda c, out: _elan(c, out, cat=(-1, -2, -3, -4), chain=2, act=LEAKY)  # noqa: E731
    backbone = ([_conv(32, 3, 2, act=LEAKY), _conv(64, 3, 2, act=LEAKY)] + elan(32, 64)  # 7
                + [[-1, 1, "MP", []]] + elan(64, 128)  # 14
                + [[-1, 1, "MP", []]] + elan(128, 256)  # 21
                + [[-1, 1, "MP", []]] + elan(256, 512))  # 28
    sppcsp = [_conv(256, act=LEAKY), _conv(256, frm=-2, act=LEAKY), [-1, 1, "SP", [5]], [-2, 1, "SP", [9]],
              [-3, 1, "SP", [13]], [[-1, -2, -3, -4], 1, "Concat", [1]], _conv(256, act=LEAKY),
              [[-1, -7], 1, "Concat", [1]], _conv(256, act=LEAKY)]  # 37
    head = (sppcsp + _up(128, 21, LEAKY) + elan(64, 128)  # 47
            + _up(64, 14, LEAKY) + elan(32, 64)  # 57
            + [_conv(128, 3, 2, act=LEAKY), [[-1, 47], 1, "Concat", [1]]] + elan(64, 128)  # 65
            + [_conv(256, 3, 2, act=LEAKY), [[-1, 37], 1, "Concat", [1]]] + elan(128, 256)  # 73
            + [_conv(128, 3, 1, 57, LEAKY), _conv(256, 3, 1, 65, LEAKY), _conv(512, 3, 1, 73, LEAKY),
               [[74, 75, 76], 1, "IDetect", ["nc", "anchors"]]])
    return _cfg(TINY_ANCHORS, backbone, head)


def _base():
    head_elan = lambda c, mid, out: _elan(c, out, mid=mid, cat=(-1, -2, -3, -4, -5, -6))  # noqa: E731
    backbone = ([_conv(32, 3, 1), _conv(64, 3, 2), _conv(64, 3, 1), _conv(128, 3, 2)] + _elan(64, 256)  # 11
                + _mp_down(128) + _elan(128, 512)  # 24
                + _mp_down(256) + _elan(256, 1024)  # 37
                + _mp_down(512) + _elan(256, 1024))  # 50
    head = ([[-1, 1, "SPPCSPC", [512]]]  # 51
            + _up(256, 37) + head_elan(256, 128, 256)  # 63
            + _up(128, 24) + head_elan(128, 64, 128)  # 75
            + _mp_down(128, 63) + head_elan(256, 128, 256)  # 88
            + _mp_down(256, 51) + head_elan(512, 256, 512)  # 101
            + [[75, 1, "RepConv", [256, 3, 1]], [88, 1, "RepConv", [512, 3, 1]], [101, 1, "RepConv", [1024, 3, 1]],
               [[102, 103, 104], 1, "IDetect", ["nc", "anchors"]]])
    return _cfg(P5_ANCHORS, backbone, head)


def _x():
    elan = lambda c, out: _elan(c, out, chain=6, cat=(-1, -3, -5, -7, -8))  # noqa: E731
    backbone = ([_conv(40, 3, 1), _conv(80, 3, 2), _conv(80, 3, 1), _conv(160, 3, 2)] + elan(64, 320)  # 13
                + _mp_down(160) + elan(128, 640)  # 28
                + _mp_down(320) + elan(256, 1280)  # 43
                + _mp_down(640) + elan(256, 1280))  # 58
    head = ([[-1, 1, "SPPCSPC", [640]]]  # 59
            + _up(320, 43) + elan(256, 320)  # 73
            + _up(160, 28) + elan(128, 160)  # 87
            + _mp_down(160, 73) + elan(256, 320)  # 102
            + _mp_down(320, 59) + elan(512, 640)  # 117
            + [_conv(320, 3, 1, 87), _conv(640, 3, 1, 102), _conv(1280, 3, 1, 117),
               [[118, 119, 120], 1, "IDetect", ["nc", "anchors"]]])
    return _cfg(P5_ANCHORS, backbone, head)


def _w6():
    head_elan = lambda c, mid, out: _elan(c, out, mid=mid, cat=(-1, -2, -3, -4, -5, -6))  # noqa: E731
    backbone = ([[-1, 1, "ReOrg", []], _conv(64, 3, 1)]  # 1-P1/2
                + [_conv(128, 3, 2)] + _elan(64, 128)  # 10
                + [_conv(256, 3, 2)] + _elan(128, 256)  # 19
                + [_conv(512, 3, 2)] + _elan(256, 512)  # 28
                + [_conv(768, 3, 2)] + _elan(384, 768)  # 37
                + [_conv(1024, 3, 2)] + _elan(512, 1024))  # 46
    head = ([[-1, 1, "SPPCSPC", [512]]]  # 47
            + _up(384, 37) + head_elan(384, 192, 384)  # 59
            + _up(256, 28) + head_elan(256, 128, 256)  # 71
            + _up(128, 19) + head_elan(128, 64, 128)  # 83
            + [_conv(256, 3, 2), [[-1, 71], 1, "Concat", [1]]] + head_elan(256, 128, 256)  # 93
            + [_conv(384, 3, 2), [[-1, 59], 1, "Concat", [1]]] + head_elan(384, 192, 384)  # 103
            + [_conv(512, 3, 2), [[-1, 47], 1, "Concat", [1]]] + head_elan(512, 256, 512)  # 113
            + [_conv(256, 3, 1, 83), _conv(512, 3, 1, 93), _conv(768, 3, 1, 103), _conv(1024, 3, 1, 113)]  # lead
            + [_conv(320, 3, 1, 83), _conv(640, 3, 1, 71), _conv(960, 3, 1, 59), _conv(1280, 3, 1, 47)]  # aux
            + [[[114, 115, 116, 117, 118, 119, 120, 121], 1, "IAuxDetect", ["nc", "anchors"]]])
    return _cfg(P6_ANCHORS, backbone, head)


TINY, BASE, X, W6 = _tiny(), _base(), _x(), _w6()
CONFIGS = {"yolov7-tiny": TINY, "yolov7": BASE, "yolov7x": X, "yolov7-w6": W6}


def config(name: str, *, nc: int | None = None, width_multiple: float | None = None) -> dict:
    """A fresh copy of training config ``name`` (a key of :data:`CONFIGS`), optionally narrowed and with ``nc``
    classes."""
    cfg = copy.deepcopy(CONFIGS[name])
    if nc is not None:
        cfg["nc"] = nc
    if width_multiple is not None:
        cfg["width_multiple"] = width_multiple
    return cfg
