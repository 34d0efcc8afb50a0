"""ONNX -> torch conversion: every encoder weight trains (SPEC §4), outputs unchanged."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import SHARED
from transfira.backbone import (check_embedding_size, load_backbone, onnx_weight_count, trainable_weight_count,
                                untrainable_initializers)
from transfira.demo import TinyFaceNet, export_onnx
from transfira.errors import TransfiraError
from transfira.model import RecognizabilityPredictionNetwork

MOBILEFACENET = SHARED / "models" / "mobilefacenet_arcface.onnx"


@pytest.fixture(scope="module")
def fresh_onnx(tmp_path_factory):
    """An untrained InsightFace-shaped encoder: the exporter aliases equal initializers through Identity nodes."""
    torch.manual_seed(0)
    net = TinyFaceNet()
    path = tmp_path_factory.mktemp("fresh") / "fresh.onnx"
    export_onnx(net, path)
    return path, sum(v.numel() for v in net.state_dict().values() if v.is_floating_point())


def _ort(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _all_weights_get_gradients(net):
    net.train()
    net(torch.randn(4, 3, 112, 112)).square().sum().backward()
    return [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]


def test_demo_encoder_fully_trainable(demo_dir):
    path = demo_dir / "encoder.onnx"
    net = load_backbone("onnx", path)
    graph = onnx.load(str(path))
    assert {"Conv", "BatchNormalization", "PRelu", "Add", "Gemm"} <= {n.op_type for n in graph.graph.node}
    assert untrainable_initializers(graph, net) == 0
    assert trainable_weight_count(net) == onnx_weight_count(graph)
    x = torch.randn(3, 3, 112, 112)
    np.testing.assert_allclose(net.eval()(x).detach().numpy(), _ort(path, x), atol=1e-4)
    assert _all_weights_get_gradients(net) == []


def test_aliased_initializers_are_untied(fresh_onnx):
    path, torch_count = fresh_onnx
    graph = onnx.load(str(path))
    assert "Identity" in {n.op_type for n in graph.graph.node}  # the case this guards against
    from onnx2torch import convert

    plain = convert(graph)
    assert untrainable_initializers(graph, plain) > 0  # the check sees what plain onnx2torch leaves behind
    net = load_backbone("onnx", path)
    assert onnx_weight_count(graph) == torch_count
    assert untrainable_initializers(graph, net) == 0 and trainable_weight_count(net) == torch_count
    assert set(net.state_dict()) <= set(plain.state_dict())  # same key names as a plain conversion
    x = torch.randn(3, 3, 112, 112)
    np.testing.assert_allclose(net.eval()(x).detach().numpy(), _ort(path, x), atol=1e-4)
    assert _all_weights_get_gradients(net) == []
    stats = {k: b.clone() for k, b in net.named_buffers() if b.is_floating_point()}
    assert stats  # BatchNorm running statistics stay buffers ...
    net.train()(torch.randn(4, 3, 112, 112))
    assert all(not torch.equal(stats[k], b) for k, b in net.named_buffers() if k in stats)  # ... and update


def test_predictor_keys_and_frozen_backbone(demo_dir):
    model = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64)
    keys = set(model.state_dict())
    assert {"ccs_layer.weight", "ccs_layer.bias", "ccas_layer.weight", "ccas_layer.bias"} <= keys
    assert all(k.split(".")[0] in ("backbone", "ccs_layer", "ccas_layer") for k in keys)
    assert torch.count_nonzero(model.ccs_layer.bias) == 0
    frozen = RecognizabilityPredictionNetwork(load_backbone("onnx", demo_dir / "encoder.onnx"), 64, head_hidden=16,
                                              freeze_backbone=True).train()
    assert not frozen.backbone.training and frozen.ccs_layer.training
    assert all(not p.requires_grad for p in frozen.backbone.parameters())
    ccs, ccas = frozen(torch.randn(2, 3, 112, 112))
    assert ccs.shape == ccas.shape == (2, 1)


def test_embedding_size_mismatch_names_both_sizes(demo_dir):
    net = load_backbone("onnx", demo_dir / "encoder.onnx")
    with pytest.raises(TransfiraError, match=r"embedding_size = 512 .* outputs 64-D"):
        check_embedding_size(net, 512, 112, demo_dir / "encoder.onnx")


@pytest.mark.shared_data
@pytest.mark.skipif(not MOBILEFACENET.is_file(), reason="needs ../shared/models/mobilefacenet_arcface.onnx")
def test_mobilefacenet_all_weights_trainable():
    graph = onnx.load(str(MOBILEFACENET))
    net = load_backbone("onnx", MOBILEFACENET)
    assert onnx_weight_count(graph) == 1_292_992
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 1_292_992  # PReLU slopes included
    assert untrainable_initializers(graph, net) == 0
