"""Peak RSS and wall time of turning a large image into the pixels the runtime hashes and hands to
libmtmd: ours (llava_gguf.runtime.images.load_image + content_hash: reduced early, see KEEP_SIDE) against
the anchor, what llama-cpp-python's Llava15ChatHandler does with an image (PIL open, convert("RGB"),
the full-size pixels), side by side in one run, each in its own child process.

    python -m bench.image_memory [--no-doc]   # writes its table into docs/benchmarks.md

Inputs are made in a temporary directory outside the repository and removed: the 17 KB 12000x12000 PNG
that outside testing sent (issue 23, item 12), a 9000x5000 JPEG photo-like gradient, a 4032x3024 JPEG
(a 12-megapixel phone photo, which must reach the model untouched)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import BENCHMARKS_DOC, peak_rss_run, update_doc

OURS = ("import sys, warnings; warnings.simplefilter('ignore'); "
        "from llava_gguf.runtime.images import content_hash, load_image; "
        "img = load_image(sys.argv[1]); content_hash(img); print(img.size)")
ANCHOR = ("import sys, warnings, hashlib; warnings.simplefilter('ignore'); from PIL import Image; "
          "img = Image.open(sys.argv[1]).convert('RGB'); hashlib.sha256(img.tobytes()).hexdigest(); print(img.size)")


def _inputs(d: Path) -> list[tuple[str, Path]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Image.new("1", (12000, 12000), 0).save(d / "bomb.png", optimize=True)
    out = [("12000x12000 1-bit PNG (17 KB)", d / "bomb.png")]
    for w, h, name in ((9000, 5000, "9000x5000 JPEG"), (4032, 3024, "4032x3024 JPEG")):
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        arr = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{w}x{h}.jpg", quality=90)
        out.append((name, d / f"{w}x{h}.jpg"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args()
    rows = ["| image | anchor: PIL convert(\"RGB\") | ours: load_image | RSS ratio | wall ratio |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="llava-gguf-bench-") as tmp:
        for label, path in _inputs(Path(tmp)):
            a_wall, a_rss, a_rc, _ = peak_rss_run([sys.executable, "-c", ANCHOR, str(path)])
            o_wall, o_rss, o_rc, _ = peak_rss_run([sys.executable, "-c", OURS, str(path)])
            if a_rc or o_rc:
                raise SystemExit(f"{label}: a run failed (anchor exit {a_rc}, ours exit {o_rc})")
            rows.append(f"| {label} | {a_rss / 1024:.0f} MiB, {a_wall:.2f} s | {o_rss / 1024:.0f} MiB, {o_wall:.2f} s "
                        f"| {o_rss / a_rss:.2f} | {o_wall / a_wall:.2f} |")
            print(rows[-1], flush=True)
    body = ("\n".join(rows) + "\n\nPeak RSS (GNU time, the whole child process including the interpreter) and wall "
            "time of one image. Ours reduces an image with a side of 4096 px or more by a whole factor before any "
            "full-size copy (JPEG: decoded at 1/2-1/8 scale), keeping >= 2048 px; the 12-megapixel photo is not "
            "reduced (same pixels as the anchor's).\n\n    python -m bench.image_memory\n")
    if args.no_doc:
        print(body)
    else:
        update_doc(BENCHMARKS_DOC, "image-memory", "Large images (load_image)", body)


if __name__ == "__main__":
    main()
