"""Face image quality scores beside CCS / CCAS: the FIQA baselines of Tables II and III.

Per-image scores that ``test.py`` computes in its single pass over the test images
(``[quality]`` in the test config):

- ``norm``: L2 norm of the deployed encoder's raw embedding (the MagFace-style proxy).
- ``serfiq``: SER-FIQ (Terhoerst et al., CVPR 2020) on the deployed encoder: ``m``
  stochastic passes with dropout ``p`` on the input of the encoder's last fully connected
  layer, ``q = 2 sigmoid(-(2 / m^2) sum_{i<j} ||x_i - x_j||)`` over the L2-normalized
  embeddings ``x_i`` (paper eq. 3-4). Everything before that layer runs once per image.
- ``cr``: CR-FIQA's certainty ratio (Boutros et al., CVPR 2023) from TransFIRA's own
  predictions, ``CCS / (NNCCS + 1 + 1e-9)`` with ``NNCCS = CCS - CCAS``.
- external scores (``[quality.external.<name>]``): a column of any CSV, rows matched by
  the image path.

Locating the last fully connected layer in an onnx2torch graph (:func:`locate_fc`): walk
back from the graph's output through shape-preserving and per-feature affine ops
(BatchNorm, Flatten, Reshape, (Un)Squeeze, Identity, Dropout, Add/Sub/Mul/Div by a
constant) and through linear maps (Linear/Gemm/MatMul with a constant weight, and Conv
layers whose output is 1 x 1 spatially, i.e. fully connected layers written as convs),
stopping at the first other op (a nonlinearity such as PReLU, a residual Add of two
tensors). A chain of linear maps with nothing nonlinear between them is one linear map
(MobileFaceNet's 7x7 depthwise + 1x1 + 1x1 conv head), so the dropout goes on the input
of the chain's first map. ``[quality.serfiq] layer`` names another node instead.

The ``m`` dropout masks are a counter-based hash of (seed, pass, unit), computed once and
shared by every image (SER-FIQ needs ``m`` random subnetworks, not different ones per image):
identical on CPU and GPU, for any batch composition, row order or image path. When the
dropout's layer is a depthwise conv whose kernel covers its whole input (MobileFaceNet's
global depthwise conv), the masks are folded into its weights once, so the ``m`` passes of
that layer are one batched product instead of ``m`` copies of the input (:func:`folded_depthwise`).
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import fx, nn

from .aggregation import Templates, aggregate_variants, row_norms
from .config import ANY_TABLE, REQUIRED
from .errors import TransfiraError
from .io import format_rows, numeric_column, read_annotations

BUILTIN_SCORES = ("norm", "serfiq", "cr")
RESCALE = ("none", "minmax")
RESERVED = ("ccs", "ccas", "baseline", "weight", "filter", "filter_weight")  # names taken by columns / templates
QUALITY_SCHEMA: dict[str, Any] = {
    "scores": [],  # built-in scores to compute: "norm", "serfiq", "cr"
    "rescale": "none",  # "minmax": map each score to [0, 1] over the test set before weighting templates
    "serfiq": {"m": 100, "p": 0.5, "seed": 0,
               "layer": "",  # fx node whose input gets the dropout ('' = located automatically)
               "batch": 0},  # images whose m passes share one tensor (0 = auto, about 16M values)
    "external": {ANY_TABLE: {"csv": REQUIRED, "column": REQUIRED,
                             "path_column": ""}},  # '' = the test data's path_col_name
}
AUTO_CHUNK_VALUES = 1 << 24  # values of the dropped-out input per chunk with batch = 0 (64 MB in float32)
CR_EPS = 1e-9

# onnx2torch module classes by role (see the module docstring)
LINEAR_MAPS = {"Linear", "OnnxGemm", "OnnxMatMul"}
CONVS = {"Conv1d", "Conv2d", "Conv3d"}
PASS_THROUGH = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "OnnxBatchNorm", "Flatten", "OnnxFlatten",
                "OnnxReshape", "Identity", "OnnxCopyIdentity", "Dropout", "OnnxDropoutDynamic",
                "OnnxSqueezeStaticAxes", "OnnxSqueezeDynamicAxes", "OnnxUnsqueezeStaticAxes",
                "OnnxUnsqueezeDynamicAxes", "OnnxBinaryMathOperation"}


# ---------------------------------------------------------------- configuration

def score_names(quality: dict[str, Any], source: str = "config") -> list[str]:
    """The enabled scores in column order (built-ins as listed, then external names); validates ``[quality]``."""
    names: list[str] = []
    if not isinstance(quality["scores"], list):
        raise TransfiraError(f"{source}: [quality] scores must be a list, e.g. ['norm', 'serfiq', 'cr']")
    for name in quality["scores"]:
        if name in quality["external"]:
            continue
        if name not in BUILTIN_SCORES:
            close = difflib.get_close_matches(str(name), BUILTIN_SCORES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TransfiraError(f"{source}: unknown score '{name}' in [quality] scores{hint}; built-in scores: "
                                 f"{', '.join(BUILTIN_SCORES)}, others go in [quality.external.<name>]")
        if name in names:
            raise TransfiraError(f"{source}: score '{name}' is listed twice in [quality] scores")
        names.append(name)
    for name in quality["external"]:
        if name in BUILTIN_SCORES or name in RESERVED or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise TransfiraError(f"{source}: [quality.external.{name}]: choose another name (letters, digits, _ "
                                 f"and -, not one of {', '.join(BUILTIN_SCORES + RESERVED)})")
        names.append(name)
    if quality["rescale"] not in RESCALE:
        raise TransfiraError(f"{source}: [quality] rescale must be one of {', '.join(RESCALE)}, "
                             f"got '{quality['rescale']}'")
    s = quality["serfiq"]
    if "serfiq" in names:
        if not (isinstance(s["m"], int) and s["m"] >= 2):
            raise TransfiraError(f"{source}: [quality.serfiq] m must be an integer >= 2, got {s['m']!r}")
        if not (isinstance(s["p"], (int, float)) and 0 <= s["p"] < 1):
            raise TransfiraError(f"{source}: [quality.serfiq] p must be in [0, 1), got {s['p']!r}")
        if not (isinstance(s["batch"], int) and s["batch"] >= 0):
            raise TransfiraError(f"{source}: [quality.serfiq] batch must be an integer >= 0, got {s['batch']!r}")
        if not isinstance(s["seed"], int):
            raise TransfiraError(f"{source}: [quality.serfiq] seed must be an integer, got {s['seed']!r}")
    return names


# ---------------------------------------------------------------- simple scores

def embedding_norm(features: np.ndarray) -> np.ndarray:
    """``norm``: L2 norm of each raw embedding [N] float64 (NaN for non-finite rows), block by block."""
    finite, norms = row_norms(features)
    return np.where(finite, norms.astype(np.float64), np.nan)


def certainty_ratio(ccs: np.ndarray, ccas: np.ndarray) -> np.ndarray:
    """``cr``: CR-FIQA's ``CCS / (NNCCS + 1 + eps)`` with ``NNCCS = CCS - CCAS`` (predicted values) [N] float64."""
    ccs, ccas = np.asarray(ccs, np.float64), np.asarray(ccas, np.float64)
    return ccs / (ccs - ccas + 1 + CR_EPS)


