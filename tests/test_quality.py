"""Quality scores (transfira.quality): SER-FIQ against slow float64 numpy, last-FC location, norm, CR,
external CSVs, score-weighted templates against a hand computation, the [quality] config."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from transfira.aggregation import WEIGHT_EPS
from transfira.backbone import load_backbone
from transfira.config import apply_schema
from transfira.demo import export_onnx
from transfira.errors import TransfiraError
from transfira.jobs.test import SCHEMA as TEST_SCHEMA
from transfira.quality import (SerFiq, certainty_ratio, embedding_norm, external_scores, keep_masks, minmax,
                               score_names, score_templates)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "models"
torch.set_num_threads(1)


class LinearHead(nn.Module):
    """Conv + PReLU, then a hand-built linear head: Flatten, Linear, BatchNorm1d (an ArcFace-style BN-FC-BN end)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 4, 1), nn.PReLU(4), nn.AvgPool2d(4))  # 4 x 7 x 7 at 112 px
        self.fc = nn.Linear(4 * 7 * 7, 8)
        self.bn = nn.BatchNorm1d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_()

    def forward(self, x):
        return self.bn(self.fc(torch.flatten(self.body(x), 1)))


class DepthwiseHead(nn.Module):
    """MobileFaceNet's end: a 7x7 depthwise conv over the whole 7 x 7 map (with bias), BatchNorm2d, a 1x1 conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, 4, 1), nn.PReLU(6), nn.AvgPool2d(4))  # 6 x 7 x 7 at 112 px
        self.gdc = nn.Conv2d(6, 6, 7, groups=6)
        self.bn = nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 5, 1)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return torch.flatten(self.out(self.bn(self.gdc(self.body(x)))), 1)


class NoFC(nn.Module):
    """Convs and PReLU ending in global average pooling: nothing fully connected."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.PReLU(8), nn.Conv2d(8, 8, 3, 2, 1), nn.PReLU(8))

    def forward(self, x):
        return torch.flatten(self.body(x).mean((2, 3)), 1)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality_models")
    head = LinearHead().eval()
    export_onnx(head, root / "linear_head.onnx")
    export_onnx(NoFC().eval(), root / "no_fc.onnx")
    export_onnx(DepthwiseHead().eval(), root / "depthwise_head.onnx")
    return root, head


def np_mix32(x: np.ndarray) -> np.ndarray:
    """The mask hash, independently in numpy uint64 (which wraps by itself)."""
    for _ in range(2):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(0x45D9F3B)) & np.uint64(0xFFFFFFFF)
    return x ^ (x >> np.uint64(16))


def np_keep(seed: int, j: int, units: int, p: float) -> np.ndarray:
    """Pass ``j``'s keep mask [units]: ``mix32(mix32(j * units + f) ^ (seed mod 2^32)) >= p 2^32``, any image."""
    counter = np.arange(j * units, (j + 1) * units, dtype=np.uint64)
    return np_mix32(np_mix32(counter) ^ np.uint64(seed % 2 ** 32)) >= np.uint64(round(p * 2 ** 32))


def np_serfiq(x: np.ndarray, seed: int, m: int, p: float, weight, bias, bn) -> float:
    """Slow float64 SER-FIQ of one image: prefix output ``x`` [F], linear head, loops over passes and pairs."""
    mean, var, gamma, beta, eps = bn
    embeddings = []
    for j in range(m):
        keep = np_keep(seed, j, len(x), p)
        z = weight @ (x * keep / (1 - p)) + bias
        z = (z - mean) / np.sqrt(var + eps) * gamma + beta
        embeddings.append(z / np.linalg.norm(z))
    total = sum(np.linalg.norm(embeddings[i] - embeddings[j]) for i in range(m) for j in range(i + 1, m))
    return 2 / (1 + np.exp(2 / m ** 2 * total))


