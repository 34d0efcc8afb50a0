"""The networks a job runs on test images, and one pass of them over a table of images.

The deployed encoder (optionally with the flip test), the trained predictor, and both in one
module with SER-FIQ's stochastic passes (:class:`EncoderAndPredictor`), so each image is decoded
once; :func:`embed_and_score` streams their outputs into memory-mapped ``.npy`` files (test.py and
the IJB runner's features stage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .backbone import check_embedding_size, load_backbone, resolve_device
from .checkpoint import build_predictor
from .data import dataset_from_table
from .errors import TransfiraError
from .features import extract_outputs, write_skipped
from .io import file_fingerprint
from .progress import log
from .quality import SerFiq

FINGERPRINT_KEYS = ("model_path", "predictor_model_path", "checkpoint_path")  # a resumed pass needs the same files
FEATURES, CCS, CCAS, SKIPPED = "test_features.npy", "test_ccs.npy", "test_ccas.npy", "test_skipped.csv"
SERFIQ = "test_serfiq.npy"


def load_encoder(cfg: dict[str, Any], device: torch.device) -> nn.Module:
    """The deployed encoder (``model_path``), in eval mode on ``device``."""
    if not cfg["model_path"]:
        raise TransfiraError("model_path (the deployed encoder) is needed for --generate_features and SER-FIQ")
    encoder = load_backbone(cfg["backbone_type"], cfg["model_path"]).to(device).eval()
    check_embedding_size(encoder, cfg["embedding_size"], cfg["aug"]["crop_dim"], cfg["model_path"])
    return FlipTest(encoder) if cfg.get("flip_test") else encoder


class FlipTest(nn.Module):
    """``f(x) + f(mirror of x)``: the flip test (InsightFace's IJB mode F2). The mirror of the
    normalized tensor is the normalized mirror image (the normalization is per channel)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images) + self.encoder(torch.flip(images, dims=[-1]))


def load_predictor(cfg: dict[str, Any], device: torch.device) -> nn.Module:
    """The predictor: architecture from ``predictor_model_path`` (default ``model_path``), weights from
    ``checkpoint_path`` (``weights_only=True``; the released checkpoint layout loads unchanged). The
    heads' layout is read from the checkpoint (``head_hidden`` is no longer needed)."""
    checkpoint = cfg["checkpoint_path"]
    if not checkpoint:
        raise TransfiraError("checkpoint_path (the trained predictor) is needed for --predict_scores")
    if not Path(checkpoint).is_file():
        raise TransfiraError(f"predictor checkpoint not found: {checkpoint} (checkpoint_path)")
    arch = cfg["predictor_model_path"] or cfg["model_path"]
    if not arch:
        raise TransfiraError("set predictor_model_path or model_path: the ONNX encoder the predictor was trained from")
    backbone = load_backbone(cfg["backbone_type"], arch)
    check_embedding_size(backbone, cfg["embedding_size"], cfg["aug"]["crop_dim"], arch)
    return build_predictor(backbone, cfg["embedding_size"], checkpoint).to(device).eval()


class EncoderAndPredictor(nn.Module):
    """Both test-time networks on the same batch: ``(features, ccs, ccas, serfiq)``, each part optional.

    With ``serfiq`` (the deployed encoder split at its last fully connected layer) the
    layers before the split run once: the features and the m stochastic passes share them.
    """

    def __init__(self, encoder: nn.Module | None, predictor: nn.Module | None, serfiq: SerFiq | None = None,
                 embed: bool = True):
        super().__init__()
        self.encoder = encoder if serfiq is None and embed else None
        # flip test with SER-FIQ: the split encoder gives f(x), the plain one f(mirror of x)
        self.mirror = encoder.encoder if serfiq is not None and isinstance(encoder, FlipTest) else None
        self.predictor, self.serfiq, self.embed = predictor, serfiq, embed

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: tuple[torch.Tensor, ...] = ()
        if self.serfiq is not None:
            x = self.serfiq.prefix(images)
            if self.embed:
                features = self.serfiq.suffix(x)
                out += (features + self.mirror(torch.flip(images, dims=[-1])) if self.mirror is not None else features,)
        elif self.encoder is not None:
            out += (self.encoder(images),)
        out += tuple(self.predictor(images)) if self.predictor is not None else ()
        return out + ((self.serfiq.scores(x),) if self.serfiq is not None else ())