def minmax(scores: np.ndarray) -> np.ndarray:
    """Map the finite values to [0, 1] (min -> 0, max -> 1; all 1 when constant); non-finite stay NaN."""
    scores = np.asarray(scores, np.float64)
    finite = np.isfinite(scores)
    if not finite.any():
        return np.full(len(scores), np.nan)
    low, high = scores[finite].min(), scores[finite].max()
    scaled = (scores - low) / (high - low) if high > low else np.ones(len(scores))
    return np.where(finite, scaled, np.nan)


def external_scores(name: str, spec: dict[str, Any], paths: Sequence[str], default_path_column: str) -> np.ndarray:
    """Score ``name`` for each test image ``paths`` from ``spec["csv"]`` (rows matched by the path column)."""
    csv, column = spec["csv"], spec["column"]
    path_column = spec["path_column"] or default_path_column
    table = read_annotations(csv, [path_column])
    if column not in table.columns:
        raise TransfiraError(f"{csv}: no column '{column}' for score '{name}' ([quality.external.{name}]); "
                             f"columns present: {', '.join(map(str, table.columns))}")
    index = pd.Index(table[path_column].astype(str))
    if not index.is_unique:
        dup = index[index.duplicated()][0]
        raise TransfiraError(f"{csv}: image '{dup}' appears more than once in column '{path_column}'")
    values, _ = numeric_column(table, column)
    pos = index.get_indexer(pd.Index(list(map(str, paths))))
    missing = np.flatnonzero(pos < 0)
    if len(missing):
        raise TransfiraError(f"{csv}: no row for test image '{paths[missing[0]]}' in column '{path_column}' "
                             f"({len(missing)} of {len(paths)} test images missing; score '{name}')")
    bad = np.flatnonzero(~np.isfinite(values[pos]))
    if len(bad):
        raise TransfiraError(f"{csv}: non-numeric or non-finite '{column}' for test image '{paths[bad[0]]}' "
                             f"(row {format_rows(pos[bad[:1]])}; {len(bad)} test images affected)")
    return values[pos]