def test_serfiq_matches_slow_numpy(onnx_models):
    root, head = onnx_models
    net = load_backbone("onnx", root / "linear_head.onnx").eval()
    m, p, seed = 12, 0.4, 3
    serfiq = SerFiq(net, 112, m=m, p=p, seed=seed, batch=2)
    assert serfiq.units == 4 * 7 * 7 and "gemm" in serfiq.layer.lower()
    images = torch.randn(5, 3, 112, 112)
    with torch.no_grad():
        embedding, q = serfiq(images)
        np.testing.assert_allclose(embedding.numpy(), net(images).numpy(), rtol=1e-5, atol=1e-6)
        x = torch.flatten(head.body(images), 1).double().numpy()
    w, b = head.fc.weight.double().detach().numpy(), head.fc.bias.double().detach().numpy()
    bn = [t.double().detach().numpy() for t in (head.bn.running_mean, head.bn.running_var, head.bn.weight,
                                                 head.bn.bias)] + [head.bn.eps]
    expected = [np_serfiq(x[i], seed, m, p, w, b, bn) for i in range(5)]
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-5)
    assert np.ptp(expected) > 1e-3  # the images differ, so a constant output would fail
    with torch.no_grad():  # p = 0: all passes equal, q = 2 sigmoid(0) = 1
        assert torch.allclose(SerFiq(net, 112, m=m, p=0.0)(images)[1],
                              torch.ones(5, dtype=torch.float64))


def test_serfiq_folded_depthwise_head_matches_slow_numpy(onnx_models):
    """A global depthwise conv head: the masks are folded into its weights (one batched product), same scores."""
    root, _ = onnx_models
    net = load_backbone("onnx", root / "depthwise_head.onnx").eval()
    torch.manual_seed(1)
    head = DepthwiseHead().eval()  # the same weights as the exported model
    m, p, seed = 9, 0.5, 4
    serfiq = SerFiq(net, 112, m=m, p=p, seed=seed, batch=2)
    assert serfiq.fold and serfiq.units == 6 * 7 * 7
    images = torch.randn(5, 3, 112, 112)
    with torch.no_grad():
        embedding, q = serfiq(images)
        x = head.body(images).double().numpy()  # [5, 6, 7, 7]
        serfiq.fold = False  # the same masks applied to copies of the input
        unfolded = serfiq(images)[1]
    np.testing.assert_allclose(embedding.numpy(), net(images).detach().numpy(), rtol=1e-5, atol=1e-6)
    w_gdc, b_gdc = (t.double().detach().numpy() for t in (head.gdc.weight[:, 0], head.gdc.bias))
    bn = [t.double().detach().numpy() for t in (head.bn.running_mean, head.bn.running_var, head.bn.weight,
                                                 head.bn.bias)]
    w_out, b_out = head.out.weight[:, :, 0, 0].double().detach().numpy(), head.out.bias.double().detach().numpy()
    expected = []
    for i in range(5):
        embeddings = []
        for j in range(m):
            dropped = x[i] * np_keep(seed, j, x[i].size, p).reshape(x[i].shape) / (1 - p)
            z = np.array([(dropped[c] * w_gdc[c]).sum() for c in range(6)]) + b_gdc
            z = (z - bn[0]) / np.sqrt(bn[1] + head.bn.eps) * bn[2] + bn[3]
            z = w_out @ z + b_out
            embeddings.append(z / np.linalg.norm(z))
        total = sum(np.linalg.norm(embeddings[a] - embeddings[b]) for a in range(m) for b in range(a + 1, m))
        expected.append(2 / (1 + np.exp(2 / m ** 2 * total)))
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(unfolded.numpy(), expected, rtol=1e-5)
    assert np.ptp(expected) > 1e-3


def test_serfiq_scratch_buffer_reused_across_calls_and_modes(demo_dir):
    """The dropped-out input's scratch tensor is kept between calls and replaced when the mode changes."""
    net = load_backbone("onnx", demo_dir / "encoder.onnx").eval()
    serfiq = SerFiq(net, 112, m=6, batch=3)
    assert not serfiq.fold  # a Gemm head: the masks multiply copies of the input
    images = torch.randn(5, 3, 112, 112)
    with torch.no_grad():
        first = serfiq(images)[1]
        buffer = serfiq._dropped
        assert serfiq(images[:2])[1].shape == (2,) and serfiq._dropped is buffer
    with torch.inference_mode():
        inference = serfiq(images)[1]
    with torch.enable_grad():
        graded = serfiq(images.requires_grad_())[1]
    for other in (inference, graded.detach()):
        torch.testing.assert_close(other, first, rtol=0, atol=0)


