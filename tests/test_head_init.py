"""The optional ridge warm start of the linear heads, against a float64 numpy solution."""
import numpy as np
import torch

from transfira.distributed import DistInfo
from transfira.model import RecognizabilityPredictionNetwork
from transfira.training import ridge_init_heads


class Pixels(torch.utils.data.Dataset):
    def __init__(self, images, targets, ok):
        self.images, self.targets, self.ok = images, targets, ok

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "target": self.targets[i], "ok": self.ok[i], "index": i, "error": ""}


def test_ridge_heads_match_numpy():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(70, 2, 3, 3)).astype(np.float32))
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(18, 6))
    targets = torch.from_numpy(rng.normal(size=(70, 2)).astype(np.float32))
    ok = np.ones(70, bool)
    ok[[3, 40]] = False  # unreadable images are left out of the fit
    model = RecognizabilityPredictionNetwork(backbone, 6)
    ridge_init_heads(model, Pixels(images, targets, torch.from_numpy(ok)), 16, 0, DistInfo(), l2=0.01)

    with torch.no_grad():
        z = backbone(images).double().numpy()[ok]
    x = np.hstack([z, np.ones((len(z), 1))])
    penalty = 0.01 * (z ** 2).sum()
    reg = np.diag(np.r_[np.full(6, penalty), 0.0])
    w = np.linalg.solve(x.T @ x + reg, x.T @ targets.double().numpy()[ok])
    np.testing.assert_allclose(model.ccs_layer.weight.detach().numpy()[0], w[:6, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.ccas_layer.bias.detach().numpy()[0], w[6, 1], rtol=1e-5, atol=1e-6)
    assert model.backbone.training  # mode restored
