"""Batch command line: attention maps for several images × several prompts, written to disk.

Loads the model once, generates for every (image, prompt) pair, and writes per pair a folder of
PNG overlays (per step/layer/head and one composite per token) plus a JSON log.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from attention_processor import RAW_ATTENTION, normalize_heatmap, token_heatmap, vision_share
from errors import InputError
from families import softmax_layers
from methods import METHODS
from model_holder import ModelHolder
from pictures.gallery import file_stem
from pictures.report import write_report
from records import AttentionRun
from utils import load_image
from visualization import COLORMAPS, labelled, overlay

logger = logging.getLogger(__name__)
AGGREGATES: tuple[str, ...] = ("mean", "none")


@dataclass(frozen=True)
class BatchSettings:
    """What to draw for every pair. Ranges are 0-based and inclusive; None means all."""

    layers: tuple[int, int] | None = None
    heads: tuple[int, int] | None = None
    steps: tuple[int, ...] | None = None  # step indices to draw; None = every generated token
    aggregate: str = "mean"  # mean: composites only | none: also every (layer, head)
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    colormap: str = "jet"
    alpha: float = 0.5
    report: bool = False  # also write an interactive report.html per pair


@dataclass(frozen=True)
class Failure:
    image_path: str
    prompt: str
    error: str


def parse_range(text: str) -> tuple[int, int]:
    """'LO-HI' or 'N' (0-based, inclusive) -> (lo, hi)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a range; write LO-HI such as 0-3, or one number.")
    lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
    if lo > hi:
        raise argparse.ArgumentTypeError(f"The range {text!r} is inverted; write the smaller number first.")
    return lo, hi