def test_masks_keep_one_minus_p_and_differ():
    m, units, p = 50, 400, 0.3
    keep = keep_masks(0, m, units, p)
    assert keep.shape == (m, units) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert (keep[0] != keep[1]).float().mean() > 0.3  # the passes are different subnetworks
    # another seed: other masks, about as different as independent draws (2 p (1 - p) = 0.42 of the units)
    for seed in (1, 2 ** 31, 2 ** 32 - 1, -1):
        assert abs((keep != keep_masks(seed, m, units, p)).float().mean().item() - 2 * p * (1 - p)) < 0.02
    for seed in (0, 5, 2 ** 32 - 1, -7):  # the independent numpy definition, seeds with the top bit set too
        expected = np.stack([np_keep(seed, j, units, p) for j in range(m)])
        np.testing.assert_array_equal(keep_masks(seed, m, units, p).numpy(), expected)


def test_serfiq_independent_of_batch_composition(demo_dir):
    net = load_backbone("onnx", demo_dir / "encoder.onnx").eval()
    images = torch.randn(7, 3, 112, 112)
    with torch.no_grad():
        serfiq = SerFiq(net, 112, m=10, batch=7)
        together = serfiq(images)[1]
        masks = serfiq.masks(torch.device("cpu"), torch.float32)
        serfiq(images[:2])
        assert serfiq.masks(torch.device("cpu"), torch.float32) is masks  # built once, then cached
        alone = torch.cat([SerFiq(net, 112, m=10, batch=1)(images[i:i + 1])[1] for i in range(7)])
        order = torch.tensor([6, 2, 0, 5, 1, 4, 3])
        shuffled = SerFiq(net, 112, m=10, batch=3)(images[order])[1]
        split = torch.cat([SerFiq(net, 112, m=10, batch=2)(images[:3])[1], serfiq(images[3:])[1]])
        other_seed = SerFiq(net, 112, m=10, seed=1, batch=7)(images)[1]
    np.testing.assert_allclose(alone.numpy(), together.numpy(), rtol=1e-6)
    np.testing.assert_allclose(shuffled.numpy(), together[order].numpy(), rtol=1e-6)
    np.testing.assert_allclose(split.numpy(), together.numpy(), rtol=1e-6)
    assert (other_seed - together).abs().max() > 1e-4  # the masks matter at this tolerance
    torch.testing.assert_close(masks, keep_masks(0, 10, serfiq.units, 0.5).float() * 2, rtol=0, atol=0)


def test_fc_located_on_demo_encoder_and_override(demo_dir):
    net = load_backbone("onnx", demo_dir / "encoder.onnx").eval()
    serfiq = SerFiq(net, 112, m=4)
    assert "gemm" in serfiq.layer.lower() and serfiq.units == 48 * 7 * 7
    with pytest.raises(TransfiraError, match="is not a node of the graph") as err:
        SerFiq(net, 112, m=4, layer=serfiq.layer + "x")
    assert serfiq.layer in str(err.value)  # suggested
    # an override inside the residual block: the layers after it also read the skip branch
    inner = [n.name for n in net.graph.nodes if n.op == "call_module" and "Conv" in type(
        net.get_submodule(n.target)).__name__][3]
    with pytest.raises(TransfiraError, match="cannot split the encoder"):
        SerFiq(net, 112, m=4, layer=inner)


def test_no_fc_clear_error(onnx_models):
    root, _ = onnx_models
    net = load_backbone("onnx", root / "no_fc.onnx").eval()
    with pytest.raises(TransfiraError, match=r"cannot locate the last fully connected layer.*candidates") as err:
        SerFiq(net, 112, m=4, source="no_fc.onnx")
    assert "\n" not in str(err.value) and "[quality.serfiq] layer" in str(err.value)


