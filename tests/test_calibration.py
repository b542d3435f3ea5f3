"""INT8 calibration data: .npz, image folders, the shipped training split, seeded inputs, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from deploy.calibration import load_calibration, read_images, seeded_eval
from deploy.record import PipelineError
from deploy.sources import LoadedModel, load_model
from deploy.zoo.digits import load_test_split


def _loaded(trained: bool, **kw) -> LoadedModel:
    return LoadedModel(model=None, spec="m", kind="file", name="m", trained=trained, **kw)


def test_shipped_training_split_is_disjoint_from_the_held_out_samples():
    loaded = load_model("repvgg_digits")
    cal = load_calibration(None, (1, 1, 8, 8), size=300, loaded=loaded)
    assert cal.kind == "shipped" and cal.x.shape == (300, 1, 8, 8)
    test, _ = load_test_split()
    held_out = {row.tobytes() for row in test}
    # the 8x8 digits repeat exactly now and then; the splits are disjoint by index, so nearly no row is shared
    shared = sum(row.tobytes() in held_out for row in cal.x)
    assert shared <= 3, shared
    assert 0.0 <= cal.x.min() and cal.x.max() <= 1.0


def test_random_weights_calibrate_on_seeded_inputs_disjoint_from_evaluation():
    cal = load_calibration(None, (1, 3, 8, 8), size=16, seed=5, loaded=_loaded(False))
    ev = seeded_eval((1, 3, 8, 8), 16, seed=5)
    assert cal.kind == "seeded" and cal.x.shape == (16, 3, 8, 8)
    assert not np.allclose(cal.x, ev)
    assert "random weights" in cal.source


def test_trained_weights_without_calibration_are_refused_naming_the_option():
    with pytest.raises(PipelineError, match="--calibration"):
        load_calibration(None, (1, 3, 8, 8), loaded=_loaded(True))


def test_npz_of_the_wrong_shape_names_both_shapes(tmp_path):
    path = tmp_path / "cal.npz"
    np.savez(path, input0=np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(PipelineError, match=r"\(4, 3, 16, 16\).*1,3,8,8"):
        load_calibration(str(path), (1, 3, 8, 8), loaded=_loaded(True))


def test_npz_subset_is_seeded_and_labels_are_ignored(tmp_path):
    path = tmp_path / "cal.npz"
    x = np.arange(50 * 3 * 2 * 2, dtype=np.float32).reshape(50, 3, 2, 2)
    np.savez(path, input0=x, labels=np.arange(50))
    a = load_calibration(str(path), (1, 3, 2, 2), size=10, seed=1, loaded=_loaded(True))
    b = load_calibration(str(path), (1, 3, 2, 2), size=10, seed=1, loaded=_loaded(True))
    assert a.x.shape == (10, 3, 2, 2) and np.array_equal(a.x, b.x)
    assert "10 of 50" in a.source


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_calibration(str(tmp_path / "nope.npz"), (1, 3, 8, 8), loaded=_loaded(True))


def test_image_folder_is_resized_cropped_and_normalized(tmp_path):
    from PIL import Image

    # a 40x20 image: left half red, right half blue; resized to shorter side 8/0.875 ~ 9, center-cropped 8x8
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = read_images(tmp_path, (1, 3, 8, 8), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert x.shape == (1, 3, 8, 8)
    # (p - 0.5) / 0.5: red channel +1 on the left columns, -1 on the right; blue the other way round
    assert x[0, 0, :, 0].min() > 0.9 and x[0, 0, :, -1].max() < -0.9
    assert x[0, 2, :, -1].min() > 0.9 and x[0, 1].max() < -0.9


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match="broken.jpg"):
        read_images(tmp_path, (1, 3, 8, 8), mean=[0, 0, 0], std=[1, 1, 1])


def test_empty_image_folder_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="holds no images"):
        load_calibration(str(tmp_path), (1, 3, 8, 8), loaded=_loaded(True))