def embed_and_score(cfg: dict[str, Any], frame: pd.DataFrame, features: bool, scores: bool, serfiq: bool = False,
                    device: torch.device | None = None) -> tuple[np.ndarray | None, ...]:
    """One pass over the test images: encoder features [N, D], predicted CCS, CCAS [N], SER-FIQ [N].

    Writes ``test_features.npy``, ``test_ccs.npy``, ``test_ccas.npy``, ``test_serfiq.npy``
    (streamed through memmaps; an interrupted run resumes) and, for skipped images,
    ``test_skipped.csv``. SER-FIQ runs the deployed encoder even without ``features``.
    Rows of skipped images are NaN. Returns ``(features, ccs, ccas, serfiq)`` (None where not computed;
    all None on ranks other than 0 under torchrun). ``device``: this rank's (default: ``cfg["device"]``).

    ``cfg`` holds test.py's keys (:data:`transfira.jobs.test.SCHEMA`) that the pass reads:
    ``backbone_type``, ``model_path``, ``predictor_model_path``, ``checkpoint_path``,
    ``embedding_size``, ``device``, ``batch_size``, ``num_workers``, ``on_bad_image``, ``outdir``,
    ``flip_test``, ``[aug]``, ``[data]`` (``data_dir``, ``annotations``, ``path_col_name``,
    ``landmark_columns``, ``batch_size``) and, with ``serfiq``, ``[quality.serfiq]``.
    """
    device = device or resolve_device(cfg["device"])
    data, outdir = cfg["data"], Path(cfg["outdir"])
    outputs = {}
    if features:
        outputs["embedding"] = (outdir / FEATURES, cfg["embedding_size"])
    if scores:
        outputs.update({"predicted CCS": (outdir / CCS, 0), "predicted CCAS": (outdir / CCAS, 0)})
    fingerprint = [file_fingerprint(cfg[k]) for k in FINGERPRINT_KEYS] + [cfg["aug"], data["landmark_columns"]]
    fingerprint += [{"flip_test": True}] if cfg.get("flip_test") else []
    encoder = load_encoder(cfg, device) if features or serfiq else None
    head = None
    if serfiq:
        s = cfg["quality"]["serfiq"]
        plain = encoder.encoder if isinstance(encoder, FlipTest) else encoder  # SER-FIQ: one view
        head = SerFiq(plain, cfg["aug"]["crop_dim"], s["m"], s["p"], s["seed"], s["layer"], s["batch"],
                      cfg["model_path"])
        outputs["SER-FIQ"] = (outdir / SERFIQ, 0)
        # "masks": a partial pass of the former per-image masks is not resumed
        fingerprint.append({"serfiq": {k: s[k] for k in ("m", "p", "seed")}, "layer": head.layer,
                            "masks": "shared"})
    model = EncoderAndPredictor(encoder, load_predictor(cfg, device) if scores else None, head,
                                embed=features).to(device)
    dataset = dataset_from_table(frame, data, cfg["aug"], data["annotations"])
    arrays, skipped = extract_outputs(model, dataset, outputs, data["batch_size"] or cfg["batch_size"],
                                      cfg["num_workers"], device, cfg["on_bad_image"], desc="test images",
                                      fingerprint=fingerprint)
    if arrays:
        write_skipped(frame, skipped, outdir / SKIPPED)
    return tuple(arrays.get(k) for k in ("embedding", "predicted CCS", "predicted CCAS", "SER-FIQ"))


class SharedBackbone(nn.Module):
    """Encoder and predictor with the same backbone weights (a frozen-backbone predictor): one backbone
    pass gives ``(embedding, ccs, ccas)``, as :class:`~transfira.networks.EncoderAndPredictor` would."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.predictor.backbone(images)
        return features, *self.predictor.heads(features)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules have identical state dicts (keys, shapes and values)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def encoder_and_predictor(cfg: dict[str, Any], device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(a module giving (embedding, ccs, ccas) per image, the predictor)``: one backbone pass when the
    predictor's backbone is the deployed encoder itself (a frozen-backbone predictor), else two."""
    encoder, predictor = load_encoder(cfg, device), load_predictor(cfg, device)
    if same_weights(encoder, predictor.backbone):
        log("the predictor's backbone is the encoder: one backbone pass per image")
        return SharedBackbone(predictor).eval(), predictor
    return EncoderAndPredictor(encoder, predictor).eval(), predictor
