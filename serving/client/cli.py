"""Command line of the client: `python -m serving.client {classify,embed,evaluate,info} --help`.

    python -m serving.client classify [--server HOST:PORT] [--json] [--top-k K] IMAGE...
        one line per file: FILE<TAB>label<TAB>probability (--json: one list, one object per input, in order:
        {"file", "label", "probability", "top_k": [{"label", "probability"}, ...], "rejected", "known_score"});
        a rejected input (not a digit) gets a REJECTED column; --save-inputs DIR also
        writes what the model saw for each file as DIR/NNNNN_NAME.png ("model_input" in --json)
    python -m serving.client embed --input DIR_OR_NPY --output OUT.npy [--batch-size 256] [--concurrency 4]
        a folder of images (searched recursively; a parent folder named 0-9 gives the label) or a uint8 .npy/IDX
        of digits → OUT.npy float32 [N, D] plus OUT.json (ids, labels, model); written to temp files and
        renamed, so an interrupted run never leaves a truncated output behind
    python -m serving.client evaluate --input IMAGES --labels LABELS [--json]
        classify a uint8 .npy/IDX of digits in batches and print the accuracy (and the manifest's, to compare)
    python -m serving.client info
Every command takes --connections N: N TCP connections, calls taking them in turn (a server started with
--workers N is reached on all its processes only through several connections).
Secured servers: --tls-ca CA.pem (or --tls for the system roots) [--tls-cert C --tls-key K for mutual TLS]
[--tls-server-name NAME] and --token T (default: env LSOFTMAX_AUTH_TOKEN) or --token-file F.
Exit status: 0 on success, 1 when the server or the input says no (the message names the file), 2 on usage
(argparse: unknown flags, bad values such as --batch-size 0, --token with --token-file, --tls-cert without
--tls-key), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from serving.client.arrays import ArrayFileError, load_digits, load_labels
from serving.client.library import DEFAULT_ADDRESS, FIT_CHOICES, INVERT_CHOICES, Client, ordered_map
from serving.client.security import add_client_args, check_client_args, client_kwargs

__all__ = ["get_args_parser", "main", "parse_args", "run_cli"]


class CliError(Exception):
    """A failure to report as `error: ...` with exit status 1."""


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser, images: bool = True) -> None:
    p.add_argument("--server", default=os.environ.get("LSOFTMAX_SERVER", DEFAULT_ADDRESS),
                   help="HOST:PORT of the server (env LSOFTMAX_SERVER)")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per request in seconds, retries included")
    p.add_argument("--connections", type=_at_least_one, default=1,
                   help="TCP connections to the server, calls taking them in turn: the kernel hands each connection "
                        "to one process of a server started with --workers N, so use N or more to reach them all")
    add_client_args(p)
    if images:
        p.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                       help="polarity of encoded images: auto inverts dark-on-light images")
        p.add_argument("--fit", choices=FIT_CHOICES, default="auto",
                       help="framing of encoded images: auto keeps 28x28 ones and fits others like MNIST")


def get_args_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m serving.client", description="Client of the L-Softmax digit server.",
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="label and probability per image file", formatter_class=fmt)
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print one JSON list, one object per input")
    p.add_argument("--top-k", type=_at_least_one, default=1, help="also list the k most probable classes")
    p.add_argument("--batch-size", type=_at_least_one, default=64, help="images per request")
    p.add_argument("--save-inputs", type=Path, default=None, metavar="DIR",
                   help="write what the model saw for each image as DIR/NNNNN_NAME.png (28x28, white on black), "
                        "to see why a label is wrong")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, GIF, BMP, TIFF, WebP)")

    p = sub.add_parser("embed", help="embeddings of a folder of images or a .npy of digits", formatter_class=fmt)
    _add_common(p)
    p.add_argument("--input", required=True, help="folder of images, or uint8 digits as .npy ([N,28,28], [N,784], "
                                                  "[N,1,28,28]) or IDX")
    p.add_argument("--output", required=True, type=Path, help="OUT.npy (float32 [N, D]); OUT.json is written beside it")
    p.add_argument("--labels", default=None, help="labels (.npy or IDX) to record for an array input")
    p.add_argument("--batch-size", type=_at_least_one, default=256, help="images per request")
    p.add_argument("--concurrency", type=_at_least_one, default=4, help="requests in flight")
    p.add_argument("--l2-normalize", action="store_true", help="unit-length embeddings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="accuracy of the served model on labelled digits", formatter_class=fmt)
    _add_common(p, images=False)
    p.add_argument("--input", required=True, help="uint8 digits: .npy ([N,28,28], [N,784], [N,1,28,28]) or IDX, "
                                                  "e.g. MNIST/raw/t10k-images-idx3-ubyte")
    p.add_argument("--labels", required=True, help="labels: .npy or IDX, e.g. MNIST/raw/t10k-labels-idx1-ubyte")
    p.add_argument("--batch-size", type=_at_least_one, default=256, help="images per request")
    p.add_argument("--concurrency", type=_at_least_one, default=4, help="requests in flight")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("info", help="what the server serves (GetModelInfo as JSON)", formatter_class=fmt)
    _add_common(p, images=False)
    return parser


class _NoProgress:
    """Stands in for tqdm where it is not installed (e.g. the slim serving image)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress(total: int, disable: bool, unit: str = "img"):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True)


