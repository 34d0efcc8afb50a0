"""evaluate.py and transfira.evaluation against brute-force computations."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from transfira import evaluation as ev
from transfira.errors import TransfiraError
from transfira.jobs.evaluate import load_evaluate_config, run
from transfira.io import save_id_vectors

ROOT = Path(__file__).resolve().parents[1]
FMRS = [1e-1, 1e-2, 1e-3, 1e-6]


def brute_tar(genuine, impostor, fmr):
    """SPEC section 6 literally: k-th highest impostor score, genuine strictly above."""
    k = math.floor(round(fmr * len(impostor), 6))
    if k == 0:
        return math.nan
    thr = sorted(impostor, reverse=True)[k - 1]
    return sum(g > thr for g in genuine) / len(genuine)


def brute_pairs(x, subjects, probes=None, probe_subjects=None):
    """All scores in float64 numpy: (genuine scores, genuine index pairs, impostor scores)."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    if probes is None:
        i, j = np.triu_indices(len(x), 1)
        s = (xn @ xn.T)[i, j]
        same = subjects[i] == subjects[j]
    else:
        pn = probes / np.linalg.norm(probes, axis=1, keepdims=True)
        i, j = np.indices((len(x), len(probes))).reshape(2, -1)
        s = (xn @ pn.T).reshape(-1)
        same = subjects[i] == probe_subjects[j]
    return s[same], np.stack([i, j], 1)[same], s[~same]


def test_tar_at_fmr_ties_and_unmeasurable():
    impostor = np.array([0.9, 0.8, 0.8, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    genuine = np.array([0.95, 0.8, 0.8, 0.85, 0.3])
    fmrs = [0.3, 0.2, 0.1, 0.05]  # k = 3, 2, 1, 0
    got = ev.tar_at_fmr(genuine, np.sort(impostor)[::-1], len(impostor), fmrs)
    np.testing.assert_allclose(got[:3], [0.4, 0.4, 0.2])  # 0.8 ties at the threshold do not count
    assert np.isnan(got[3])
    rng = np.random.default_rng(0)
    for _ in range(20):  # heavy ties: scores on a coarse grid
        imp = rng.integers(0, 30, rng.integers(1, 400)) / 30
        gen = rng.integers(0, 30, rng.integers(1, 50)) / 30
        fmrs = [0.5, 0.1, 0.01, 1e-3]
        got = ev.tar_at_fmr(gen, np.sort(imp)[::-1], len(imp), fmrs)
        np.testing.assert_equal(got, [brute_tar(gen, imp, f) for f in fmrs])


def test_fmr_count_is_robust_to_float_representation():
    assert ev.n_at_fmr(1e-3, 1000) == 1
    assert ev.n_at_fmr(1e-4, 30000) == 3
    assert ev.n_at_fmr(1e-6, 999_999) == 0


@pytest.mark.parametrize("chunk", [13, 50, 1000])
@pytest.mark.parametrize("cross", [False, True])
def test_all_vs_all_equals_brute_force(chunk, cross):
    rng = np.random.default_rng(1)
    x, subj = rng.normal(size=(230, 8)), rng.integers(0, 25, 230)
    kw = dict(probe_features=rng.normal(size=(90, 8)), probe_subjects=rng.integers(10, 40, 90)) if cross else {}
    gen, gen_idx, imp = brute_pairs(x, subj, kw.get("probe_features"), kw.get("probe_subjects"))
    st = ev.all_vs_all_scores(x, subj, FMRS, chunk, dtype=torch.float64, **kw)
    order = np.lexsort(st.genuine_pairs.T[::-1])
    np.testing.assert_array_equal(st.genuine_pairs[order], gen_idx)
    np.testing.assert_allclose(st.genuine[order], gen, atol=1e-12)
    assert st.n_impostor == len(imp) and st.impostor_hist.sum() == len(imp)
    k = ev.k_needed(FMRS, len(imp))
    np.testing.assert_allclose(st.impostor_top, np.sort(imp)[::-1][:k], atol=1e-12)
    np.testing.assert_equal(ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, FMRS),
                            [brute_tar(gen, imp, f) for f in FMRS])
    np.testing.assert_array_equal(st.impostor_hist, np.histogram(imp, ev.HIST_BINS, (-1, 1))[0])


def test_float32_default_and_roc():
    rng = np.random.default_rng(2)
    x, subj = rng.normal(size=(300, 16)).astype(np.float32), rng.integers(0, 30, 300)
    gen, _, imp = brute_pairs(x.astype(np.float64), subj)
    st = ev.all_vs_all_scores(x, subj, FMRS, 64)
    np.testing.assert_allclose(np.sort(st.genuine), np.sort(gen), atol=1e-5)
    fmr, tar = ev.roc_curve(st)
    assert np.all(np.diff(fmr) >= 0) and np.all(np.diff(tar) >= -1e-12)
    assert fmr[0] == 1 / len(imp) and math.isclose(fmr[-1], 1.0)


def test_pair_list_scores():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(40, 8))
    ia, ib, lab = rng.integers(0, 40, 500), rng.integers(0, 40, 500), rng.random(500) < 0.2
    s = ev.pair_scores(v, v, ia, ib, chunk_size=64, dtype=torch.float64)
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(s, (vn[ia] * vn[ib]).sum(1), atol=1e-12)
    st = ev.stats_from_scores(s, lab, [0.1, 0.01])
    np.testing.assert_equal(ev.tar_at_fmr(st.genuine, st.impostor_top, st.n_impostor, [0.1, 0.01]),
                            [brute_tar(s[lab], s[~lab], f) for f in [0.1, 0.01]])