def score_templates(features: np.ndarray, template_ids: Any, scores: dict[str, np.ndarray], rescale: str = "none",
                    normalize: bool = False) -> dict[str, Templates]:
    """``{score: (ids, vectors, summary)}``: each template's mean weighted by the score.

    The CCS weighting of :mod:`transfira.aggregation` with the score as weight: clamped at
    0, unweighted mean where a template's weight sum is <= ``WEIGHT_EPS``. ``rescale =
    "minmax"`` first maps each score to [0, 1] over the test set.
    """
    out = {}
    for name, values in scores.items():
        weights = minmax(values) if rescale == "minmax" else np.asarray(values, np.float64)
        out[name] = aggregate_variants(features, template_ids, weights, None, ["weight"], normalize)["weight"]
    return out


# ---------------------------------------------------------------- SER-FIQ

def _const_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value does not depend on the graph's input (initializers, constants)."""
    const: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_module", "call_function", "call_method")
                                     and all(a in const for a in node.all_input_nodes)):
            const.add(node)
    return const


def _inputs(node: fx.Node) -> list[fx.Node]:
    """The node's input nodes in argument order, repeats kept."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _kind(net: fx.GraphModule, node: fx.Node) -> str:
    return type(net.get_submodule(node.target)).__name__ if node.op == "call_module" else node.op


def _spatial_one(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and all(s == 1 for s in meta.shape[2:])


def _divides_by(net: fx.GraphModule, node: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``node`` computes ``constant / tensor`` (the one binary op with a constant that is not affine)."""
    op = getattr(net.get_submodule(node.target), "math_op_function", None) if node.op == "call_module" else None
    return op is not None and op not in (torch.add, torch.sub, torch.mul) and _inputs(node)[0] is not tensor


def locate_fc(net: fx.GraphModule, layer: str = "", source: str = "encoder") -> fx.Node:
    """The node whose input gets SER-FIQ's dropout: the first map of the output's linear chain, or ``layer``.

    ``net`` must have been run through :class:`torch.fx.passes.shape_prop.ShapeProp`.
    """
    const = _const_nodes(net.graph)
    nodes = {n.name: n for n in net.graph.nodes}
    linear = [n.name for n in net.graph.nodes if _kind(net, n) in LINEAR_MAPS | CONVS]
    hint = f"; candidates (last linear/conv nodes): {', '.join(linear[-6:])}" if linear else (
        "; the graph has no Linear/Gemm/MatMul/Conv node")
    if layer:
        if layer not in nodes:
            close = difflib.get_close_matches(layer, list(nodes), n=1)
            raise TransfiraError(f"{source}: [quality.serfiq] layer '{layer}' is not a node of the graph"
                                 + (f" (did you mean '{close[0]}'?)" if close else hint))
        if len([a for a in _inputs(nodes[layer]) if a not in const]) != 1:
            raise TransfiraError(f"{source}: [quality.serfiq] layer '{layer}' must have exactly one tensor input"
                                 + hint)
        return nodes[layer]
    output = next(n for n in net.graph.nodes if n.op == "output")
    node, head = output.args[0], None
    if not isinstance(node, fx.Node):
        raise TransfiraError(f"{source}: SER-FIQ needs an encoder with one output, this graph has several")
    while node.op == "call_module":
        kind, tensors = _kind(net, node), [a for a in _inputs(node) if a not in const]
        if len(tensors) != 1:
            break
        if kind in LINEAR_MAPS or (kind in CONVS and _spatial_one(node)):
            head = node
        elif kind not in PASS_THROUGH or _divides_by(net, node, tensors[0]):
            break
        node = tensors[0]
    if head is None:
        raise TransfiraError(f"{source}: cannot locate the last fully connected layer for SER-FIQ: walking back from "
                             f"the output, '{node.name}' ({_kind(net, node)}) comes before any Linear/Gemm/MatMul or "
                             f"1x1-output Conv; set [quality.serfiq] layer to the node whose input gets the dropout"
                             + hint)
    return head