def _name_failed_image(err: grpc.RpcError, names: list[str]) -> str:
    """Turn the server's 'image 3: reason' into 'FILE: reason' for the batch `names`."""
    details = err.details() or ""
    match = re.match(r"image (\d+): (.*)", details, re.DOTALL)
    if match and int(match.group(1)) < len(names):
        return f"{names[int(match.group(1))]}: {match.group(2)}"
    return f"{err.code().name}: {details}"


def _classify(client: Client, args) -> int:
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CliError(f"no such file: {', '.join(missing)}")
    if args.save_inputs is not None:
        args.save_inputs.mkdir(parents=True, exist_ok=True)
    rows = []
    for start in range(0, len(paths), max(1, args.batch_size)):
        chunk = paths[start:start + max(1, args.batch_size)]
        try:
            results = client.classify(chunk, top_k=args.top_k, invert=args.invert, fit=args.fit, timeout=args.timeout,
                                      return_inputs=args.save_inputs is not None)
        except grpc.RpcError as err:
            raise CliError(_name_failed_image(err, [str(p) for p in chunk])) from None
        for index, (path, r) in enumerate(zip(chunk, results), start=start):
            rows.append({"file": str(path), "label": r.label, "probability": round(float(r.probability), 6),
                         "top_k": [{"label": label, "probability": round(float(p), 6)} for label, p in r.top_k],
                         "rejected": bool(r.rejected), "known_score": round(float(r.known_score), 6)})
            if args.save_inputs is not None:
                rows[-1]["model_input"] = str(_save_input(args.save_inputs, index, path, r.model_input))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            line = f"{row['file']}\t{row['label']}\t{row['probability']:.4f}"
            if args.top_k > 1:
                line += "\t" + " ".join(f"{t['label']}:{t['probability']:.4f}" for t in row["top_k"])
            if row["rejected"]:
                line += "\tREJECTED: not a digit (known_score {:.4g})".format(row["known_score"])
            print(line)
    return 0


def _save_input(folder: Path, index: int, source: Path, pixels: np.ndarray | None) -> Path:
    """The 28x28 the model saw for the index-th file, as FOLDER/NNNNN_STEM.png (numbered: stems may repeat)."""
    from PIL import Image

    if pixels is None:
        raise CliError(f"{source}: the server did not return the model input (does it support return_inputs?)")
    target = folder / f"{index:05d}_{source.stem}.png"
    _atomic_write(target, lambda f: Image.fromarray(pixels, mode="L").save(f, format="PNG"))
    return target


