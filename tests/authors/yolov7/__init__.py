"""WongKinYiu/yolov7's ``models`` package as its authors lay it out: ``common.py`` (the blocks) and ``yolo.py``
(the detection heads, ``parse_model``, ``Model``; it imports the blocks with ``from .common import *``).

Two files rather than one so that a test can copy them, unchanged, into a folder named ``models`` and pickle a
model built from there: a training checkpoint of the repository then names ``models.yolo.Model``,
``models.common.Conv``, ... and loading it needs that folder (``deploy convert --code-path``), as a real
``yolov7.pt`` needs the repository. ``configs.py`` holds the training configs as yaml-like data (it is not copied).
``tests/authors/yolov7_style.py`` re-exports all of it for the tests.
"""