def test_erc_against_rejection_loop():
    rng = np.random.default_rng(4)
    n = 120
    q = rng.integers(0, 15, n) / 15  # ties in quality
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.05])
    fnm = rng.random(len(pairs)) < 0.3
    frac, fnmr = ev.erc_curve(q, pairs, fnm, 0.9)
    assert len(frac) == math.floor(0.9 * n) + 1 and frac[0] == 0
    for m in range(len(frac)):
        cut = np.sort(q)[m]  # discard images below the (m+1)-th lowest quality
        kept = [p for p, (a, b) in enumerate(pairs) if q[a] >= cut and q[b] >= cut]
        want = fnm[kept].mean() if kept else np.nan
        np.testing.assert_allclose(fnmr[m], want, atol=1e-12)
    # step integral by brute force on a fine grid
    for upto in (0.2, 0.9):
        xs = (np.arange(200_000) + 0.5) / 200_000 * upto
        assert math.isclose(ev.erc_area(frac, fnmr, n, upto), fnmr[np.floor(xs * n).astype(int)].mean() * upto,
                            rel_tol=1e-3)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(5)
    for x, y in [(rng.normal(size=200), rng.normal(size=200)), (rng.integers(0, 5, 300), rng.integers(0, 7, 300))]:
        assert math.isclose(ev.spearman(x, y), scipy.stats.spearmanr(x, y)[0], abs_tol=1e-12)
    assert math.isnan(ev.spearman(np.ones(5), np.arange(5)))


# --- end to end -----------------------------------------------------------------------------


def make_inputs(tmp: Path, n_templates: int = 120, n_images: int = 150) -> dict[str, Path]:
    """Templates of 30 subjects (4 variants, better ones less noisy), a subjects CSV, a pair list,
    and an image set with labels, features and predicted scores."""
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(30, 32))
    subj = np.arange(n_templates) % 30
    ids = np.array([f"t{i:03d}" for i in range(n_templates)])
    for noise, variant in zip([3.0, 2.5, 2.0, 1.5], ["baseline", "weight", "filter", "filter_weight"]):
        save_id_vectors(tmp / f"templates_{variant}.npz", ids, centers[subj] + noise * rng.normal(size=(n_templates, 32)))
    pd.DataFrame({"template_id": ids, "subject_id": subj}).to_csv(tmp / "subjects.csv", index=False)
    a, b = np.triu_indices(n_templates, 1)
    pd.DataFrame({"template_a": ids[a], "template_b": ids[b], "label": (subj[a] == subj[b]).astype(int)}).to_csv(
        tmp / "pairs.csv", index=False)
    isub = np.arange(n_images) % 30
    noise = rng.uniform(0.5, 4, n_images)
    feats = centers[isub] + noise[:, None] * rng.normal(size=(n_images, 32))
    ccs = -noise / 4 + 0.05 * rng.normal(size=n_images)
    pd.DataFrame({"path": [f"img{i}.jpg" for i in range(n_images)], "subject_id": isub, "ccs": ccs,
                  "nnccs": 0.1, "ccas": ccs - 0.1, "serfiq": rng.random(n_images)}).to_csv(tmp / "labels.csv", index=False)
    np.save(tmp / "feats.npy", feats.astype(np.float32))
    np.save(tmp / "pred_ccs.npy", (ccs + 0.1 * rng.normal(size=n_images)).astype(np.float32))
    np.save(tmp / "pred_ccas.npy", (ccs - 0.1 + 0.1 * rng.normal(size=n_images)).astype(np.float32))
    return {"dir": tmp}


