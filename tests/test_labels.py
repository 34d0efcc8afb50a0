"""Labels against an independent float64 numpy computation (paper eq. 2-6)."""
import numpy as np
import pytest

from transfira.errors import TransfiraError
from transfira.labels import center_similarities, certainty_ratio, class_centers


def reference_labels(features, ids, gallery_features=None, gallery_ids=None, normalize=False, leave_one_out=False):
    """Slow float64 loop: one identity and one image at a time, like the reference code."""
    f = np.asarray(features, np.float64)
    g_f = f if gallery_features is None else np.asarray(gallery_features, np.float64)
    g_ids = ids if gallery_ids is None else gallery_ids
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    centers = {}
    for c in sorted(set(g_ids)):
        members = [unit(x) if normalize else x for x, y in zip(g_f, g_ids) if y == c]
        centers[c] = (np.mean(members, axis=0), len(members))
    ccs, nnccs = [], []
    for x, y in zip(f, ids):
        mu, n = centers[y]
        if leave_one_out:
            mu = (n * mu - (unit(x) if normalize else x)) / (n - 1)
        ccs.append(unit(x) @ unit(mu))
        nnccs.append(max(unit(x) @ unit(m) for c, (m, _) in centers.items() if c != y))
    return np.array(ccs), np.array(nnccs), centers


def random_data(n=300, classes=17, dim=24, seed=0, string_ids=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, classes, n)
    ids[:classes] = np.arange(classes)  # every identity present
    ids[-1] = classes  # an identity with a single image
    means = rng.normal(size=(classes + 1, dim)) * 3
    features = (means[ids] + rng.normal(size=(n, dim))).astype(np.float32)
    if string_ids:
        ids = np.array([f"person_{i:03d}" for i in ids])
    return features, ids


@pytest.mark.parametrize("string_ids", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_labels_match_float64_reference(string_ids, normalize, chunk_size):
    features, ids = random_data(string_ids=string_ids)
    center_ids, centers = class_centers(features, ids, normalize=normalize, chunk_size=chunk_size)
    ccs, nnccs = center_similarities(features, ids, center_ids, centers, chunk_size=chunk_size)
    ref_ccs, ref_nnccs, ref_centers = reference_labels(features, ids, normalize=normalize)
    assert list(center_ids) == sorted(ref_centers)
    np.testing.assert_allclose(centers, np.stack([ref_centers[c][0] for c in center_ids]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ccs, ref_ccs, atol=2e-6)
    np.testing.assert_allclose(nnccs, ref_nnccs, atol=2e-6)
    assert ccs.dtype == nnccs.dtype == np.float32
    single = ids == ids[-1]
    np.testing.assert_allclose(ccs[single], 1.0, atol=1e-6)  # one image: it is its own center


def test_gallery_probe_mode():
    features, ids = random_data(n=400, seed=1, string_ids=True)
    gallery, probes = np.arange(400) % 3 == 0, np.arange(400) % 3 != 0
    keep = np.isin(ids, ids[gallery])
    probes &= keep
    center_ids, centers = class_centers(features[gallery], ids[gallery])
    ccs, nnccs = center_similarities(features[probes], ids[probes], center_ids, centers)
    ref_ccs, ref_nnccs, _ = reference_labels(features[probes], ids[probes], features[gallery], ids[gallery])
    np.testing.assert_allclose(ccs, ref_ccs, atol=2e-6)
    np.testing.assert_allclose(nnccs, ref_nnccs, atol=2e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out(normalize):
    features, ids = random_data(seed=2)
    keep = ids != ids[-1]  # leave-one-out needs two images per identity
    features, ids = features[keep], ids[keep]
    center_ids, centers = class_centers(features, ids, normalize=normalize)
    counts = np.bincount(np.searchsorted(center_ids, ids))
    ccs, nnccs = center_similarities(features, ids, center_ids, centers, leave_one_out=True, counts=counts,
                                     normalize=normalize, chunk_size=11)
    ref_ccs, ref_nnccs, _ = reference_labels(features, ids, normalize=normalize, leave_one_out=True)
    np.testing.assert_allclose(ccs, ref_ccs, atol=1e-5)
    np.testing.assert_allclose(nnccs, ref_nnccs, atol=2e-6)


def test_certainty_ratio():
    ccs, nnccs = np.array([0.9, 0.2]), np.array([0.1, -0.5])
    np.testing.assert_allclose(certainty_ratio(ccs, nnccs), ccs / (nnccs + 1 + 1e-9), rtol=1e-6)


def test_errors_single_identity_and_missing_probe_identity():
    features = np.ones((3, 4), np.float32)
    center_ids, centers = class_centers(features, np.array([5, 5, 5]))
    with pytest.raises(TransfiraError, match="at least two identities"):
        center_similarities(features, np.array([5, 5, 5]), center_ids, centers)
    with pytest.raises(TransfiraError, match="2 identity.*no class center: b, c"):
        center_similarities(features, np.array(["a", "b", "c"]), np.array(["a", "x"]), np.ones((2, 4)))
    with pytest.raises(TransfiraError, match="one: 7"):
        center_similarities(features, np.array([5, 5, 7]), np.array([5, 7]), np.ones((2, 4)),
                            leave_one_out=True, counts=np.array([2, 1]))
