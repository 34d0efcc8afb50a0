"""SCRFD decoding (hand-placed synthetic detections), NMS, letterbox, and a real photo when ../shared is present."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import FAKE_FACES, SHARED, scrfd_outputs
from PIL import Image

from transfira.alignment import ARCFACE_TEMPLATE, align_face
from transfira.detection import SCRFD, anchor_centers, decode, letterbox, nms, postprocess
from transfira.errors import TransfiraError

SCRFD_PATH = SHARED / "models" / "scrfd_500m_bnkps.onnx"


def expected(faces=FAKE_FACES):
    boxes = np.array([f[5] for f in faces])
    points = np.array([f[6] for f in faces])
    return boxes, np.array([f[4] for f in faces]), points


@pytest.mark.parametrize("batch_axis", [True, False])
def test_decode_recovers_hand_placed_faces(batch_axis):
    boxes, scores, points = decode(scrfd_outputs(FAKE_FACES, batch_axis=batch_axis), 640, 640, threshold=0.5)
    want_boxes, want_scores, want_points = expected()
    order = np.argsort(-scores)
    np.testing.assert_allclose(boxes[order], want_boxes, atol=1e-4)
    np.testing.assert_allclose(scores[order], want_scores, atol=1e-6)
    np.testing.assert_allclose(points[order], want_points, atol=1e-4)


def test_threshold_and_nms_on_synthetic_outputs():
    near = (16, 10, 13, 0, 0.8, (154.0, 112.0, 244.0, 232.0), FAKE_FACES[0][6])  # shifted copy of face 0
    weak = (8, 60, 20, 1, 0.3, (140.0, 460.0, 180.0, 500.0), ((150, 470), (170, 470), (160, 480), (152, 490),
                                                              (168, 490)))
    found = postprocess(scrfd_outputs(FAKE_FACES + [near, weak]), 640, 640, scale=0.5, threshold=0.5)
    want_boxes, want_scores, want_points = expected()
    assert len(found) == 2  # the shifted copy is suppressed (IoU ~0.87), the weak one is under the threshold
    np.testing.assert_allclose(found.scores, want_scores, atol=1e-6)
    np.testing.assert_allclose(found.boxes, want_boxes / 0.5, atol=1e-3)
    np.testing.assert_allclose(found.landmarks, want_points / 0.5, atol=1e-3)


def test_anchor_centers_layout():
    centers = anchor_centers(64, 96, 32)
    assert centers.shape == (2 * 3 * 2, 2)
    np.testing.assert_array_equal(centers[:6], [[0, 0], [0, 0], [32, 0], [32, 0], [64, 0], [64, 0]])
    np.testing.assert_array_equal(centers[6], [0, 32])


def test_nms_iou_by_hand():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], np.float32)  # IoU(0, 1) = 50 / 100
    scores = np.array([0.6, 0.9, 0.7], np.float32)
    np.testing.assert_array_equal(nms(boxes, scores, 0.4), [1, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.6), [1, 2, 0])
    assert nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32)).size == 0


def test_letterbox_keeps_aspect_at_top_left():
    image = np.full((160, 320, 3), 200, np.uint8)  # wide: width fills the canvas
    canvas, scale = letterbox(image, 640)
    assert canvas.shape == (640, 640, 3) and scale == 2.0
    assert (canvas[:320] == 200).all() and (canvas[320:] == 0).all()
    canvas, scale = letterbox(np.full((320, 100, 3), 50, np.uint8), 640)  # tall
    assert scale == 2.0 and (canvas[:, :200] == 50).all() and (canvas[:, 200:] == 0).all()


def test_fake_model_end_to_end(fake_scrfd):
    detector = SCRFD(fake_scrfd)
    found = detector.detect(np.full((1280, 1280, 3), 128, np.uint8))  # letterbox scale 0.5
    want_boxes, _, want_points = expected()
    np.testing.assert_allclose(found.boxes, want_boxes * 2, atol=1e-3)
    np.testing.assert_allclose(found.landmarks, want_points * 2, atol=1e-3)
    assert len(detector.detect(np.zeros((640, 640), np.uint8))) == 0  # grey input expands; black: no face


def test_bad_detector_files(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(TransfiraError, match="not found"):
        SCRFD(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(TransfiraError, match="not a readable ONNX model"):
        SCRFD(tmp_path / "junk.onnx")
    value = helper.make_tensor_value_info
    x, y = value("x", TensorProto.FLOAT, [1, 3, 8, 8]), value("y", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "one_output", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "one.onnx"))
    with pytest.raises(TransfiraError, match="1 outputs"):
        SCRFD(tmp_path / "one.onnx")  # e.g. a face encoder given as the detector


@pytest.mark.shared_data
@pytest.mark.skipif(not SCRFD_PATH.is_file(), reason="needs ../shared/models/scrfd_500m_bnkps.onnx")
def test_real_photos_landmarks_on_the_face():
    detector = SCRFD(SCRFD_PATH)
    # an unaligned AT&T face (92 x 112, grey) and an ArcFace-aligned LFW crop, each 2x on a grey 800 x 600 photo
    for rel, aligned in (("att_orl/images/s1/01.png", False), ("lfw_aligned/images/Aaron_Peirsol/"
                                                               "Aaron_Peirsol_0001.jpg", True)):
        face = Image.open(SHARED / "data" / rel).convert("RGB")
        photo = Image.new("RGB", (800, 600), (128, 128, 128))
        photo.paste(face.resize((face.width * 2, face.height * 2), Image.Resampling.BILINEAR), (300, 150))
        found = detector.detect(np.asarray(photo))
        assert len(found) == 1 and found.scores[0] > 0.5, rel
        x1, y1, x2, y2 = found.boxes[0]
        pts = found.landmarks[0]
        assert (pts[:, 0] > x1).all() and (pts[:, 0] < x2).all() and (pts[:, 1] > y1).all() and (pts[:, 1] < y2).all()
        assert 300 <= x1 and x2 <= 300 + 2 * face.width + 8 and 150 <= y1 and y2 <= 150 + 2 * face.height + 8
        eyes_y, nose_y, mouth_y = pts[:2, 1].mean(), pts[2, 1], pts[3:, 1].mean()
        assert eyes_y < nose_y < mouth_y
        assert pts[0, 0] < pts[2, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # left eye, nose, right eye; mouth
        if aligned:  # the crop was aligned to the template: the detector finds the template points again
            dist = np.linalg.norm((pts - [300, 150]) / 2 - ARCFACE_TEMPLATE, axis=1)
            assert dist.max() < 8.0, dist
            crop = np.asarray(align_face(photo, pts), np.float64).ravel()
            assert np.corrcoef(crop, np.asarray(face, np.float64).ravel())[0, 1] > 0.9