def split_at(net: fx.GraphModule, cut: fx.Node, source: str = "encoder") -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(prefix, suffix)`` with ``suffix(prefix(x)) == net(x)``; ``prefix`` returns the value of ``cut``.

    The suffix may read only ``cut`` and constants (not other values computed before ``cut``).
    """
    head = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in net.graph.nodes:
        env[node] = head.node_copy(node, lambda n: env[n])
        if node is cut:
            break
    head.output(env[cut])
    const = _const_nodes(net.graph)
    tail = fx.Graph()
    env = {cut: tail.placeholder("x")}

    def value(n: fx.Node) -> fx.Node:
        if n not in env:
            if n not in const:
                raise TransfiraError(f"{source}: SER-FIQ cannot split the encoder at '{cut.name}': the layers after "
                                     f"it also read '{n.name}', computed before it (choose another [quality.serfiq] "
                                     "layer)")
            for a in n.all_input_nodes:
                value(a)
            env[n] = tail.node_copy(n, value)
        return env[n]

    after = False
    for node in net.graph.nodes:
        if node.op == "output":
            tail.output(fx.node.map_arg(node.args[0], value))
        elif after and any(a in env and a not in const for a in node.all_input_nodes):
            env[node] = tail.node_copy(node, value)
        after = after or node is cut
    prefix, suffix = fx.GraphModule(net, head), fx.GraphModule(net, tail)
    for part in (prefix, suffix):
        part.graph.eliminate_dead_code()
        part.recompile()
    return prefix, suffix


MASK32 = 0xFFFFFFFF
HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**63


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * HASH_MUL) & MASK32
    x ^= x >> 16
    x = (x * HASH_MUL) & MASK32
    x ^= x >> 16
    return x


def keep_masks(seed: int, m: int, units: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[m, F]`` bool: unit ``f`` is kept in pass ``j`` iff ``mix32(mix32(j * F + f) ^ (seed mod 2^32))``
    ``>= round(p * 2^32)``. The same for every image, on every device."""
    counters = torch.arange(m * units, dtype=torch.int64, device=device).reshape(m, units)
    return mix32(mix32(counters) ^ (seed % 2 ** 32)) >= round(p * 2 ** 32)


def serfiq_from_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """``q = 2 sigmoid(-(2 / m^2) sum_{i<j} ||x_i - x_j||)`` over L2-normalized ``embeddings`` [B, m, D] -> [B].

    Distances from the Gram matrix in float64: ``||x_i - x_j|| = sqrt(2 - 2 x_i . x_j)``.
    """
    m = embeddings.shape[1]
    x = nn.functional.normalize(embeddings.double(), dim=-1)
    dist = (2 - 2 * x @ x.transpose(1, 2)).clamp_min(0).sqrt()
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=x.device), diagonal=1)
    total = dist[:, upper].sum(1)
    return 2 * torch.sigmoid(-(2 / m ** 2) * total)


def global_depthwise(conv: nn.Module, cut_shape: Sequence[int]) -> bool:
    """Whether ``conv`` is a depthwise Conv2d whose kernel covers its whole input ``cut_shape`` [C, H, W]
    without padding: ``out[c] = sum_s x[c, s] w[c, s] + b[c]`` (MobileFaceNet's global depthwise conv)."""
    return (type(conv) is nn.Conv2d and len(cut_shape) == 3 and conv.groups == conv.in_channels == conv.out_channels
            == cut_shape[0] and tuple(conv.kernel_size) == tuple(cut_shape[1:]) and conv.padding in ((0, 0), "valid")
            and tuple(conv.dilation) == (1, 1))


