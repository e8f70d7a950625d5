"""Vision encoder seconds per image and peak RSS at one batch size (docs/serving.md: run it once per
batch size, alternating, since peak RSS is per process):

    python tools/vision_batch.py FOLDER VARIANT BATCH
"""

import resource
import sys
import time

from flonnx.runtime import Florence2, synthetic

IMAGES = 8


def main() -> None:
    folder, variant, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = Florence2.load(folder, variant=variant, threads=2)
    images = [synthetic.make_scene(5, i).image for i in range(IMAGES)]
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(2):
        started = time.perf_counter()
        for i in range(0, IMAGES, batch):
            model.encode_images(images[i : i + batch])
        times.append((time.perf_counter() - started) / IMAGES)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runs = [round(t, 2) for t in times]
    print(f"batch {batch}: {min(times):.2f} s/image (runs {runs}), ", end="")
    print(f"peak RSS {peak:.0f} MB (after load {loaded:.0f})")


if __name__ == "__main__":
    main()
