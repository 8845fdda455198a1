"""Embedding throughput on this machine: ONNX Runtime against PyTorch eager, per backend, at batch 1 and 16,
on real grocery-dev photos.

    .venv/bin/python scripts/bench_embed.py [--threads N [N ...]] [--seconds S] [--json out.json]

Backends: ``sscd`` and ``sscd_distilled`` (ONNX only, as packaged), ``effnet`` (fp32 ONNX at two graph
optimisation levels, an int8 static-QDQ variant calibrated on real photos, PyTorch eager NCHW and
channels-last) and ``openclip`` (ViT-B-32 with random weights -- the speed does not depend on them;
``--clip-arch tiny`` for a quick run).  Each measurement runs in its own fresh process, so one runtime's
thread pool never competes with another's; torch runs under ``torch.inference_mode()`` with the same
thread count as ONNX Runtime.  "model" columns time the network alone on an already preprocessed batch
(the same tensor for both runtimes); "e2e" adds our preprocessing (resize, crop, normalise).  Speeds are
medians over repeated calls, so short stalls from other processes weigh little.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GROCERY = REPO.parent / "shared" / "data" / "grocery-dev"

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# -- photos ------------------------------------------------------------------------------------------


def photo_paths() -> list[Path]:
    import csv

    with (GROCERY / "labels.csv").open(newline="") as fh:
        return [GROCERY / row["path"] for row in csv.DictReader(fh)]


def load_photos(paths: list[Path]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def bench_photos() -> list[np.ndarray]:
    """16 photos spread over the data set (the timed batch)."""
    paths = photo_paths()
    return load_photos(paths[:: max(1, len(paths) // 16)][:16])


# -- timing ------------------------------------------------------------------------------------------


def images_per_second(fn: Callable[[], object], batch: int, seconds: float, min_calls: int = 5) -> float:
    """Median-latency throughput of ``fn`` (which processes ``batch`` images), after two warm-up calls."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


# -- preparation (main process) ----------------------------------------------------------------------


def prepare_openclip(models_dir: Path, arch: str) -> dict[str, Any]:
    """A random-weights checkpoint for ``arch`` and its ONNX export; returns ModelSettings fields."""
    import open_clip
    import torch

    from embeddings.openclip import OpenClipSource, ensure_openclip
    from service.settings import ModelSettings

    src = models_dir / "openclip-src"
    src.mkdir(parents=True, exist_ok=True)
    if arch == "tiny":
        config = src / "Bench-Tiny-ViT.json"
        config.write_text(json.dumps(TINY_CLIP))
        open_clip.add_model_config(config)
        arch_setting, name = str(config), "Bench-Tiny-ViT"
    else:
        arch_setting, name = arch, arch
    checkpoint = src / f"{name}-random.pt"
    if not checkpoint.is_file():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(name).state_dict(), checkpoint)
    fields = {"openclip_arch": arch_setting, "openclip_checkpoint": str(checkpoint)}
    ensure_openclip(models_dir, OpenClipSource.from_settings(ModelSettings.model_validate(fields)))
    return fields


def exported_model(backend: str, models_dir: Path, settings: Any) -> tuple[Path, Any]:
    """(ONNX file, preprocess config) of a backend, exporting it first if needed -- without opening an
    ONNX Runtime session, whose idle thread pool would otherwise sit in the measuring process."""
    from embeddings.effnet import EFFNET_MODEL_FILE, ensure_effnet
    from embeddings.openclip import IMAGE_MODEL_FILE, OpenClipSource, ensure_openclip
    from embeddings.preprocess import PreprocessConfig
    from embeddings.sscd import ensure_sscd

    if backend.startswith("sscd"):
        folder, model = ensure_sscd(models_dir, backend)
    elif backend == "effnet":
        folder, _ = ensure_effnet(models_dir)
        model = folder / EFFNET_MODEL_FILE
    else:
        folder, _ = ensure_openclip(models_dir, OpenClipSource.from_settings(settings))
        model = folder / IMAGE_MODEL_FILE
    return model, PreprocessConfig.read(folder)


