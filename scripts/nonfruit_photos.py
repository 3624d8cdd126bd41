#!/usr/bin/env python3
"""Builds a set of photos that are not fruit, for the open-set check of examples/accuracy.

Source: the sample images bundled in the scikit-image wheel (public domain or CC0, see
its skimage/data/README.txt): people (astronaut, camera man, 200 LFW faces), animals
(cat, horse), objects (coffee, coins, rocket, motorcycle, clock, text, logo), textures
(brick, grass, gravel), microscopy and sky. Each photo gives its whole frame and crops at
several scales, saved as 100x100 RGB JPEGs like the archive's.

    python3 scripts/nonfruit_photos.py /tmp/nonfruit
"""
import io
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image

SKIP = {"chessboard_GRAY.png", "chessboard_RGB.png", "phantom.png", "microaneurysms.png",
        "no_time_for_that_tiny.gif", "multipage.tif", "multipage_rgb.tif"}


def wheel_images(tmp):
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "scikit-image==0.26.0", "-d", tmp], check=True)
    wheel = next(pathlib.Path(tmp).glob("scikit_image-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            base = name.rsplit("/", 1)[-1]
            if name.startswith("skimage/data/") and base.endswith((".png", ".jpg")) and base not in SKIP:
                yield base.rsplit(".", 1)[0], Image.open(io.BytesIO(z.read(name))).convert("RGB")
            if name.endswith("lfw_subset.npy"):
                faces = np.load(io.BytesIO(z.read(name)))
                for i, f in enumerate(faces):
                    g = Image.fromarray((np.clip(f, 0, 1) * 255).astype(np.uint8)).convert("RGB")
                    yield f"face{i:03d}", g


def crops(image):
    w, h = image.size
    yield "full", image
    for scale in (0.6, 0.35):
        side = int(min(w, h) * scale)
        if side < 40:
            continue
        for fx, fy in ((0.5, 0.5), (0.2, 0.2), (0.8, 0.3), (0.3, 0.8)):
            x = int((w - side) * fx)
            y = int((h - side) * fy)
            yield f"c{int(scale * 100)}_{int(fx * 10)}{int(fy * 10)}", image.crop((x, y, x + side, y + side))


def main():
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/nonfruit")
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, image in wheel_images(tmp):
            views = [("full", image)] if name.startswith("face") else crops(image)
            for view, im in views:
                im.resize((100, 100), Image.BILINEAR).save(out / f"{name}_{view}.jpg", quality=92)
                count += 1
    print(f"{count} non-fruit photos in {out}")


if __name__ == "__main__":
    main()
