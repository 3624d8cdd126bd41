#!/usr/bin/env python3
"""Check an exported EfficientNet-Lite0 ONNX model against real images and the reference.

Two checks, because each catches what the other misses:

1. ImageNet top-1 on Fruits-360 test images of five fruits that have an
   ImageNet class. This catches gross errors (wrong weights, wrong
   preprocessing) but is blind to subtle ones: with wrong SAME padding the
   embeddings drift to cosine ~0.92 while top-1 barely moves.
2. Exactness: onnxruntime's embedding vs. models/reference.py (float64,
   unfolded BatchNorm, independent padding) on two images; max |delta| must be
   below 1e-4 (expected ~5e-6, i.e. float32 rounding).

It also reports single-thread onnxruntime throughput at batch 1.
Preprocessing matches the Rust pipeline: RGB, PIL bilinear resize of the
100x100 image to SxS with no crop, (x - 127) / 128, NCHW.

Usage (from the repository root, after exporting the model for that size):

    python3 models/verify.py [--size 224] [--model PATH] [--data DIR]

Exits non-zero if the exactness check fails.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

try:
    from PIL import Image
except ImportError:  # machines are provisioned fresh; install on first use
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "Pillow"], check=True)
    from PIL import Image

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(MODELS_DIR, "..", "..", "shared", "fruits360", "Test")
IMAGES_PER_CLASS = 30
MAX_ABS_DELTA = 1e-4
TMP_DIR = "/tmp"

# Fruits-360 folder -> ImageNet-1k class index.
EXPECTED = {
    "Banana 1": 954,
    "Orange 1": 950,
    "Lemon 1": 951,
    "Pineapple 1": 953,
    "Strawberry 1": 949,
}


def preprocess(path, size):
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return x.transpose(2, 0, 1)[None]  # HWC -> 1CHW


def class_images(data_dir, folder):
    d = os.path.join(data_dir, folder)
    names = sorted(n for n in os.listdir(d) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    return [os.path.join(d, n) for n in names[:IMAGES_PER_CLASS]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--model", help="default models/efficientnet_lite0[_SIZE].onnx")
    parser.add_argument("--data", default=DEFAULT_DATA, help="Fruits-360 Test directory")
    args = parser.parse_args()
    model = args.model or os.path.join(
        MODELS_DIR, "efficientnet_lite0.onnx" if args.size == 224
        else f"efficientnet_lite0_{args.size}.onnx")

    opts = ort.SessionOptions()
    # Single-threaded so the throughput figure is comparable across machines.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    # 1. Top-1 hit rates.
    first_inputs = []
    infer_s, n_infer = 0.0, 0
    summary = []
    for folder, cls in EXPECTED.items():
        hits = 0
        paths = class_images(args.data, folder)
        for path in paths:
            x = preprocess(path, args.size)
            if len(first_inputs) < 2:
                first_inputs.append(x)
            t0 = time.perf_counter()
            _, logits = sess.run(None, {"input": x})
            infer_s += time.perf_counter() - t0
            n_infer += 1
            hits += int(np.argmax(logits[0]) == cls)
        summary.append(f"{folder.split()[0].lower()} {hits}/{len(paths)}")
    print(f"size {args.size}: top-1 " + ", ".join(summary))
    print(f"size {args.size}: onnxruntime 1 thread, batch 1: {n_infer / infer_s:.1f} images/s")

    # 2. Exactness against the float64 reference, through its CLI.
    x = np.concatenate(first_inputs)
    in_path = os.path.join(TMP_DIR, f"verify_lite0_{os.getpid()}_in.f32")
    out_path = os.path.join(TMP_DIR, f"verify_lite0_{os.getpid()}_emb.f64")
    try:
        x.astype("<f4").tofile(in_path)
        subprocess.run([sys.executable, os.path.join(MODELS_DIR, "reference.py"),
                        "--input", in_path, "--out", out_path, "--size", str(args.size)],
                       check=True, stdout=subprocess.DEVNULL)
        ref = np.fromfile(out_path, dtype="<f8").reshape(len(x), -1)
    finally:
        for p in (in_path, out_path):
            if os.path.exists(p):
                os.remove(p)
    emb, _ = sess.run(None, {"input": x})
    delta = float(np.abs(emb.astype(np.float64) - ref).max())
    cos = min(float(e @ r / (np.linalg.norm(e) * np.linalg.norm(r))) for e, r in zip(emb, ref))
    ok = delta < MAX_ABS_DELTA
    print(f"size {args.size}: onnxruntime vs reference.py on {len(x)} images: "
          f"max|delta| {delta:.2e}, min cosine {cos:.8f} -> {'OK' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
