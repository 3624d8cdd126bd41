#!/usr/bin/env python3
"""onnxruntime baseline for the Rust embedding pipeline.

Runs the same preprocessing and model as the Rust side, so the Rust benchmark
can put its own numbers next to a mainstream inference engine. The Rust
benchmark runs this as a subprocess and parses the *last* stdout line as JSON;
everything meant for humans therefore goes to stderr.

Usage (from the repository root):

    python3 models/ort_bench.py --model models/efficientnet_lite0.onnx \
        --images DIR --limit N [--threads 1,2] [--batch 1,8] [--dump-embeddings OUT.npy]

Output (last stdout line):

    {"onnxruntime_version": ..., "model": ..., "size": S, "images": n,
     "decode_resize_images_per_s": x, "threads": {"1": ips, "2": ips},
     "batches": {"<threads>": {"<batch>": ips}}, "best": {"threads": t, "batch": b,
     "images_per_s": ips}}

"threads" is batch 1; "batches" has every (threads, batch) timed; "best" is the fastest.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from PIL import Image

WARMUP_RUNS = 10


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def list_images(root, limit):
    """First `limit` JPEGs under root/<Label>/, ordered like the Rust side.

    Rust sorts the relative path as a String, i.e. by UTF-8 bytes; sorting the
    encoded bytes (not Python str) keeps that true for non-ASCII labels, and
    "/" as the separator matters because it sorts below letters and digits.
    """
    rel = []
    for label in os.listdir(root):
        label_dir = os.path.join(root, label)
        if not os.path.isdir(label_dir):
            continue
        for name in os.listdir(label_dir):
            if name.lower().endswith(".jpg"):
                rel.append(f"{label}/{name}")
    rel.sort(key=lambda p: p.encode("utf-8"))
    return [os.path.join(root, p) for p in rel[:limit]]


def decode_resize(path, size):
    img = Image.open(path).convert("RGB")
    # Fruits-360 images are already 100x100; skipping the no-op resize matches
    # the Rust pipeline, which only resizes when the size differs.
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return img


def to_tensor(img):
    # (x - 127) / 128 is the EfficientNet-Lite (TF-Lite) normalisation.
    x = (np.asarray(img, dtype=np.float32) - 127.0) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # HWC -> NCHW, batch 1


def input_size(model_path):
    """Square input side S from the model's "input" [N,3,S,S] (N may be symbolic)."""
    sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    inp = next(i for i in sess.get_inputs() if i.name == "input")
    _, c, h, w = inp.shape
    if c != 3 or h != w or not isinstance(h, int):
        sys.exit(f"expected input [N,3,S,S], got {inp.shape}")
    return h


def make_session(model_path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # One inter-op thread: the graph is a single chain, and a second pool would
    # only add threads competing for the same cores.
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True, help="Fruits-360 folder: DIR/<Label>/<name>.jpg")
    ap.add_argument("--limit", type=int, required=True)
    ap.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--dump-embeddings", metavar="FILE.npy",
                    help="save the 1-thread embeddings (n x d float32) in image order")
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    batch_sizes = sorted({int(b) for b in args.batch.split(",") if b.strip()} | {1})
    if args.dump_embeddings and 1 not in thread_counts:
        sys.exit("--dump-embeddings needs 1 in --threads")

    size = input_size(args.model)
    paths = list_images(args.images, args.limit)
    if not paths:
        sys.exit(f"no .jpg images under {args.images}")
    n = len(paths)

    # Decode+resize is timed on its own (as the Rust throughput example does),
    # and tensors are built up front so the inference timing is model-only.
    t0 = time.perf_counter()
    images = [decode_resize(p, size) for p in paths]
    decode_s = time.perf_counter() - t0
    tensors = [to_tensor(img) for img in images]
    decode_ips = n / decode_s
    log(f"onnxruntime {ort.__version__}, model {args.model}, size {size}, {n} images")
    log(f"decode+resize: {decode_ips:.1f} images/s")

    results = {}
    batches = {}
    for t in thread_counts:
        sess = make_session(args.model, t)
        for i in range(WARMUP_RUNS):
            sess.run(["embedding"], {"input": tensors[i % n]})
        batches[str(t)] = {}
        for b in batch_sizes:
            # Batches are stacked up front, as the batch-1 tensors are: model time only.
            stacked = [np.concatenate(tensors[i:i + b]) for i in range(0, n, b)]
            sess.run(["embedding"], {"input": stacked[0]})
            embeddings = []
            t0 = time.perf_counter()
            for x in stacked:
                embeddings.append(sess.run(["embedding"], {"input": x})[0])
            elapsed = time.perf_counter() - t0
            batches[str(t)][str(b)] = n / elapsed
            log(f"threads={t} batch={b}: {n / elapsed:.1f} images/s")
            if b == 1:
                results[str(t)] = n / elapsed
                # The dump comes from the 1-thread run so it is compared against the
                # deterministic single-threaded case on the Rust side.
                if t == 1 and args.dump_embeddings:
                    np.save(args.dump_embeddings, np.concatenate(embeddings).astype(np.float32))
                    log(f"wrote {args.dump_embeddings}")
    best_t, best_b, best_ips = max(
        ((t, b, ips) for t, row in batches.items() for b, ips in row.items()),
        key=lambda x: x[2])

    print(json.dumps({
        "onnxruntime_version": ort.__version__,
        "model": args.model,
        "size": size,
        "images": n,
        "decode_resize_images_per_s": decode_ips,
        "threads": results,
        "batches": batches,
        "best": {"threads": int(best_t), "batch": int(best_b), "images_per_s": best_ips},
    }))


if __name__ == "__main__":
    main()