def _image_files(folder: Path) -> list[Path]:
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in extensions
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """write(file) into a temp file beside `path`, fsync, rename, fsync the folder: readers see the old file or
    the whole new one, and the rename survives a crash. The file gets the usual mode (0666 less the umask), not
    mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _embed(client: Client, args) -> int:
    source, out = Path(args.input), args.output
    if out.suffix != ".npy":
        raise CliError(f"--output must end in .npy, got {out}")
    if not out.parent.is_dir():
        raise CliError(f"--output folder {out.parent} does not exist")
    options = dict(l2_normalize=args.l2_normalize, invert=args.invert, fit=args.fit, timeout=args.timeout)
    size = max(1, args.batch_size)
    if source.is_dir():
        files = _image_files(source)
        if not files:
            raise CliError(f"{source}: no image files found")
        ids = [str(p.relative_to(source)) for p in files]
        labels = [int(p.parent.name) if p.parent != source and p.parent.name.isdigit() else None for p in files]
        batches = [(i, files[i:i + size]) for i in range(0, len(files), size)]
        name = lambda i: str(files[i])  # noqa: E731
    else:
        try:
            digits = load_digits(source)
            labels = load_labels(args.labels).tolist() if args.labels else [None] * len(digits)
        except ArrayFileError as exc:
            raise CliError(str(exc)) from None
        if len(labels) != len(digits):
            raise CliError(f"{args.labels} has {len(labels)} labels for {len(digits)} images")
        ids = [str(i) for i in range(len(digits))]
        batches = [(i, digits[i:i + size]) for i in range(0, len(digits), size)]
        name = lambda i: f"{source}[{i}]"  # noqa: E731

    def run(batch):
        start, images = batch
        try:
            return client.embed(images, **options)
        except grpc.RpcError as err:
            raise CliError(_name_failed_image(err, [name(start + j) for j in range(len(images))])) from None

    model = client.info(timeout=args.timeout)
    with _progress(len(ids), args.no_progress) as bar:
        parts = list(ordered_map(run, batches, args.concurrency, lambda batch, _: bar.update(len(batch[1]))))
    vectors = np.concatenate(parts).astype(np.float32, copy=False)
    sidecar = {
        "output": out.name, "count": int(vectors.shape[0]), "dim": int(vectors.shape[1]), "dtype": "float32",
        "l2_normalized": args.l2_normalize, "input": str(source), "server": args.server,
        "model": {k: model.get(k) for k in ("model_name", "model_version", "backend", "device", "model_sha256")},
        "ids": ids, "labels": labels if any(label is not None for label in labels) else None,
    }
    _atomic_write(out.with_suffix(".json"), lambda f: f.write((json.dumps(sidecar, indent=1) + "\n").encode()))
    _atomic_write(out, lambda f: np.save(f, vectors))
    print(f"wrote {out} ({vectors.shape[0]} x {vectors.shape[1]} float32) and {out.with_suffix('.json')}")
    return 0


def _evaluate(client: Client, args) -> int:
    try:
        digits, labels = load_digits(args.input), load_labels(args.labels)
    except ArrayFileError as exc:
        raise CliError(str(exc)) from None
    if len(digits) != len(labels):
        raise CliError(f"{args.input} has {len(digits)} images but {args.labels} has {len(labels)} labels")
    model = client.info(timeout=args.timeout)
    start = time.perf_counter()
    with _progress(len(digits), args.no_progress) as bar:
        try:
            predicted, _, rejected = client.classify_array(digits, batch_size=args.batch_size,
                                                           concurrency=args.concurrency, progress=bar.update,
                                                           with_rejected=True)
        except grpc.RpcError as err:
            raise CliError(f"{err.code().name}: {err.details()}") from None
    seconds = time.perf_counter() - start
    correct = int((predicted == labels).sum())
    result = {
        "accuracy": 100.0 * correct / max(1, len(labels)), "correct": correct, "count": int(len(labels)),
        "seconds": round(seconds, 3), "images_per_second": round(len(labels) / seconds, 1) if seconds else None,
        "model": model.get("model_name"), "backend": model.get("backend"), "device": model.get("device"),
        "manifest_test_accuracy": model.get("test_accuracy"),
        "rejected": int(rejected.sum()), "rejection_rate": 100.0 * float(rejected.mean()) if len(rejected) else 0.0,
    }
    if args.json:
        print(json.dumps(result))
    else:
        line = (f"accuracy {result['accuracy']:.2f}% ({correct}/{len(labels)}) in {seconds:.1f} s "
                f"({result['images_per_second']} images/s) from {result['model']} ({result['backend']} on {result['device']})")
        if result["manifest_test_accuracy"] is not None:
            line += f"; manifest test_accuracy {result['manifest_test_accuracy']:.2f}%"
        line += f"; rejected as not a digit {result['rejection_rate']:.2f}% ({result['rejected']}/{len(labels)})"
        print(line)
    return 0


def _info(client: Client, args) -> int:
    print(json.dumps(client.info(timeout=args.timeout), indent=2))
    return 0


COMMANDS = {"classify": _classify, "embed": _embed, "evaluate": _evaluate, "info": _info}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line → arguments; usage errors exit 2 (argparse's convention)."""
    parser = get_args_parser()
    return check_client_args(parser, parser.parse_args(argv))


def main(args: argparse.Namespace) -> int:
    """Run one command; returns the exit status: 0 done, 1 the server, a file or the input said no."""
    try:
        with Client(args.server, timeout=args.timeout, connections=args.connections, **client_kwargs(args)) as client:
            return COMMANDS[args.command](client, args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as err:
        print(f"error: {args.server}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_cli(argv: list[str] | None = None) -> None:
    """`python -m serving.client ...`: exit 0 done, 1 runtime failure, 2 usage error, 130 interrupted."""
    sys.exit(main(parse_args(argv)))