EXPECTED_FC = {  # model -> (node whose input gets the dropout, units dropped)
    "mobilefacenet_arcface.onnx": ("logits_separable_conv2d_conv", 512 * 7 * 7),  # 7x7 dw + 1x1 + 1x1 convs
    "w600k_mbf.onnx": ("gemm_96", 64 * 7 * 7),
    "mobileface_v3.onnx": ("dense_kernel_gemm", 128 * 4 * 4),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", list(EXPECTED_FC))
def test_fc_located_on_shared_models(name):
    if not (MODELS / name).is_file():
        pytest.skip(f"needs {MODELS / name}")
    net = load_backbone("onnx", MODELS / name).eval()
    serfiq = SerFiq(net, 112, m=4)
    assert (serfiq.layer, serfiq.units) == EXPECTED_FC[name]
    assert serfiq.fold == (name == "mobilefacenet_arcface.onnx")  # its head starts with a global depthwise conv
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        embedding, q = serfiq(images)
        np.testing.assert_allclose(embedding.numpy(), net(images).numpy(), rtol=1e-5, atol=1e-5)
        serfiq.fold = False
        np.testing.assert_allclose(serfiq(images)[1].numpy(), q.numpy(), rtol=1e-5)
    assert ((q > 0) & (q <= 1)).all()


def test_norm_cr_minmax():
    features = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    features[2] = np.nan
    norms = embedding_norm(features)
    expected = np.sqrt((features.astype(np.float64) ** 2).sum(1))
    np.testing.assert_allclose(norms[[0, 1, 3, 4, 5]], expected[[0, 1, 3, 4, 5]], rtol=1e-6)
    assert np.isnan(norms[2])
    ccs, ccas = np.array([0.8, 0.2, -0.1]), np.array([0.5, -0.3, -0.4])
    np.testing.assert_allclose(certainty_ratio(ccs, ccas), [0.8 / 1.3, 0.2 / 1.5, -0.1 / 1.3], rtol=1e-8)
    np.testing.assert_allclose(minmax(np.array([2.0, np.nan, 4.0, 3.0])), [0, np.nan, 1, 0.5])
    np.testing.assert_array_equal(minmax(np.array([5.0, 5.0])), [1, 1])


def test_external_scores_and_errors(tmp_path):
    paths = ["a.png", "b.png", "c.png"]
    spec = {"csv": str(tmp_path / "ext.csv"), "column": "q", "path_column": ""}
    pd.DataFrame({"path": ["c.png", "x.png", "a.png", "b.png"], "q": [3, np.nan, 1, 2]}).to_csv(spec["csv"],
                                                                                                 index=False)
    np.testing.assert_array_equal(external_scores("mag", spec, paths, "path"), [1, 2, 3])  # x.png's NaN unused
    pd.DataFrame({"file": paths, "q": [1, 2, 3]}).to_csv(tmp_path / "other.csv", index=False)
    custom = {**spec, "csv": str(tmp_path / "other.csv"), "path_column": "file"}
    np.testing.assert_array_equal(external_scores("mag", custom, paths, "path"), [1, 2, 3])
    cases = {
        "missing_path": (pd.DataFrame({"path": ["a.png", "c.png"], "q": [1, 2]}), r"no row for test image 'b\.png'"),
        "nan": (pd.DataFrame({"path": paths, "q": [1, np.nan, 3]}), r"non-finite 'q' for test image 'b\.png' \(row 2"),
        "text": (pd.DataFrame({"path": paths, "q": ["1", "2", "bad"]}), r"for test image 'c\.png' \(row 3"),
        "column": (pd.DataFrame({"path": paths, "quality": [1, 2, 3]}), r"no column 'q' for score 'mag'"),
        "duplicate": (pd.DataFrame({"path": paths + ["a.png"], "q": [1, 2, 3, 4]}), r"'a\.png' appears more than once"),
    }
    for case, (frame, pattern) in cases.items():
        frame.to_csv(spec["csv"], index=False)
        with pytest.raises(TransfiraError, match=pattern) as err:
            external_scores("mag", spec, paths, "path")
        assert "\n" not in str(err.value) and "ext.csv" in str(err.value), case


def hand_weighted_mean(features, ids, weights):
    """Per template: sum(max(w, 0) z) / sum(max(w, 0)); the plain mean where that sum <= WEIGHT_EPS."""
    out = {}
    for t in sorted(set(ids)):
        rows = [i for i in range(len(ids)) if ids[i] == t]
        w = np.array([max(weights[i], 0.0) for i in rows])
        z = features[rows].astype(np.float64)
        out[t] = (w[:, None] * z).sum(0) / w.sum() if w.sum() > WEIGHT_EPS else z.mean(0)
    return out


def test_score_templates_vs_hand_computation():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(9, 4)).astype(np.float32)
    ids = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3])
    scores = {"s": np.array([0.5, -0.2, 1.5, -1.0, -0.5, 2.0, 0.1, 0.0, 3.0])}  # template 2: all <= 0
    for rescale in ("none", "minmax"):
        (tids, vectors, summary), = score_templates(features, ids, scores, rescale).values()
        weights = scores["s"] if rescale == "none" else (scores["s"] + 1) / 4
        expected = hand_weighted_mean(features, ids, weights)
        np.testing.assert_array_equal(tids, [1, 2, 3])
        np.testing.assert_allclose(vectors, np.stack([expected[t] for t in tids]), rtol=1e-5, atol=1e-6)
        assert summary["weight_fallback"].tolist() == ([False, True, False] if rescale == "none"
                                                       else [False, False, False])
    # minmax gives the lowest image weight 0: template 2 then weights only its -0.5 image
    (_, vectors, _), = score_templates(features, ids, scores, "minmax").values()
    np.testing.assert_allclose(vectors[1], features[4], rtol=1e-6)