def parse_steps(text: str) -> tuple[int, ...] | None:
    """'all' -> None; '0,1,5' -> (0, 1, 5); '0-3' -> (0, 1, 2, 3); mixes such as '0-2,7' work too."""
    if text.strip().lower() == "all":
        return None
    steps: set[int] = set()
    for part in text.split(","):
        try:
            lo, hi = parse_range(part)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"Bad step spec {text!r}: use 'all', a list such as 0,1,5 or a range such as 0-3 "
                "(0-based token indices)."
            ) from None
        steps.update(range(lo, hi + 1))
    return tuple(sorted(steps))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Attention maps for several images × several prompts. Layer, head and step arguments "
        "are 0-based; output files are numbered from 1 (S1_L1_H1 = step 0, layer 0, head 0)."
    )
    parser.add_argument("--model", required=True, help="hub id or local folder")
    parser.add_argument("--images", nargs="+", default=[], metavar="IMAGE")
    parser.add_argument(
        "--methods",
        default=RAW_ATTENTION,
        help="with --manifest: comma-separated map methods to "
        f"score ({', '.join(METHODS)}, or all; default {RAW_ATTENTION})",
    )
    parser.add_argument(
        "--relative",
        action="store_true",
        help="with --manifest: also score each attention map "
        "divided by the generic-prompt map of the same image (one more model pass per item)",
    )
    parser.add_argument(
        "--per-head",
        action="store_true",
        help="with --manifest: also score every layer's and "
        "every (layer, head)'s map: heads.parquet/csv and the localisation plots",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="with --manifest: choose the best layer and "
        "head ranges on this share of the items (by id; items with a split column use it instead) "
        "and report them on the rest in ranges.json; implies --per-head",
    )
    parser.add_argument(
        "--knockout",
        default="",
        help="with --manifest: causal checks of the scored token, a comma list of box (block the target's "
        "image tokens from its query), topk (the attention map's as many top cells) and random (random "
        "regions of the box's shape); also a layer sweep, knockout.parquet/csv",
    )
    parser.add_argument(
        "--knockout-window", type=int, default=9, help="with --knockout: layers per window of the sweep"
    )
    parser.add_argument(
        "--knockout-draws", type=int, default=8, help="with --knockout: random control regions per item"
    )
    parser.add_argument(
        "--function-words",
        action="store_true",
        help="with --manifest: also score each method's maps of the answer's function words (the, a, of, ...: "
        "the share of the image below the map's Otsu threshold) against the object score, and their F1 as TAM "
        "reports it; function_words.parquet/csv",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per process (default: torch's own, which "
        "under torchrun or accelerate launch is 1 per process unless OMP_NUM_THREADS says otherwise)",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="a dataset study instead: a JSONL or CSV manifest of items "
        "with target boxes or masks, or a Hugging Face imagefolder (a folder with metadata.jsonl); "
        "scores go to --out (see study.py)",
    )
    parser.add_argument("--prompts", nargs="+", default=[], metavar="PROMPT")
    parser.add_argument("--prompts-file", type=Path, help="more prompts, one per non-empty line")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one subfolder per pair")
    parser.add_argument("--layers", type=parse_range, help="LO-HI, 0-based inclusive (default: all)")
    parser.add_argument("--heads", type=parse_range, help="LO-HI, 0-based inclusive (default: all)")
    parser.add_argument("--steps", type=parse_steps, default=None, help="all | 0,1,5 | 0-3 (default: all)")
    parser.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="mean",
        help="mean: one composite per token; none: also one PNG per (step, layer, head)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--min-new-tokens", type=int, default=0, help="keep generating at least this many")
    parser.add_argument("--colormap", choices=sorted(COLORMAPS), default="jet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--report", action="store_true", help="also write an interactive report.html per pair")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    return parser


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """Prompts from the command line, then from the file; empty lines are skipped."""
    found = [p for p in prompts if p.strip()]
    if prompts_file is not None:
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
            found += [line.strip() for line in lines if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(
                f"Could not read --prompts-file {prompts_file}: {err}. Give a UTF-8 text file with one prompt per line."
            ) from err
    if not found:
        raise InputError('No prompts given. Pass --prompts "question" ... or --prompts-file with one per line.')
    return found


def check_settings(settings: BatchSettings, num_layers: int | None = None, num_heads: int | None = None) -> None:
    """Raise ValueError naming the fix; model limits are checked when they are given."""
    if not 0.0 <= settings.alpha <= 1.0:
        raise InputError(f"--alpha must be between 0 and 1, got {settings.alpha}.")
    if settings.max_new_tokens < 1 or not 0 <= settings.min_new_tokens <= settings.max_new_tokens:
        raise InputError(
            f"Need 1 <= --max-new-tokens and 0 <= --min-new-tokens <= --max-new-tokens, got "
            f"{settings.max_new_tokens} and {settings.min_new_tokens}."
        )
    if settings.steps and settings.steps[-1] >= settings.max_new_tokens:
        raise InputError(
            f"--steps asks for step {settings.steps[-1]}, but at most {settings.max_new_tokens} "
            f"tokens are generated (steps 0-{settings.max_new_tokens - 1}); raise --max-new-tokens."
        )
    for what, bounds, count in (("layers", settings.layers, num_layers), ("heads", settings.heads, num_heads)):
        if bounds is not None and count is not None and bounds[1] >= count:
            raise InputError(
                f"--{what} {bounds[0]}-{bounds[1]} is outside the model, which has {count} {what} "
                f"(0-{count - 1}, 0-based); pick a range inside it."
            )


def _save(picture: Image.Image, path: Path) -> str:
    picture.save(path, format="PNG", compress_level=1)  # fast: --aggregate none writes thousands of files
    return path.name


def write_maps(
    run: AttentionRun,
    image: Image.Image,
    folder: Path,
    layers: tuple[int, int],
    heads: tuple[int, int],
    steps: list[int],
    settings: BatchSettings,
) -> list[str]:
    """Composite (and, with aggregate 'none', per layer and head) overlays; returns the file names."""
    draw = dict(colormap=settings.colormap, alpha=settings.alpha, value_range=(0.0, 1.0))
    box, files = run.vision.image_box_xyxy, []
    for step_idx in steps:
        if settings.aggregate == "none":
            for layer_idx in run.layers_in(layers):
                for head_idx in range(heads[0], heads[1] + 1):
                    heat = token_heatmap(run, step_idx, (layer_idx, layer_idx), (head_idx, head_idx))  # (gh, gw)
                    picture = overlay(image, normalize_heatmap(heat), box, **draw)
                    files.append(_save(picture, folder / f"{file_stem(step_idx, layer_idx, head_idx)}.png"))
        heat = token_heatmap(run, step_idx, layers, heads, reduce="mean")  # (grid_h, grid_w)
        label = f"{file_stem(step_idx)}: {run.generated_tokens[step_idx]!r}"
        picture = labelled(overlay(image, normalize_heatmap(heat), box, **draw), label)
        files.append(_save(picture, folder / f"composite_{file_stem(step_idx)}.png"))
    return files


def _log(
    holder: ModelHolder,
    run: AttentionRun,
    image_path: str,
    prompt: str,
    layers,
    heads,
    steps,
    skipped,
    settings: BatchSettings,
    files: list[str],
) -> dict:
    first = run.layer_indices[0]
    shares = vision_share(run)[:, layers[0] - first : layers[1] - first + 1, heads[0] : heads[1] + 1]  # (T, l, h)
    tokens = [
        {
            "step_idx": t,
            "file_label": file_stem(t),
            "id": token_id,
            "token": token,
            "image_share": float(shares[t].mean()),
        }
        for t, (token_id, token) in enumerate(zip(run.generated_ids, run.generated_tokens, strict=True))
    ]
    parameters = {
        **asdict(settings),
        "layers": list(layers),
        "heads": list(heads),
        "steps": steps,
        "steps_skipped": skipped,
        "normalization": "minmax per map",
        "device": holder.device,
        "dtype": str(holder.dtype).replace("torch.", ""),
        "capture_method": run.settings.method,
    }
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_id": run.model_id,
        "family": run.family,
        "parameters": parameters,
        "image_path": image_path,
        "prompt": prompt,
        "output_text": holder.processor.tokenizer.decode(run.generated_ids, skip_special_tokens=True),
        "tokens": tokens,
        "vision": run.vision.to_dict(),
        "files": files,
        "numbering": "indices in this log are 0-based; file names are 1-based (S1_L1_H1 = step 0, layer 0, head 0)",
    }