def folded_depthwise(x: torch.Tensor, masked_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The global depthwise conv of every pass: ``out[b, k, c] = sum_s x[b, c, s] M_k[c, s] w[c, s] + b[c]``.

    ``x`` [B, C, S], ``masked_weight`` [m, C, S] (the scaled keep masks times the weights) -> [B, m, C].
    """
    out = torch.einsum("bcs,kcs->bkc", x, masked_weight)
    return out if bias is None else out + bias


class SerFiq(nn.Module):
    """The deployed encoder split at its last fully connected layer, with SER-FIQ's stochastic passes.

    ``forward(images)`` returns ``(embedding [B, D], q [B])``: the encoder's own output and
    the SER-FIQ score, from one run of the layers before the split. The ``m`` dropout masks
    (:func:`keep_masks` of ``seed``) are the same for every image: ``m`` random subnetworks.
    """

    def __init__(self, encoder: nn.Module, crop_dim: int, m: int = 100, p: float = 0.5, seed: int = 0,
                 layer: str = "", batch: int = 0, source: str = "encoder"):
        super().__init__()
        from torch.fx.passes.shape_prop import ShapeProp

        if not isinstance(encoder, fx.GraphModule):
            raise TransfiraError(f"{source}: SER-FIQ needs an onnx2torch (torch.fx) graph")
        device = next(iter(encoder.parameters()), torch.zeros(0)).device
        with torch.no_grad():
            ShapeProp(encoder.eval()).propagate(torch.zeros(1, 3, crop_dim, crop_dim, device=device))
        fc = locate_fc(encoder, layer, source)
        cut = next(a for a in _inputs(fc) if a not in _const_nodes(encoder.graph))
        self.layer, self.cut = fc.name, cut.name  # the node whose input gets the dropout, and that input
        self.prefix, self.suffix = split_at(encoder, cut, source)
        self.units = int(np.prod(cut.meta["tensor_meta"].shape[1:]))
        first = next(iter(next(n for n in self.suffix.graph.nodes if n.op == "placeholder").users))
        self.fold = first.op == "call_module" and global_depthwise(self.suffix.get_submodule(first.target),
                                                                    cut.meta["tensor_meta"].shape[1:])
        if self.fold:  # the dropout's layer alone, and the layers after it
            self.depthwise = self.suffix.get_submodule(first.target)
            self.after_depthwise = split_at(self.suffix, first, source)[1]
        if m * self.units >= 2 ** 32:
            raise TransfiraError(f"{source}: SER-FIQ with m = {m} passes over {self.units} units exceeds the mask "
                                 "counter range (m x units < 2^32)")
        self.m, self.p, self.seed = m, float(p), seed
        self.batch = batch or max(1, AUTO_CHUNK_VALUES // (m * self.units))
        self._masks: torch.Tensor | None = None
        self._dropped: torch.Tensor | None = None  # reused: a fresh 64 MB tensor per chunk costs page faults

    def masks(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The keep masks [m, F] scaled by ``1 / (1 - p)`` (inverted dropout) in ``dtype``, cached."""
        if self._masks is None or self._masks.device != device or self._masks.dtype != dtype:
            keep = keep_masks(self.seed, self.m, self.units, self.p, device)
            self._masks = keep.to(dtype) * (1 / (1 - self.p))
        return self._masks

    def buffer(self, b: int, like: torch.Tensor) -> torch.Tensor:
        """``[b, m, F]`` scratch for the dropped-out input, kept between calls (allocated once per run)."""
        full = self._dropped
        if (full is None or full.device != like.device or full.dtype != like.dtype or len(full) < b
                or full.is_inference() != torch.is_inference_mode_enabled()):
            full = self._dropped = like.new_empty(max(b, min(len(like), self.batch)), self.m, self.units)
        return full[:b]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prefix(images)
        return self.suffix(x), self.scores(x)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """SER-FIQ [B] (float64) of the split-point values ``x`` [B, ...]."""
        masks = self.masks(x.device, x.dtype)
        if self.fold:
            weight = masks.reshape(self.m, *self.depthwise.weight.shape[:1], -1) * self.depthwise.weight.flatten(1)
        out = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            b = len(chunk)
            if self.fold:
                conv = folded_depthwise(chunk.flatten(2), weight, self.depthwise.bias)  # [b, m, C]
                embeddings = self.after_depthwise(conv.reshape(b * self.m, -1, 1, 1))
            else:
                buffer = None if chunk.requires_grad and torch.is_grad_enabled() else self.buffer(b, x)
                dropped = torch.mul(chunk.reshape(b, 1, -1), masks, out=buffer)  # [b, m, F]
                embeddings = self.suffix(dropped.reshape(b * self.m, *chunk.shape[1:]))
            out.append(serfiq_from_embeddings(embeddings.reshape(b, self.m, -1)))
        return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float64)
