"""How well the served pipeline reads digits as users send them: photos, scans, drawing pads, chalkboards.

    python -m bench.real_inputs --model-repository REPO [--kinds photo,scan,canvas,chalkboard,upscaled]
        [--count 1000] [--seed 0] [--cache-dir DIR] [--server HOST:PORT] [--preprocess module:function]
        [--strip docs/real_inputs_strip.png] [--save DIR] [--json]
    python -m bench.real_inputs --timing [--preprocess module:function]

--count MNIST *test* digits (a seeded random subset, the same digits for every kind) are rendered by the
generators of bench/real_inputs_render.py (image i of a kind depends only on --seed, the kind and the digit's
index), preprocessed by serving.images.decoding.decode_image (or --preprocess, any function with decode_image's
signature; `path/to/file.py:function` loads a file) and classified by the exported ONNX model in-process.
With --server the encoded files go to a running server instead (Client.classify, batches of 64), which
preprocesses them with its own pipeline. The clean accuracy is the same model on the same digits as MNIST
arrays, so the gap is what the capture + preprocessing costs. An image the preprocessing rejects counts as
wrong. --timing: median decode_image time (single thread, decoding included) of photo-like JPEGs at
640x480 and 4000x3000.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bench.real_inputs_render import EXTENSIONS, GENERATORS, photo

KINDS = tuple(GENERATORS)
ONNX_MODEL = Path("lsoftmax_mnist_onnx") / "1" / "model.onnx"
SERVER_BATCH = 64

Preprocess = Callable[[int, bytes], np.ndarray]
Model = Callable[[np.ndarray], np.ndarray]  # uint8 [N, 1, 28, 28] -> logits [N, 10]
Accepts = Callable[[np.ndarray], np.ndarray]  # uint8 [N, 1, 28, 28] -> bool [N]: taken for a digit (not rejected)


def load_test_digits(cache_dir: str | None, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, images uint8 [count, 28, 28], labels) of a seeded random subset of the 10,000 MNIST test digits."""
    from training.data import prepare_mnist

    raw = Path(prepare_mnist(cache_dir=cache_dir)) / "MNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8).astype(np.int64)
    ids = np.sort(np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False))
    return ids, images[ids], labels[ids]


def load_onnx_model(repository: str | Path) -> Model:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(Path(repository) / ONNX_MODEL), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        outputs = [session.run(["logits"], {"image": np.ascontiguousarray(batch[i:i + 256], np.uint8)})[0]
                   for i in range(0, len(batch), 256)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 10), np.float32)
    return run


def load_acceptance(repository: str | Path) -> Accepts | None:
    """The repository's "is this a digit?" answer: known_score >= the manifest's threshold, from the same ONNX
    graph; None for repositories without a fitted threshold or a known_score output (nothing is rejected there)."""
    import onnxruntime as ort

    threshold = (json.loads((Path(repository) / "manifest.json").read_text()).get("open_set") or {}).get("threshold")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(Path(repository) / ONNX_MODEL), options, providers=["CPUExecutionProvider"])
    if threshold is None or "known_score" not in [o.name for o in session.get_outputs()]:
        return None

    def accepts(batch: np.ndarray) -> np.ndarray:
        scores = [session.run(["known_score"], {"image": np.ascontiguousarray(batch[i:i + 256], np.uint8)})[0]
                  for i in range(0, len(batch), 256)]
        return np.concatenate(scores) >= threshold if scores else np.zeros(0, bool)
    return accepts


