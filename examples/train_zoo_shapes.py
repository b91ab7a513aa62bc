"""Train the ``zoo:shapes`` model (caption encoder + pixel-space Flux transformer) from scratch.

Rectified flow, in the convention of ``FlowMatchEulerDiscreteScheduler``: ``x_s = (1 - s) x0 + s noise``,
the transformer sees ``timestep = s`` (the pipeline passes ``sigma * 1000 / 1000``) and predicts the
velocity ``noise - x0``. Data are generated on the training device every step (unlimited, never
repeated). The shipped weights are the EMA of the training weights, stored as float16 safetensors.

Reproduce the shipped model (H100, torch 2.11: 10.4 it/s, 400 s of training, ~7 min in all)::

    python examples/train_zoo_shapes.py --device cuda --steps 6000 --batch-size 512 --max-seconds 400

The shipped weights came from exactly that command: the time cap stopped it at step 4143 of the
6000-step cosine schedule (final loss ~0.019). For a run that does not depend on the GPU's speed use
``--steps 4000 --batch-size 512`` (about 390 s on an H100). On CPU the same script runs, only slower.

Write the sample grid of a trained model (CPU is fine)::

    python examples/train_zoo_shapes.py --grid-only --out accelkit/zoo/shapes/weights
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accelkit.zoo.shapes import build_pipeline  # noqa: E402
from accelkit.zoo.shapes.data import generate_batch  # noqa: E402
from accelkit.zoo.shapes.pipeline import image_ids, pack  # noqa: E402

DEFAULT_OUT = REPO / "accelkit" / "zoo" / "shapes" / "weights"
GRID_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle",
    "a white square on the left",
    "a black circle on the right",
    "a purple triangle at the top",
    "an orange square at the bottom",
    "a small red triangle",
    "a large blue circle",
    "a red circle left of a blue square",
    "a yellow triangle above a purple circle",
    "a white circle left of a green triangle",
    "an orange circle above a black square",
    "a red square , a green circle and a blue triangle",
    "a yellow circle , a white triangle and a purple square",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--max-seconds", type=float, default=None, help="stop early (and still save) after this long"
    )
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (CUDA)")
    p.add_argument("--grid", type=Path, default=None, help="also write a 4x4 sample grid PNG here")
    p.add_argument("--grid-only", action="store_true", help="only write the grid from the model in --out")
    return p.parse_args(argv)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    pipe = build_pipeline(seed=args.seed)
    transformer, text_encoder = pipe.transformer.to(device).train(), pipe.text_encoder.to(device).train()
    params = [*transformer.parameters(), *text_encoder.parameters()]
    n_params = sum(p.numel() for p in params)
    print(f"parameters: {n_params / 1e6:.2f}M  device: {device}", flush=True)
    ema = [p.detach().clone().float() for p in params]
    decay_params = [p for p in params if p.ndim >= 2]
    other_params = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": 0.01}, {"params": other_params, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        **({"fused": True} if device.type == "cuda" else {}),
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # The cuDNN attention backward fails on this model's shapes with torch 2.11 + cu130
        # ("mha_graph.execute ... is_good()"); flash / memory-efficient SDPA are fine.
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = torch.compile(transformer) if args.compile else transformer
    data_gen = torch.Generator(device=device).manual_seed(args.seed)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    img_ids = image_ids(32, 32, device, torch.float32)
    txt_ids = torch.zeros(text_encoder.config.max_length, 3, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    start, running, count, step = time.time(), 0.0, 0, 0
    for step in range(args.steps):
        batch = generate_batch(args.batch_size, generator=data_gen)
        b = args.batch_size
        # Caption dropout trains the unconditional branch that classifier-free guidance needs.
        keep = torch.rand(b, generator=noise_gen, device=device) >= args.caption_dropout
        keep_l = keep.tolist()
        captions = [c if k else "" for c, k in zip(batch.captions, keep_l, strict=True)]
        x0 = pack(batch.images)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        # Logit-normal sigmas concentrate training on mid noise levels, where content is decided.
        sigma = torch.sigmoid(torch.randn(b, generator=noise_gen, device=device))
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast:
            hidden, pooled = text_encoder(text_encoder.tokenize(captions))
            pred = model(
                hidden_states=x_t,
                timestep=sigma,
                encoder_hidden_states=hidden,
                pooled_projections=pooled,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            # EMA warms up so early weights do not dominate short runs.
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - decay)
        running += loss.detach()
        count += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - start
            print(
                f"step {step + 1}/{args.steps}  loss {running.item() / count:.4f}  "
                f"lr {lr_at(step, args):.2e}  {(step + 1) / elapsed:.1f} it/s  {elapsed:.0f}s",
                flush=True,
            )
            running, count = 0.0, 0
        if args.max_seconds is not None and time.time() - start > args.max_seconds:
            print(f"stopping early at step {step + 1}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    print(f"trained {step + 1} steps in {time.time() - start:.0f}s", flush=True)

    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    save(pipe, args.out)


def save(pipe, out: Path) -> None:
    """Save as float16 safetensors through a temporary folder, then swap it in (never half-written)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu", torch.float16)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 1e6:.2f} MB)", flush=True)


def write_grid(weights: Path, path: Path, seed: int = 0) -> None:
    """4x4 grid of samples (8x nearest upscale) with captions underneath, from the model in ``weights``."""
    from PIL import Image, ImageDraw

    from accelkit.zoo.shapes.pipeline import ShapesPipeline

    pipe = ShapesPipeline.from_pretrained(weights, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(GRID_PROMPTS))]
    images = pipe(GRID_PROMPTS, generator=generators, num_inference_steps=20).images
    tile, text_h = 256, 28
    grid = Image.new("RGB", (4 * tile, 4 * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, GRID_PROMPTS, strict=True)):
        x, y = (i % 4) * tile, (i // 4) * (tile + text_h)
        grid.paste(image.resize((tile, tile), Image.NEAREST), (x, y))
        draw.text((x + 4, y + tile + 6), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.grid_only:
        train(args)
    if args.grid is not None or args.grid_only:
        write_grid(args.out, args.grid or REPO / "examples" / "zoo_shapes_samples.png")


if __name__ == "__main__":
    main()