def write_config(tmp: Path, pairs: str, images: bool = True, extra: str = "", outdir: str = "out") -> Path:
    variants = "\n".join(f"{v} = '{tmp}/templates_{v}.npz'" for v in ["baseline", "weight", "filter", "filter_weight"])
    img = (f"[images]\nlabels = '{tmp}/labels.csv'\nfeatures = '{tmp}/feats.npy'\nccs = '{tmp}/pred_ccs.npy'\n"
           f"ccas = '{tmp}/pred_ccas.npy'\nquality_columns = ['serfiq']\nmax_discard = 0.6\n") if images else ""
    if "bootstrap" not in extra:
        extra += "\nbootstrap = 100"  # fewer replicates than the default 1000: CI time
    text = (f"outdir = '{tmp}/{outdir}'\nfmr = [1e-2, 1e-3, 1e-4, 1e-6]\nchunk_size = 40\n{extra}\n"
            f"[templates]\n{variants}\n[pairs]\n{pairs}\n{img}")
    path = tmp / "evaluate.toml"
    path.write_text(text)
    return path


def run_script(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_end_to_end_all_vs_all(tmp_path):
    make_inputs(tmp_path)
    proc = run_script(write_config(tmp_path, f"subjects = '{tmp_path}/subjects.csv'"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    for name in ["results.md", "results.csv", "roc.png", "image_results.csv", "erc_fmr1e-2.png", "erc_fmr1e-3.png"]:
        assert (out / name).stat().st_size > 0, name
    res = pd.read_csv(out / "results.csv")
    assert list(res.columns[:3]) == ["variant", "fmr", "tar"] and len(res) == 16
    assert res.tar[res.fmr == 1e-6].isna().all() and res.tar[res.fmr == 1e-2].notna().all()  # 7080 impostors
    md = (out / "results.md").read_text()
    assert "| filter_weight |" in md and "n/a" in md
    tar = res.set_index(["variant", "fmr"]).tar
    assert tar["filter_weight", 1e-2] > tar["baseline", 1e-2]
    img = pd.read_csv(out / "image_results.csv")
    assert set(img.measure) == {"predicted CCS", "predicted CCAS", "serfiq", "ideal (true CCS)"}
    row = img[(img.measure == "predicted CCS") & (img.fmr == 1e-2)].iloc[0]
    assert row.sc > 0.5 and 0 <= row.edc_pauc20 <= 0.2 and row.erc_auc > row.edc_pauc20
    assert img.erc_auc[img.fmr == 1e-6].isna().all()


def test_pair_list_mode_matches_all_vs_all(tmp_path):
    make_inputs(tmp_path)
    for mode, pairs in [("list", f"path = '{tmp_path}/pairs.csv'"), ("all", f"subjects = '{tmp_path}/subjects.csv'")]:
        run(load_evaluate_config(write_config(tmp_path, pairs, images=False, outdir=mode)))
    a, b = pd.read_csv(tmp_path / "list" / "results.csv"), pd.read_csv(tmp_path / "all" / "results.csv")
    pd.testing.assert_series_equal(a.tar, b.tar)


def test_bad_input_cli(tmp_path):
    """One-line 'error: ...' on stderr, non-zero exit, naming the file and the missing column."""
    make_inputs(tmp_path)
    pd.read_csv(tmp_path / "pairs.csv").drop(columns="label").to_csv(tmp_path / "pairs.csv", index=False)
    proc = run_script(write_config(tmp_path, f"path = '{tmp_path}/pairs.csv'", images=False))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pairs.csv" in lines[0]
    assert "missing column(s) 'label'; columns present: template_a, template_b" in lines[0]


def test_missing_template_ids(tmp_path):
    make_inputs(tmp_path)
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    pairs.loc[3, "template_b"] = "nobody"
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    cfg = load_evaluate_config(write_config(tmp_path, f"path = '{tmp_path}/pairs.csv'", images=False))
    pattern = r"templates_baseline.npz: template id\(s\) from .*pairs.csv not in the file, e.g. nobody \(row\(s\) 4\)"
    with pytest.raises(TransfiraError, match=pattern):
        run(cfg)


@pytest.mark.parametrize("pairs, edit, pattern", [
    ("subjects", lambda d: d.assign(subject_id=np.arange(len(d))), "0 genuine"),
    ("subjects", lambda d: d.assign(subject_id=0), "0 impostor"),
    ("path", lambda d: d.iloc[:0], "no rows"),
    ("path", lambda d: d.assign(label=2), "column 'label' must be 1"),
    ("subjects", lambda d: d.rename(columns={"subject_id": "subject"}), "missing column(s) 'subject_id'"),
])
def test_bad_input_errors(tmp_path, pairs, edit, pattern):
    make_inputs(tmp_path)
    csv = tmp_path / ("subjects.csv" if pairs == "subjects" else "pairs.csv")
    edit(pd.read_csv(csv)).to_csv(csv, index=False)
    cfg = load_evaluate_config(write_config(tmp_path, f"{pairs} = '{csv}'", images=False))
    with pytest.raises(TransfiraError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        run(cfg)


def test_config_errors(tmp_path):
    make_inputs(tmp_path)
    with pytest.raises(TransfiraError, match="exactly one"):
        run(load_evaluate_config(write_config(tmp_path, "path = 'a.csv'\nsubjects = 'b.csv'", images=False)))
    with pytest.raises(TransfiraError, match="did you mean 'fmr'"):
        load_evaluate_config(write_config(tmp_path, "", extra="fmrs = [1e-3]"))
    cfg_path = write_config(tmp_path, f"subjects = '{tmp_path}/subjects.csv'")
    np.save(tmp_path / "pred_ccs.npy", np.zeros(3))
    with pytest.raises(TransfiraError, match="pred_ccs.npy: predicted ccs has shape"):
        run(load_evaluate_config(cfg_path))


def test_gallery_probe_mode(tmp_path):
    make_inputs(tmp_path)
    subj = pd.read_csv(tmp_path / "subjects.csv")
    subj.iloc[:60].to_csv(tmp_path / "gallery.csv", index=False)
    subj.iloc[60:].to_csv(tmp_path / "probes.csv", index=False)
    run(load_evaluate_config(write_config(
        tmp_path, f"gallery = '{tmp_path}/gallery.csv'\nprobes = '{tmp_path}/probes.csv'", images=False)))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "120 genuine, 3480 impostor" in md  # 60 x 60 pairs; 30 subjects with 2 gallery x 2 probes each


# --- intervals, score-weighted templates, quality scores, pair files, conventions -----------------


def test_nearest_fpr_convention_matches_sklearn():
    """InsightFace's IJB rule on sklearn's roc_curve, from the full scores; ours from the top only."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(11)
    fmrs = [0.1, 0.01, 0.003, 1e-4]
    for trial in range(60):
        ng, ni, grid = rng.integers(5, 200), rng.integers(50, 3000), [0, 10, 40][trial % 3]
        g, i = rng.normal(1, 1, ng), rng.normal(0, 1, ni)
        if grid:  # ties
            g, i = np.round(g * grid) / grid, np.round(i * grid) / grid
        fpr, tpr, _ = roc_curve(np.r_[np.ones(ng), np.zeros(ni)], np.r_[g, i])
        fpr, tpr = np.flipud(fpr), np.flipud(tpr)
        want = [tpr[min(zip(abs(fpr - f), range(len(fpr))))[1]] for f in fmrs]
        for k in [ni, int(2 * 0.1 * ni) + 40]:
            try:
                tar, _ = ev.nearest_fpr_tar(g, np.sort(i)[::-1][:k], ni, fmrs)
            except ev.NeedMoreImpostors:
                assert k < ni
                continue
            np.testing.assert_allclose(tar, want, atol=1e-12)


def quality_inputs(tmp: Path) -> None:
    """A score-weighted templates file and test.py's test_quality.csv (rows in another order)."""
    rng = np.random.default_rng(12)
    with np.load(tmp / "templates_filter.npz") as z:
        save_id_vectors(tmp / "templates_norm.npz", z["ids"], z["vectors"] + 0.1 * rng.normal(size=z["vectors"].shape))
    labels = pd.read_csv(tmp / "labels.csv")
    q = pd.DataFrame({"path": labels.path, "template_id": "t", "ccs": 0.0, "ccas": 0.0,
                      "norm": labels.ccs + 0.3 * rng.normal(size=len(labels)), "cr": rng.random(len(labels))})
    q.iloc[::-1].to_csv(tmp / "test_quality.csv", index=False)


def test_templates_dir_quality_scores_and_intervals(tmp_path):
    make_inputs(tmp_path)
    quality_inputs(tmp_path)
    cfg_path = write_config(tmp_path, f"subjects = '{tmp_path}/subjects.csv'", extra=(
        f"bootstrap = 300\nseed = 3\ntemplates_dir = '{tmp_path}'"))
    text = cfg_path.read_text().replace(
        "max_discard = 0.6", f"max_discard = 0.6\nquality_csv = '{tmp_path}/test_quality.csv'\nscores = ['norm', 'cr']")
    cfg_path.write_text(text)
    run(load_evaluate_config(cfg_path))
    out = tmp_path / "out"
    res = pd.read_csv(out / "results.csv")
    assert list(dict.fromkeys(res.variant)) == ["baseline", "weight", "filter", "filter_weight", "norm"]
    ok = res.tar.notna()
    assert (res.tar_lo[ok] <= res.tar[ok] + 1e-12).all() and (res.tar[ok] <= res.tar_hi[ok] + 1e-12).all()
    assert (res.tar_hi[ok] > res.tar_lo[ok]).any() and res.tar_lo[~ok].isna().all()
    base = res[res.variant == "baseline"].set_index("fmr")
    for v, sub in res.groupby("variant"):
        sub = sub.set_index("fmr")
        np.testing.assert_allclose(sub.delta, sub.tar - base.tar)
    assert (res[res.variant == "baseline"].delta_hi.fillna(0) == 0).all()
    md = (out / "results.md").read_text()
    assert "| norm |" in md and "Difference to baseline" in md
    assert any(c.count("[") == 1 and c.strip()[0].isdigit() for c in md.split("|"))  # '0.9839 [0.97, 0.99]'
    img = pd.read_csv(out / "image_results.csv")
    labels = pd.read_csv(tmp_path / "labels.csv")
    q = pd.read_csv(tmp_path / "test_quality.csv").set_index("path").loc[labels.path]
    row = img[(img.measure == "norm") & (img.fmr == 1e-2)].iloc[0]
    assert math.isclose(row.sc, scipy.stats.spearmanr(q.norm, labels.ccs)[0], abs_tol=1e-12)
    assert row.sc_lo <= row.sc <= row.sc_hi and row.erc_auc_lo <= row.erc_auc <= row.erc_auc_hi
    assert set(img.measure) >= {"norm", "cr", "predicted CCS", "ideal (true CCS)"}


def test_ijb_pair_file_streamed_in_chunks(tmp_path):
    """A space-separated IJB pair list read 97 rows at a time gives the TARs of the all-vs-all run."""
    make_inputs(tmp_path)
    pairs = pd.read_csv(tmp_path / "pairs.csv")
    pairs.to_csv(tmp_path / "ijb_pairs.txt", sep=" ", header=False, index=False)
    extra = "bootstrap = 50\nthreshold_convention = 'insightface'"
    for mode, spec in [("ijb", f"path = '{tmp_path}/ijb_pairs.txt'\nchunk_rows = 97"),
                       ("all", f"subjects = '{tmp_path}/subjects.csv'")]:
        run(load_evaluate_config(write_config(tmp_path, spec, images=False, outdir=mode, extra=extra)))
    a, b = pd.read_csv(tmp_path / "ijb" / "results.csv"), pd.read_csv(tmp_path / "all" / "results.csv")
    pd.testing.assert_series_equal(a.tar, b.tar, atol=1e-12)
    pd.testing.assert_series_equal(a.variant, b.variant)
    assert a.tar_lo.notna().sum() == b.tar_lo.notna().sum() > 0
    assert (a.convention == "insightface").sum() == 16 and a.variant.str.contains("InsightFace nearest-FPR").sum() == 16
    assert not list((tmp_path / "ijb").glob(".pairs-*"))  # the binary cache is removed


def test_truncated_templates_and_bad_pair_rows(tmp_path):
    make_inputs(tmp_path)
    data = (tmp_path / "templates_weight.npz").read_bytes()
    (tmp_path / "templates_weight.npz").write_bytes(data[: len(data) // 2])
    cfg = load_evaluate_config(write_config(tmp_path, f"subjects = '{tmp_path}/subjects.csv'", images=False,
                                            extra="bootstrap = 0"))
    with pytest.raises(TransfiraError, match=r"templates_weight.npz: cannot read \(truncated or corrupt"):
        run(cfg)
    (tmp_path / "pairs.txt").write_text("t000 t001 1\nt000 t002 0\nt001 t003 yes\n")
    cfg = load_evaluate_config(write_config(tmp_path, f"path = '{tmp_path}/pairs.txt'", images=False))
    with pytest.raises(TransfiraError, match=r"pairs.txt: column 'label' must be 1 .*'yes'.* row\(s\) 3"):
        run(cfg)


def test_bootstrap_off(tmp_path):
    make_inputs(tmp_path)
    run(load_evaluate_config(write_config(tmp_path, f"subjects = '{tmp_path}/subjects.csv'", images=False,
                                          extra="bootstrap = 0")))
    res = pd.read_csv(tmp_path / "out" / "results.csv")
    assert res.tar_lo.isna().all() and res.delta_lo.isna().all() and res.delta.notna().any()
    assert "[" not in (tmp_path / "out" / "results.md").read_text().split("## Template")[1].split("n/a:")[0]


def brute_erc_area(quality, genuine_ok, upto):
    """EDC of one genuine pair per image (the image's own quality), float64 loops: discard the m lowest
    images, FNMR over the rest; the step integral over [0, upto]."""
    n = len(quality)
    order = np.argsort(quality, kind="stable")
    area = 0.0
    for m in range(math.floor(0.6 * n) + 1):
        kept = quality >= quality[order[m]]
        width = max(0.0, min((m + 1) / n, upto) - m / n)
        if width:
            area += (1 - genuine_ok[kept].mean()) * width
    return area


def test_images_against_an_enrolment_set(tmp_path):
    """[images] enrolment_*: one genuine pair per image (its subject's enrolment photo); SC and the ERC
    areas equal a float64 brute force; the interval brackets the point."""
    rng = np.random.default_rng(7)
    subjects, n = 40, 200
    centers = rng.normal(size=(subjects, 32))
    enrol = centers + 0.3 * rng.normal(size=centers.shape)
    isub = rng.integers(0, subjects, n)
    noise = rng.uniform(0.3, 3, n)
    feats = centers[isub] + noise[:, None] * rng.normal(size=(n, 32))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sim = unit(feats) @ unit(enrol).T
    ccs = sim[np.arange(n), isub]
    other = sim.copy()
    other[np.arange(n), isub] = -np.inf
    pd.DataFrame({"path": [f"p{i}" for i in range(n)], "subject_id": isub, "ccs": ccs, "ccas": ccs - other.max(1),
                  "kind": rng.choice(["blur", "noise", "blur+noise"], n), "severity": rng.uniform(0, 1, n)}
                 ).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"subject_id": np.arange(subjects)}).to_csv(tmp_path / "enrol.csv", index=False)
    np.save(tmp_path / "feats.npy", feats.astype(np.float32))
    np.save(tmp_path / "enrol.npy", enrol.astype(np.float32))
    pred = -noise + 0.3 * rng.normal(size=n)
    np.save(tmp_path / "pred.npy", pred.astype(np.float32))
    (tmp_path / "e.toml").write_text(
        f"outdir = '{tmp_path}/out'\nfmr = [0.05]\nbootstrap = 200\n[images]\nlabels = '{tmp_path}/labels.csv'\n"
        f"features = '{tmp_path}/feats.npy'\nccs = '{tmp_path}/pred.npy'\nmax_discard = 0.6\n"
        f"enrolment_labels = '{tmp_path}/enrol.csv'\nenrolment_features = '{tmp_path}/enrol.npy'\n")
    run(load_evaluate_config(tmp_path / "e.toml"))
    img = pd.read_csv(tmp_path / "out" / "image_results.csv").set_index("measure")
    impostor = np.sort(sim[np.arange(subjects)[None, :] != isub[:, None]])[::-1]
    thr = impostor[math.floor(round(0.05 * impostor.size, 6)) - 1]
    genuine_ok = ccs > thr
    assert img.loc["predicted CCS", "threshold"] == pytest.approx(thr, abs=1e-5)
    assert img.loc["predicted CCS", "sc"] == pytest.approx(scipy.stats.spearmanr(pred.astype(np.float32), ccs)[0],
                                                           abs=1e-9)
    for name, q in [("predicted CCS", pred.astype(np.float32)), ("ideal (true CCS)", ccs)]:
        assert img.loc[name, "erc_auc"] == pytest.approx(brute_erc_area(q, genuine_ok, 0.6), abs=1e-9)
        assert img.loc[name, "edc_pauc20"] == pytest.approx(brute_erc_area(q, genuine_ok, 0.2), abs=1e-9)
        assert img.loc[name, "erc_auc_lo"] <= img.loc[name, "erc_auc"] <= img.loc[name, "erc_auc_hi"]
    assert "against 40 enrolment images" in (tmp_path / "out" / "results.md").read_text()


def test_cut_agreement_recut_and_breakdown(tmp_path):
    """[images] cut_agreement / recut / breakdown / bins against numpy: the 2 x 2 shares, the best cut by
    brute force over every candidate, SC per group ('a+b' counts in both) and per severity bin."""
    make_inputs(tmp_path)
    labels = pd.read_csv(tmp_path / "labels.csv")
    rng = np.random.default_rng(3)
    labels["kind"] = rng.choice(["blur", "noise", "blur+noise"], len(labels))
    labels["severity"] = rng.uniform(0, 1, len(labels))
    labels.to_csv(tmp_path / "labels.csv", index=False)
    config = write_config(tmp_path, f"subjects = '{tmp_path}/subjects.csv'", extra="compare_to = ['weight']")
    config.write_text(config.read_text() + "cut_agreement = true\nrecut = 30\nbreakdown = ['kind', 'severity']\n"
                      "[images.bins]\nseverity = [0, 0.5, 1]\n")
    run(load_evaluate_config(config))
    out = tmp_path / "out"
    pred, true = np.load(tmp_path / "pred_ccas.npy"), labels["ccas"].to_numpy()
    cuts = pd.read_csv(out / "cut_agreement.csv")
    row = cuts[(cuts.measure == "predicted CCAS") & (cuts.images == "all")].iloc[0]
    p, t = pred > 0, true > 0
    assert row.agree == pytest.approx(np.mean(p == t)) and row.pred_pos_true_neg == pytest.approx(np.mean(p & ~t))
    labelled = np.sort(np.random.default_rng(0).permutation(len(true))[:30])  # seed 0, as the config
    cand = np.concatenate([[0.0], np.sort(pred[labelled]), (np.sort(pred[labelled])[1:] + np.sort(pred[labelled])[:-1]) / 2])
    agree = np.array([np.mean((pred[labelled] > c) == (true[labelled] > 0)) for c in cand])
    best = cand[np.flatnonzero(agree == agree.max())]
    recut = cuts[cuts.images == "rest, recut"].iloc[0]
    assert recut.cut == pytest.approx(best[np.argmin(np.abs(best))]) and recut.n == len(true) - 30
    rest = np.setdiff1d(np.arange(len(true)), labelled)
    assert recut.agree == pytest.approx(np.mean((pred[rest] > recut.cut) == (true[rest] > 0)))
    table = pd.read_csv(out / "image_breakdown.csv").set_index(["column", "group"])
    q = np.load(tmp_path / "pred_ccs.npy")
    for group, rows in [("blur", labels.kind.str.contains("blur")), ("noise", labels.kind.str.contains("noise"))]:
        assert table.loc[("kind", group), "images"] == rows.sum()
        assert table.loc[("kind", group), "sc predicted CCS"] == pytest.approx(
            scipy.stats.spearmanr(q[rows], labels.ccs[rows])[0], abs=1e-9)
    high = labels.severity >= 0.5
    assert table.loc[("severity", "[0.5, 1]"), "images"] == high.sum()
    assert table.loc[("severity", "[0.5, 1]"), "true_ccas_le0"] == pytest.approx(np.mean(true[high] <= 0))
    res = pd.read_csv(out / "results.csv").set_index(["variant", "fmr"])
    assert res.loc[("filter", 1e-2), "delta_weight"] == pytest.approx(
        res.loc[("filter", 1e-2), "tar"] - res.loc[("weight", 1e-2), "tar"])
    assert res.loc[("filter", 1e-2), "delta_weight_lo"] <= res.loc[("filter", 1e-2), "delta_weight_hi"]
    md = (out / "results.md").read_text()
    assert "### Difference to weight" in md and "## Images by kind" in md and "Does the cut transfer?" in md


def test_best_cut_ties_go_towards_zero():
    assert ev.best_cut(np.array([-0.3, -0.1, 0.2, 0.4]), np.array([-1, -1, 1, 1])) == 0.0
    assert ev.best_cut(np.array([0.1, 0.2, 0.3, 0.4]), np.array([-1, -1, 1, 1])) == pytest.approx(0.2)  # 0.2 and 0.25 tie


def test_cut_agreement_and_best_cut_on_a_drifted_level():
    true = np.array([0.2, 0.1, -0.1, -0.3, 0.05, -0.02])
    pred = true + 0.15  # the level drifted up by 0.15
    a = ev.cut_agreement(pred, true)
    assert a["agree"] == pytest.approx(4 / 6) and a["pred_pos"] == 1 - 1 / 6
    assert sum(a[k] for k in ("both_pos", "pred_pos_true_neg", "pred_neg_true_pos", "both_neg")) == pytest.approx(1)
    cut = ev.best_cut(pred, true)
    assert ev.cut_agreement(pred, true, cut)["agree"] == 1.0 and 0.1 <= cut <= 0.2


def test_new_image_options_bad_values_name_the_key(tmp_path):
    """The enrolment / cut / breakdown options and compare_to: one-line errors naming the key, nothing written."""
    make_inputs(tmp_path)
    pairs = f"subjects = '{tmp_path}/subjects.csv'"
    for text, match in [("enrolment_labels = 'e.csv'\n", "enrolment_labels and enrolment_features go together"),
                        ("recut = -1\n", "recut must be an integer >= 0"),
                        ("[images.bins]\nseverity = [1, 0]\n", r"\[images.bins\] must map columns"),
                        ("ccas_scores = 'x'\n", "ccas_scores must be a list")]:
        config = write_config(tmp_path, pairs)
        config.write_text(config.read_text() + text)
        with pytest.raises(TransfiraError, match=match):
            load_evaluate_config(config)
    config = write_config(tmp_path, pairs, extra="compare_to = ['nobody']", outdir="bad")
    with pytest.raises(TransfiraError, match="compare_to: no template variant nobody"):
        run(load_evaluate_config(config))
    config = write_config(tmp_path, pairs, images=True, outdir="bad2")
    config.write_text(config.read_text() + "cut_agreement = true\nrecut = 100000\n")
    with pytest.raises(TransfiraError, match=r"\[images\] recut = 100000 leaves no image"):
        run(load_evaluate_config(config))
    assert not (tmp_path / "bad2" / "results.md").exists() and not (tmp_path / "bad" / "results.md").exists()