def load_function(spec: str) -> Preprocess:
    """'package.module:function' or 'path/to/file.py:function'."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise SystemExit(f"--preprocess {spec!r}: expected module:function or file.py:function")
    if module_name.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, function)


def default_preprocess() -> Preprocess:
    from serving.images.decoding import decode_image
    return decode_image


def render(kind: str, digits: np.ndarray, ids: np.ndarray, seed: int) -> list[bytes]:
    """Image i depends only on (seed, kind, ids[i]): the same digit renders the same at any --count."""
    generator, number = GENERATORS[kind], KINDS.index(kind)
    return [generator(digit, np.random.default_rng([seed, number, int(i)])) for digit, i in zip(digits, ids)]


def preprocess_all(files: Sequence[bytes], preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(seen uint8 [N, 28, 28], ok bool [N], per-image ms). A rejected image gives a blank field and ok False."""
    seen = np.zeros((len(files), 28, 28), np.uint8)
    ok = np.ones(len(files), bool)
    times = []
    for i, data in enumerate(files):
        started = time.perf_counter()
        try:
            seen[i] = preprocess(i, data)
        except Exception:  # noqa: BLE001 - a rejection is a wrong answer, whatever its type
            ok[i] = False
        times.append((time.perf_counter() - started) * 1000.0)
    return seen, ok, times


def classify_remote(files: Sequence[bytes], address: str) -> np.ndarray:
    from serving.client import Client

    predictions = np.full(len(files), -1, np.int64)
    with Client(address) as client:
        for start in range(0, len(files), SERVER_BATCH):
            chunk = files[start:start + SERVER_BATCH]
            try:
                predictions[start:start + len(chunk)] = [r.label for r in client.classify(list(chunk))]
            except Exception:  # noqa: BLE001 - one bad image fails its whole request: retry one by one
                for j, data in enumerate(chunk):
                    try:
                        predictions[start + j] = client.classify([data])[0].label
                    except Exception:  # noqa: BLE001
                        pass
    return predictions


def measure(digits: np.ndarray, labels: np.ndarray, ids: np.ndarray, kinds: Sequence[str], model: Model,
            preprocess: Preprocess | None = None, seed: int = 0, server: str | None = None,
            log: Callable[[str], None] = lambda _: None, accepts: Accepts | None = None) -> dict:
    """The benchmark's core: {"clean": {...}, "kinds": [row per kind], "samples": {kind: per-image details}}.
    accepts: the repository's open-set answer; rows then say how many of these real digits it takes for digits
    (an input the preprocessing refused counts as not accepted). Not measured through --server."""
    clean = model(digits[:, None]).argmax(axis=1)
    clean_correct = clean == labels
    clean_accepted = accepts(digits[:, None]) if accepts is not None else None
    rows, samples = [], {}
    for kind in kinds:
        started = time.perf_counter()
        files = render(kind, digits, ids, seed)
        log(f"{kind}: rendered {len(files)} images in {time.perf_counter() - started:.1f}s")
        seen, ok, times = preprocess_all(files, preprocess) if preprocess is not None else (None, None, [])
        if server is not None:
            predictions = classify_remote(files, server)
        else:
            predictions = np.where(ok, model(seen[:, None]).argmax(axis=1), -1)
        correct = predictions == labels
        rows.append({
            "kind": kind, "images": len(files), "accuracy": 100.0 * correct.mean(),
            "clean_accuracy": 100.0 * clean_correct.mean(),
            "gap": 100.0 * (clean_correct.mean() - correct.mean()),
            "rejected": int((predictions < 0).sum()),
            "preprocess_ms_median": statistics.median(times) if times else None,
            "clean_right_kind_wrong": int((clean_correct & ~correct).sum()),
            "accepted": (100.0 * (ok & accepts(seen[:, None])).mean()
                         if accepts is not None and server is None and seen is not None else None),
            "clean_accepted": None if clean_accepted is None else 100.0 * clean_accepted.mean(),
        })
        samples[kind] = {"files": files, "seen": seen, "predictions": predictions}
        log(f"{kind}: accuracy {rows[-1]['accuracy']:.1f}% (clean {rows[-1]['clean_accuracy']:.1f}%)")
    return {"clean": {"images": len(labels), "accuracy": 100.0 * clean_correct.mean(),
                      "accepted": None if clean_accepted is None else 100.0 * clean_accepted.mean()}, "kinds": rows,
            "samples": samples, "clean_predictions": clean}