def prepare_effnet_int8(models_dir: Path) -> dict[str, Any]:
    """The served int8 effnet (``effnet_int8``: static QDQ, calibrated on scikit-image's photos, see
    embeddings/effnet.py); returns its folder and its agreement with fp32 on 336 in-store photos."""
    from embeddings.registry import build_image_embedder
    from service.settings import ModelSettings

    fp32 = build_image_embedder("effnet", models_dir, ModelSettings())
    int8 = build_image_embedder("effnet_int8", models_dir, ModelSettings())
    paths = [p for p in photo_paths() if "/instore/" in str(p)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(paths))
    # (After the first 64: those calibrated the int8 copy this script quantised itself before effnet_int8
    # was served, so the figures compare with the earlier runs'.)
    held_out = [paths[i] for i in order[64:400]]
    out_dir = int8.model_path.parent
    images = load_photos(held_out)
    photos_fp32, photos_int8 = fp32.embed(images), int8.embed(images)
    cos = (photos_fp32 * photos_int8).sum(axis=1)
    # The task: the nearest catalogue image of each in-store photo, and whether it is the photo's class.
    catalogue_paths = sorted((GROCERY / "catalogue").glob("*.jpg"))
    catalogue = load_photos(catalogue_paths)
    classes = np.array([p.stem for p in catalogue_paths])
    truth = np.array([p.parent.name for p in held_out])
    top_fp32 = (photos_fp32 @ fp32.embed(catalogue).T).argmax(axis=1)
    top_int8 = (photos_int8 @ int8.embed(catalogue).T).argmax(axis=1)
    return {
        "dir": str(out_dir),
        "cosine_vs_fp32_mean": float(cos.mean()),
        "cosine_vs_fp32_min": float(cos.min()),
        "nearest_catalogue_agreement": float((top_fp32 == top_int8).mean()),
        "catalogue_top1_accuracy_fp32": float((classes[top_fp32] == truth).mean()),
        "catalogue_top1_accuracy_int8": float((classes[top_int8] == truth).mean()),
        "held_out_photos": len(held_out),
    }


# -- measurement (one fresh process each) ------------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    threads: int = spec["threads"]
    seconds: float = spec["seconds"]
    batches: list[int] = spec["batches"]
    models_dir = Path(spec["models_dir"])
    photos = bench_photos()
    result: dict[str, Any] = {k: spec[k] for k in ("threads", "backend", "runtime", "variant")}

    import onnxruntime as ort

    from embeddings.onnx_embedder import OnnxEmbedder
    from embeddings.preprocess import PreprocessConfig, preprocess_batch
    from service.settings import ModelSettings

    settings = ModelSettings.model_validate({"intra_op_threads": threads, **spec.get("settings", {})})
    if spec["runtime"] == "onnxruntime":
        level = getattr(ort.GraphOptimizationLevel, spec.get("optimization", "ORT_ENABLE_ALL"))
        if "dir" in spec:
            folder = Path(spec["dir"])
            model_path, cfg = folder / "model.onnx", PreprocessConfig.read(folder)
        else:
            model_path, cfg = exported_model(spec["backend"], models_dir, settings)
        emb = OnnxEmbedder(spec["backend"], model_path, cfg, intra_op_threads=threads, optimization=level)
        for b in batches:
            batch_images = photos[:b]
            tensor = preprocess_batch(emb.config, batch_images)
            result[f"model_b{b}"] = images_per_second(partial(emb.run_preprocessed, tensor), b, seconds)
            result[f"e2e_b{b}"] = images_per_second(partial(emb.embed, batch_images), b, seconds)
        result["model_id"] = emb.model_id
        return result

    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    _, cfg = exported_model(spec["backend"], models_dir, settings)
    model: Any
    if spec["backend"] == "effnet":
        from embeddings.effnet import load_effnet_torch

        model = load_effnet_torch()
    else:
        from embeddings.openclip import OpenClipSource, load_openclip_torch

        clip, _, _ = load_openclip_torch(OpenClipSource.from_settings(settings))
        model = clip.visual
    channels_last = spec["variant"].endswith("channels_last")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    def run(t: torch.Tensor) -> None:
        with torch.inference_mode():
            model(t)

    for b in batches:
        pixels = torch.from_numpy(np.asarray(preprocess_batch(cfg, photos[:b]), dtype=np.float32))
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        result[f"model_b{b}"] = images_per_second(partial(run, pixels), b, seconds)
    return result


