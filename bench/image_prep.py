"""The router's per-image work and the sizes an image chat travels at, in one process.

    python bench/image_prep.py --image-size 640x480 --images 10

For random PNGs of ``--image-size`` on the small LLaVA test model: the median time of each
step the router runs per image without its cache (decode, the model's image processor, hashing
the pixels into the message), what a cache hit costs instead (the SHA-256 of the file and the
lookup), and the bytes of the file, the ImageInput (pixels) sent to the scheduler and on to the
worker, and the value the scheduler writes to Redis for a two-image request.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pagewire.images import placed, prepare
from router.image_cache import ImageCache, key_of
from router.image_sources import ImageLimits
from router.images import ModelImages, decode

MODEL = Path.home() / ".cache/pagewire/models/llava-small-seed0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image-size", default="640x480")
    p.add_argument("--images", type=int, default=10)
    args = p.parse_args()
    w, h = (int(x) for x in args.image_size.split("x"))
    limits = ImageLimits(8, 1 << 30, 1 << 30, frozenset(), 10.0)
    model = ModelImages(MODEL, limits)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {k: [] for k in
                                     ("decode", "preprocess", "hash + message", "hit: key + lookup")}
    cache = ImageCache(1 << 30)
    files = []
    for _ in range(args.images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        files.append(buf.getvalue())
    for data in files:
        t0 = time.perf_counter()
        img = decode(data, "f", limits.max_pixels)
        t1 = time.perf_counter()
        px = np.asarray(model.processor(images=[img], return_tensors="np")["pixel_values"][0],
                        dtype=np.float32)
        t2 = time.perf_counter()
        prepared = prepare(px)
        t3 = time.perf_counter()
        cache.put(key_of(data), prepared)
        t4 = time.perf_counter()
        assert cache.get(key_of(data)) == prepared
        t5 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t5 - t4), strict=True):
            times[name].append(dt * 1e3)
    message = placed(prepared, 5, model.placeholders(prepared))
    from scheduler_svc.images import pack

    print(f"file {len(files[-1]):,} B; ImageInput {message.ByteSize():,} B "
          f"(pixels {list(prepared.shape)}); Redis value for 2 images "
          f"{len(pack([message, message])):,} B")
    for name, xs in times.items():
        print(f"{name:20s} median {statistics.median(xs):7.2f} ms")


if __name__ == "__main__":
    main()