def run_pair(
    holder: ModelHolder, image: Image.Image, image_path: str, prompt: str, folder: Path, settings: BatchSettings
) -> Path:
    """Generate for one pair and write its maps and log into `folder`; returns the log's path."""
    layers = settings.layers or (0, holder.num_layers - 1)
    heads = settings.heads or (0, holder.num_heads - 1)
    extra = {"min_new_tokens": settings.min_new_tokens} if settings.min_new_tokens else {}
    capture = [idx for idx in softmax_layers(holder.model) if layers[0] <= idx <= layers[1]]
    if not capture:
        raise InputError(
            f"Layers {layers[0]}-{layers[1]} have no softmax attention (linear attention only); pick "
            f"a range with one of {softmax_layers(holder.model)}."
        )
    run = holder.generate(image, prompt, max_new_tokens=settings.max_new_tokens, capture_layers=capture, **extra)
    wanted = list(range(run.num_steps)) if settings.steps is None else list(settings.steps)
    steps, skipped = [t for t in wanted if t < run.num_steps], [t for t in wanted if t >= run.num_steps]
    if skipped:
        logger.warning(
            "%s × %r: the model stopped after %d tokens, so steps %s have no map",
            image_path,
            prompt,
            run.num_steps,
            skipped,
        )
    folder.mkdir(parents=True, exist_ok=True)
    files = write_maps(run, image, folder, layers, heads, steps, settings)
    if settings.report:
        write_report(
            run,
            image,
            folder / "report.html",
            layers=layers,
            heads=heads,
            colormap=settings.colormap,
            alpha=settings.alpha,
        )
        files.append("report.html")
    log_path = folder / "run.json"
    log = _log(holder, run, image_path, prompt, layers, heads, steps, skipped, settings, files)
    log_path.write_text(json.dumps(log, indent=1, ensure_ascii=False), encoding="utf-8")
    return log_path


def _folder_name(image_no: int, image_path: str, prompt_no: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(image_path).stem)[:40] or "image"
    return f"{image_no:03d}_{stem}__prompt{prompt_no:02d}"


def run_batch(
    holder: ModelHolder, image_paths: list[str], prompts: list[str], out_dir: Path, settings: BatchSettings
) -> list[Failure]:
    """Every (image, prompt) pair, past any that fails; returns the failures."""
    failures: list[Failure] = []
    with logging_redirect_tqdm(), tqdm(total=len(image_paths) * len(prompts), unit="pair", desc="pairs") as bar:
        for image_no, image_path in enumerate(image_paths, start=1):
            try:
                image = load_image(image_path)
            except Exception as err:  # a bad file fails its pairs, never the batch
                failures += [Failure(image_path, prompt, f"{type(err).__name__}: {err}") for prompt in prompts]
                bar.update(len(prompts))
                continue
            for prompt_no, prompt in enumerate(prompts, start=1):
                folder = Path(out_dir) / _folder_name(image_no, image_path, prompt_no)
                try:
                    run_pair(holder, image, image_path, prompt, folder, settings)
                except Exception as err:  # one failing pair must not stop the others; reported at the end
                    logger.debug("pair failed", exc_info=True)
                    failures.append(Failure(image_path, prompt, f"{type(err).__name__}: {err}"))
                bar.update(1)
    return failures


