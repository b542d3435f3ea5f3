"""Blocks written the way their original authors write them, for testing the generic passes on them.

House style item 12: a pass is only as generic as the least convenient code it has met. Each module
here rebuilds one published block in its authors' forward-code shape (their attribute names, their
in-place ops, their helper layers) and carries the authors' own conversion (``switch_to_deploy`` /
``reparameterize``), reproduced in our words, so a test can compare ours with theirs. Among them:

* ``dbb_style``: DingXiaoH/DiverseBranchBlock (``diversebranchblock.py``, ``dbb_transforms.py``)
* ``acnet_style``: DingXiaoH/ACNet (``acnet/acb.py``)
* ``repvgg_style``: DingXiaoH/RepVGG (``repvgg.py``)
* ``mobileone_style``: apple/ml-mobileone (``mobileone.py``)
* ``yolov7_style``: WongKinYiu/yolov7 (``models/common.py``, ``models/yolo.py``: Conv, RepConv, implicit
  layers, IDetect with its in-place decode, IAuxDetect, ReOrg, DownC, SPPCSPC, ``Model.fuse``; the training
  configs of ``cfg/training``); the code itself is the package ``yolov7`` (``common.py``, ``yolo.py``,
  ``configs.py``), laid out as the repository's ``models`` package so that tests can pickle checkpoints from it

Nothing here is imported by the library; the modules are written to be read next to the originals.
"""