def markdown(result: dict, command: str, pipeline: str) -> str:
    """The table; with an open-set answer, one more column: the share taken for digits (clean: same digits)."""
    open_set = any(r.get("accepted") is not None for r in result["kinds"])
    lines = [f"Pipeline: {pipeline}", "",
             "| kind | images | accuracy | clean accuracy (same digits) | gap (points) | rejected "
             "| preprocess median ms |" + (" accepted as digits (clean) |" if open_set else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if open_set else "")]
    for r in result["kinds"]:
        ms = "n/a" if r["preprocess_ms_median"] is None else f"{r['preprocess_ms_median']:.2f}"
        accepted = (" n/a |" if r.get("accepted") is None else
                    f" {r['accepted']:.1f}% ({r['clean_accepted']:.1f}%) |") if open_set else ""
        lines.append(f"| {r['kind']} | {r['images']} | {r['accuracy']:.1f}% | {r['clean_accuracy']:.1f}% | "
                     f"{r['gap']:.1f} | {r['rejected']} | {ms} |" + accepted)
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines)


def _thumbnail(data: bytes) -> np.ndarray:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if image.mode in ("RGBA", "LA", "P"):  # transparency shown over a light checkerboard, as image viewers do
        image = image.convert("RGBA")
        board = np.where((np.add.outer(np.arange(image.height), np.arange(image.width)) // 16) % 2, 235, 200)
        back = Image.fromarray(np.stack([board] * 3, -1).astype(np.uint8), "RGB")
        back.paste(image, (0, 0), image)
        image = back
    return np.asarray(image.convert("RGB"))


def write_strip(result: dict, labels: np.ndarray, path: str | Path, per_kind: int = 4) -> None:
    """Per kind, a few digits (failures first, those the clean digit got right before the others): the file ->
    what the model saw -> predicted label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in result["samples"] if result["samples"][k]["seen"] is not None]
    fig, axes = plt.subplots(len(kinds), 2 * per_kind, figsize=(2.0 * per_kind * 1.3, 1.7 * len(kinds)),
                             squeeze=False)
    for row, kind in enumerate(kinds):
        sample = result["samples"][kind]
        wrong = np.flatnonzero(sample["predictions"] != labels)
        clean = result.get("clean_predictions")
        if clean is not None:  # the capture's fault first: the same digit as an MNIST array was read right
            wrong = wrong[np.argsort(clean[wrong] != labels[wrong], kind="stable")]
        right = np.flatnonzero(sample["predictions"] == labels)
        n_wrong = min(len(wrong), per_kind // 2) if len(right) else min(len(wrong), per_kind)
        picks = list(wrong[:n_wrong]) + list(right[:per_kind - n_wrong])
        for col in range(per_kind):
            ax_in, ax_seen = axes[row, 2 * col], axes[row, 2 * col + 1]
            for ax in (ax_in, ax_seen):
                ax.set_xticks([]), ax.set_yticks([])
            if col >= len(picks):
                ax_in.axis("off"), ax_seen.axis("off")
                continue
            i = picks[col]
            ax_in.imshow(_thumbnail(sample["files"][i]))
            ax_seen.imshow(sample["seen"][i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            predicted, true = int(sample["predictions"][i]), int(labels[i])
            ax_seen.set_title(f"→ {predicted if predicted >= 0 else 'rejected'} (true {true})", fontsize=8,
                              color="black" if predicted == true else "red")
            if col == 0:
                ax_in.set_ylabel(kind, fontsize=9)
    fig.suptitle("input file → what the model saw (28x28) → predicted label", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_files(result: dict, ids: np.ndarray, labels: np.ndarray, folder: str | Path) -> None:
    from PIL import Image

    for kind, sample in result["samples"].items():
        out = Path(folder) / kind
        out.mkdir(parents=True, exist_ok=True)
        for data, i, y in zip(sample["files"], ids, labels):
            ext = EXTENSIONS.get(Image.open(io.BytesIO(data)).format, "bin")
            (out / f"{int(i):05d}_label{int(y)}.{ext}").write_bytes(data)


def timing(digits: np.ndarray, preprocess: Preprocess, sizes=((640, 480), (4000, 3000)), n: int = 20,
           seed: int = 0) -> list[dict]:
    """Median single-threaded preprocessing ms (decoding included) of photo-like JPEGs at each size."""
    rows = []
    for width, height in sizes:
        files = [photo(digits[i % len(digits)], np.random.default_rng([seed, 99, i]), size=(width, height))
                 for i in range(n)]
        preprocess_all(files[:1], preprocess)  # warm-up (imports, first allocation)
        _, ok, times = preprocess_all(files, preprocess)
        rows.append({"size": f"{width}x{height}", "images": n,
                     "kb_median": statistics.median(len(f) for f in files) / 1024,
                     "ms_median": statistics.median(times), "ms_max": max(times), "rejected": int((~ok).sum())})
    return rows


def timing_markdown(rows: list[dict], command: str, pipeline: str) -> str:
    lines = [f"Pipeline: {pipeline}", "", "| photo JPEG | images | file KB (median) | median ms | max ms | rejected |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['size']} | {r['images']} | {r['kb_median']:.0f} | {r['ms_median']:.1f} | {r['ms_max']:.1f} | "
              f"{r['rejected']} |" for r in rows]
    return "\n".join(lines + ["", f"Command: `{command}`"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", help="exported model repository (reads lsoftmax_mnist_onnx/1/model.onnx)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, from " + ", ".join(KINDS))
    p.add_argument("--count", type=int, default=1000, help="MNIST test digits per kind")
    p.add_argument("--seed", type=int, default=0, help="picks the digits and the renders")
    p.add_argument("--cache-dir", default=None, help="MNIST cache root (default: training.data's)")
    p.add_argument("--server", default=None, help="classify through a running server (HOST:PORT) instead")
    p.add_argument("--preprocess", default=None, help="module:function or file.py:function with decode_image's "
                                                      "signature (default: serving.images.decoding.decode_image)")
    p.add_argument("--strip", default=None, help="write a picture strip (PNG) of a few digits per kind")
    p.add_argument("--save", default=None, help="write the generated files under DIR/KIND/")
    p.add_argument("--json", action="store_true", help="print JSON instead of the markdown table")
    p.add_argument("--timing", action="store_true", help="time preprocessing of 640x480 and 4000x3000 photos only")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    if not args.timing and not args.model_repository:
        p.error("--model-repository is required (except with --timing)")
    command = "python -m bench.real_inputs " + shlex.join(argv)
    pipeline = args.preprocess or "serving.images.decoding.decode_image"
    preprocess = load_function(args.preprocess) if args.preprocess else default_preprocess()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.timing:
        _, digits, _ = load_test_digits(args.cache_dir, 20, args.seed)
        rows = timing(digits, preprocess, seed=args.seed)
        print(json.dumps(rows, indent=1) if args.json else timing_markdown(rows, command, pipeline))
        return 0
    ids, digits, labels = load_test_digits(args.cache_dir, args.count, args.seed)
    model = load_onnx_model(args.model_repository)
    if args.server:
        pipeline = f"server {args.server}" + (f" (strip: {pipeline})" if args.strip else "")
    result = measure(digits, labels, ids, kinds, model, preprocess if (args.strip or not args.server) else None,
                     args.seed, args.server, log, accepts=load_acceptance(args.model_repository))
    if args.strip:
        write_strip(result, labels, args.strip)
        log(f"strip written to {args.strip}")
    if args.save:
        save_files(result, ids, labels, args.save)
        log(f"files written under {args.save}/")
    if args.json:
        print(json.dumps({"command": command, "pipeline": pipeline, "clean": result["clean"],
                          "kinds": result["kinds"]}, indent=1))
    else:
        print(markdown(result, command, pipeline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