def run_isolated(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True, text=True, check=False, cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measurement {spec['backend']}/{spec['variant']} failed:\n{done.stderr[-3000:]}")
    parsed: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return parsed


# -- report ------------------------------------------------------------------------------------------


def ratios(results: list[dict[str, Any]], batches: list[int]) -> None:
    """ONNX/torch for each ONNX row, against the fastest torch eager variant of the same backend at the
    same thread count."""
    for row in results:
        if row["runtime"] != "onnxruntime":
            continue
        torch_rows = [
            r
            for r in results
            if r["backend"] == row["backend"] and r["runtime"] == "torch" and r["threads"] == row["threads"]
        ]
        for b in batches:
            if torch_rows:
                best = max(r[f"model_b{b}"] for r in torch_rows)
                row[f"ratio_b{b}"] = row[f"model_b{b}"] / best


def print_table(results: list[dict[str, Any]], batches: list[int], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    load = meta["load_average"]
    table = Table(title=f"embedding throughput, images/s ({meta['cpu']}, load average {load})")
    for col in ("threads", "backend", "runtime", "variant"):
        table.add_column(col)
    for b in batches:
        table.add_column(f"model b{b}", justify="right")
    for b in batches:
        table.add_column(f"e2e b{b}", justify="right")
    for b in batches:
        table.add_column(f"ONNX/torch b{b}", justify="right")

    def fmt(v: float | None, suffix: str = "") -> str:
        return "-" if v is None else f"{v:.1f}{suffix}" if v >= 10 else f"{v:.2f}{suffix}"

    for r in results:
        table.add_row(
            str(r["threads"]), r["backend"], r["runtime"], r["variant"],
            *(fmt(r.get(f"model_b{b}")) for b in batches),
            *(fmt(r.get(f"e2e_b{b}")) for b in batches),
            *(fmt(r.get(f"ratio_b{b}"), "x") for b in batches),
        )
    console = Console(width=max(150, Console().width))
    console.print(table)
    if "effnet_int8" in meta:
        q = meta["effnet_int8"]
        console.print(
            f"effnet int8 vs fp32 on {q['held_out_photos']} held-out photos: cosine mean "
            f"{q['cosine_vs_fp32_mean']:.4f}, min {q['cosine_vs_fp32_min']:.4f}; nearest catalogue image "
            f"unchanged for {q['nearest_catalogue_agreement']:.1%}; nearest catalogue image of the right class: "
            f"fp32 {q['catalogue_top1_accuracy_fp32']:.1%}, int8 {q['catalogue_top1_accuracy_int8']:.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[os.cpu_count() or 1],
        help="intra-op threads for both runtimes; several values give one set of rows each",
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--backends", nargs="+", default=["sscd", "sscd_distilled", "effnet", "openclip"])
    parser.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture, or 'tiny'")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 effnet variant")
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "counterlens-bench-models"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta: dict[str, Any] = {"threads": args.threads, "cpu": cpu, "seconds": args.seconds,
                            "load_average": [round(x, 2) for x in os.getloadavg()]}
    common = {"seconds": args.seconds, "batches": args.batches, "models_dir": str(args.models_dir)}
    specs: list[dict[str, Any]] = []
    if "sscd" in args.backends:
        specs.append({"backend": "sscd", "runtime": "onnxruntime", "variant": "int8 (as packaged)"})
    if "sscd_distilled" in args.backends:
        specs.append(
            {"backend": "sscd_distilled", "runtime": "onnxruntime", "variant": "fp16 weights (as packaged)"}
        )
    if "effnet" in args.backends:
        specs += [
            {"backend": "effnet", "runtime": "onnxruntime", "variant": "fp32, ORT_ENABLE_ALL"},
            {"backend": "effnet", "runtime": "onnxruntime", "variant": "fp32, ORT_ENABLE_BASIC",
             "optimization": "ORT_ENABLE_BASIC"},
        ]
        if not args.no_int8:
            meta["effnet_int8"] = prepare_effnet_int8(args.models_dir)
            specs.append({"backend": "effnet", "runtime": "onnxruntime",
                          "variant": "int8 static QDQ (served: effnet_int8)", "dir": meta["effnet_int8"]["dir"]})
        specs += [
            {"backend": "effnet", "runtime": "torch", "variant": "eager"},
            {"backend": "effnet", "runtime": "torch", "variant": "eager channels_last"},
        ]
    if "openclip" in args.backends:
        clip = {"settings": prepare_openclip(args.models_dir, args.clip_arch)}
        specs += [
            {"backend": "openclip", "runtime": "onnxruntime", "variant": f"{args.clip_arch} fp32", **clip},
            {"backend": "openclip", "runtime": "torch", "variant": f"{args.clip_arch} eager", **clip},
        ]
    results = []
    for threads in args.threads:
        for spec in specs:
            what = f"{spec['backend']} / {spec['runtime']} / {spec['variant']}"
            print(f"measuring {what} with {threads} threads ...", file=sys.stderr)
            results.append(run_isolated({**common, **spec, "threads": threads}))
    meta["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    ratios(results, args.batches)
    print_table(results, args.batches, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