def _report_failures(failures: list[Failure], total: int) -> None:
    print(f"{len(failures)} of {total} pairs failed:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure.image_path} × {failure.prompt!r}: {failure.error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the batch; 0 when every pair worked, 1 when any failed, 2 (SystemExit) on bad arguments."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = BatchSettings(
        layers=args.layers,
        heads=args.heads,
        steps=args.steps,
        aggregate=args.aggregate,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        colormap=args.colormap,
        alpha=args.alpha,
        report=args.report,
    )
    if args.manifest is not None:
        return _study(parser, args)
    if not args.images:
        parser.error("give --images (with --prompts), or --manifest for a dataset study")
    try:
        prompts = read_prompts(args.prompts, args.prompts_file)
        check_settings(settings)
        holder = ModelHolder.load(args.model, device=args.device, dtype=args.dtype)
        check_settings(settings, holder.num_layers, holder.num_heads)
    except (ValueError, RuntimeError, OSError) as err:
        parser.error(str(err))
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        logger.warning("not found, will be reported as failed: %s", ", ".join(missing))
    failures = run_batch(holder, args.images, prompts, args.out, settings)
    total = len(args.images) * len(prompts)
    if failures:
        _report_failures(failures, total)
        return 1
    print(f"All {total} pairs written to {args.out}")
    return 0


def _processes(device: str):
    """The processes that `accelerate launch` or `torchrun` started, as accelerate sees them (this one alone
    when run plainly). CPU processes talk over gloo."""
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def _study(parser: argparse.ArgumentParser, args) -> int:
    """`--manifest`: score every item's maps against its target; 0 when every row was scored, else 1.
    Under several processes each loads the model on its own device and scores its share of the items."""
    from study.items import StudySettings
    from study.outputs import method_table
    from study.runner import run_study

    if not args.manifest.exists():
        parser.error(f"no manifest {str(args.manifest)!r}: give a JSONL or CSV file, or an imagefolder")
    methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
    methods = tuple(METHODS) if methods == ("all",) else methods
    settings = StudySettings(
        layers=args.layers,
        heads=args.heads,
        max_new_tokens=args.max_new_tokens,
        methods=methods,
        relative=args.relative,
        per_head=args.per_head or args.val_fraction > 0,
        val_fraction=args.val_fraction,
        knockout=tuple(dict.fromkeys(name.strip() for name in args.knockout.split(",") if name.strip())),
        knockout_window=args.knockout_window,
        knockout_draws=args.knockout_draws,
        function_words=args.function_words,
    )
    state = _processes(args.device)
    device = args.device  # one process: 'auto' spreads a large model over the GPUs (device_map)
    if state.num_processes > 1:
        device = "cpu" if state.device.type == "cpu" else f"cuda:{state.local_process_index}"
    try:
        settings.check()
        holder = ModelHolder.load(args.model, device=device, dtype=args.dtype)
        check_settings(BatchSettings(layers=args.layers, heads=args.heads), holder.num_layers, holder.num_heads)
        logger.info(
            "process %d of %d: %s, %d torch threads",
            state.process_index + 1,
            state.num_processes,
            device,
            torch.get_num_threads(),
        )
        results, problems = run_study(holder, args.manifest, args.out, settings, state)
    except (ValueError, RuntimeError, OSError) as err:
        parser.error(str(err))
    finally:
        if torch.distributed.is_initialized():  # no collective follows the merge
            torch.distributed.destroy_process_group()
    if not state.is_main_process:
        return 0
    for problem in problems:
        logger.warning(problem)
    if len(results):
        print("\n".join(method_table(results)) + "\n")
    print(
        f"{results['item_id'].nunique()} items scored with {', '.join(methods)}, {len(problems)} problems; "
        f"results in {args.out}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