def test_quality_config_validation():
    def parse(quality):
        return apply_schema({"embedding_size": 8, "data": {"annotations": "x.csv"}, "quality": quality},
                            TEST_SCHEMA, "t.toml")["quality"]

    assert score_names(parse({})) == []
    q = parse({"scores": ["cr", "norm"], "external": {"magface": {"csv": "m.csv", "column": "q"}}})
    assert score_names(q) == ["cr", "norm", "magface"] and q["serfiq"]["m"] == 100 and q["serfiq"]["p"] == 0.5
    bad = [({"scores": ["serfiqq"]}, "did you mean 'serfiq'"), ({"rescale": "max"}, "rescale must be one of"),
           ({"scores": ["serfiq"], "serfiq": {"m": 1}}, "m must be an integer >= 2"),
           ({"scores": ["norm", "norm"]}, "listed twice"), ({"scores": "norm"}, "must be a list"),
           ({"external": {"ccs": {"csv": "a.csv", "column": "q"}}}, "choose another name")]
    for quality, message in bad:
        with pytest.raises(TransfiraError, match=message):
            score_names(parse(quality))
    for quality, message in [({"serfiq": {"mm": 3}}, "did you mean 'm'"), ({"rescal": "minmax"}, "did you mean"),
                             ({"external": {"x": {"csv": "a.csv"}}}, "missing required key 'column'")]:
        with pytest.raises(TransfiraError, match=message):
            parse(quality)


def test_flip_test_features_same_with_serfiq(demo_dir):
    """With the flip test on, the split encoder (SER-FIQ enabled) gives the same f(x) + f(mirror x)."""
    from transfira.networks import EncoderAndPredictor, FlipTest

    net = load_backbone("onnx", demo_dir / "encoder.onnx").eval()
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        plain = EncoderAndPredictor(FlipTest(net), None)(images)[0]
        split = EncoderAndPredictor(FlipTest(net), None, SerFiq(net, 112, m=4))(images)
        expected = net(images) + net(torch.flip(images, dims=[-1]))
    np.testing.assert_allclose(plain.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(split[0].numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    assert split[1].shape == (3,)


def test_serfiq_in_test_pass_ignores_path_and_batch_split(demo_dir, tmp_path):
    """test.py's pass: an image copied under another name gets its original's score (the masks do
    not depend on the path), and another batch size splits the rows differently, same scores."""
    from transfira.networks import embed_and_score

    frame = pd.read_csv(demo_dir / "test.csv").iloc[:5]
    (tmp_path / "images").mkdir()
    for path in frame.path:
        (tmp_path / "images" / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_dir / "images" / path, tmp_path / "images" / path)
    shutil.copy(demo_dir / "images" / frame.path[1], tmp_path / "images" / "copy_of_1.png")
    frame = pd.concat([frame, pd.DataFrame({"path": ["copy_of_1.png"]})], ignore_index=True)
    frame.to_csv(tmp_path / "test.csv", index=False)
    scores = []
    for batch in (6, 4, 1):
        cfg = apply_schema({"model_path": str(demo_dir / "encoder.onnx"), "embedding_size": 64, "num_workers": 0,
                            "device": "cpu", "outdir": str(tmp_path / f"out{batch}"), "batch_size": batch,
                            "data": {"data_dir": str(tmp_path / "images"), "annotations": str(tmp_path / "test.csv")},
                            "quality": {"scores": ["serfiq"], "serfiq": {"m": 6, "seed": 2}}}, TEST_SCHEMA, "t")
        scores.append(np.array(embed_and_score(cfg, frame, False, False, serfiq=True)[3]))
    q = scores[0]
    assert q[5] == q[1] and np.ptp(q[:5]) > 1e-4  # bit-identical copy; the other images differ
    for other in scores[1:]:
        np.testing.assert_allclose(other, q, rtol=1e-6)
