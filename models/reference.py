#!/usr/bin/env python3
"""Independent float64 NumPy forward pass of EfficientNet-Lite0.

This is the yardstick for the exported ONNX model (and for the Rust pipeline
that runs it). To be a meaningful cross-check it shares only the checkpoint
parser with the exporter: BatchNorm is applied as a separate step rather than
folded, TF "SAME" padding is computed with TensorFlow's own formulation rather
than the exporter's, the block configuration is restated here, and all
arithmetic is float64.

Usage (from the repository root):

    python3 models/reference.py --input IN.f32 --out OUT.f64 [--logits LOGITS.f64] [--size 224]

IN.f32 is raw little-endian float32 of shape [B,3,S,S] (already preprocessed,
NCHW); B is inferred from the file size. OUT.f64 receives raw little-endian
float64 embeddings [B,1280]; LOGITS.f64, if given, the [B,1000] logits.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_efficientnet_lite0 import load_weights  # noqa: E402  (parser only)

EPS = 1e-3

# (repeats, kernel, first stride, expand ratio, out channels); the input
# channel count of each stage is the previous stage's output (stem: 32).
B0_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]


def tf_same_padding(size, k, stride):
    """(before, after) padding as TensorFlow's SAME does it.

    Written the way TF documents it (in terms of size % stride) rather than via
    the output size, so that it is a genuinely separate derivation.
    """
    if size % stride == 0:
        total = max(k - stride, 0)
    else:
        total = max(k - size % stride, 0)
    return total // 2, total - total // 2


def pad_same(x, k, stride):
    (top, bottom) = tf_same_padding(x.shape[2], k, stride)
    (left, right) = tf_same_padding(x.shape[3], k, stride)
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def windows(xp, k, stride, out_h, out_w):
    """Yield (dy, dx, strided slice) for every kernel tap over padded input."""
    for dy in range(k):
        for dx in range(k):
            yield dy, dx, xp[:, :, dy:dy + stride * (out_h - 1) + 1:stride,
                             dx:dx + stride * (out_w - 1) + 1:stride]


def out_size(size, stride):
    return (size + stride - 1) // stride


def conv_dense(x, w, stride):
    """Full convolution via im2col: stack every tap, contract with einsum."""
    k = w.shape[2]
    if k == 1 and stride == 1:
        b, c, h, wd = x.shape
        return (w[:, :, 0, 0] @ x.reshape(b, c, h * wd)).reshape(b, -1, h, wd)
    oh, ow = out_size(x.shape[2], stride), out_size(x.shape[3], stride)
    cols = np.stack([s for _, _, s in windows(pad_same(x, k, stride), k, stride, oh, ow)],
                    axis=2)  # [B, C, k*k, oh, ow], taps in (dy, dx) row-major order
    return np.einsum("bctyx,oct->boyx", cols, w.reshape(w.shape[0], w.shape[1], k * k),
                     optimize=True)


def conv_depthwise(x, w, stride):
    """Depthwise convolution: sum of per-channel-weighted shifted slices."""
    k = w.shape[2]
    oh, ow = out_size(x.shape[2], stride), out_size(x.shape[3], stride)
    y = np.zeros((x.shape[0], x.shape[1], oh, ow))
    for dy, dx, s in windows(pad_same(x, k, stride), k, stride, oh, ow):
        y += s * w[None, :, 0, dy, dx, None, None]
    return y


def batchnorm(x, sd, name):
    mean = sd[name + ".running_mean"][None, :, None, None]
    var = sd[name + ".running_var"][None, :, None, None]
    gamma = sd[name + ".weight"][None, :, None, None]
    beta = sd[name + ".bias"][None, :, None, None]
    return (x - mean) / np.sqrt(var + EPS) * gamma + beta


def relu6(x):
    return np.minimum(np.maximum(x, 0.0), 6.0)


def forward(sd, x):
    """Return (embedding [B,1280], logits [B,1000]) in float64."""
    x = relu6(batchnorm(conv_dense(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    idx, cin = 0, 32
    for repeats, k, first_stride, expand, cout in B0_STAGES:
        for r in range(repeats):
            p = f"_blocks.{idx}."
            stride = first_stride if r == 0 else 1
            dw = sd[p + "_depthwise_conv.weight"]
            assert dw.shape[2] == k, f"block {idx}: kernel {dw.shape[2]} != config {k}"
            h = x
            if expand != 1:
                h = relu6(batchnorm(conv_dense(h, sd[p + "_expand_conv.weight"], 1), sd, p + "_bn0"))
            h = relu6(batchnorm(conv_depthwise(h, dw, stride), sd, p + "_bn1"))
            h = batchnorm(conv_dense(h, sd[p + "_project_conv.weight"], 1), sd, p + "_bn2")
            x = h + x if (stride == 1 and cin == cout) else h
            idx, cin = idx + 1, cout
    x = relu6(batchnorm(conv_dense(x, sd["_conv_head.weight"], 1), sd, "_bn1"))
    emb = x.mean(axis=(2, 3))
    logits = emb @ sd["_fc.weight"].T + sd["_fc.bias"]
    return emb, logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="raw float32 [B,3,S,S]")
    parser.add_argument("--out", required=True, help="raw float64 [B,1280] embeddings")
    parser.add_argument("--logits", help="optional raw float64 [B,1000] logits")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    raw = np.fromfile(args.input, dtype="<f4")
    per_image = 3 * args.size * args.size
    if raw.size == 0 or raw.size % per_image:
        sys.exit(f"{args.input}: {raw.size} floats is not a multiple of 3x{args.size}x{args.size}")
    x = raw.reshape(-1, 3, args.size, args.size).astype(np.float64)

    sd = {k: v.astype(np.float64) for k, v in load_weights().items()
          if not k.endswith("num_batches_tracked")}
    emb, logits = forward(sd, x)
    emb.astype("<f8").tofile(args.out)
    if args.logits:
        logits.astype("<f8").tofile(args.logits)
    print(f"reference: {x.shape[0]} image(s) at {args.size}x{args.size} -> {args.out}")


if __name__ == "__main__":
    main()
