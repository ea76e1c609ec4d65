"""Training throughput: tokens per second through the training step (forward, backward,
AdamW) of ``training.loss.LossModel``, on real screens.

    python -m bench.train_throughput [--config demo|demo-state16|9b-layer] [--device cpu|cuda] [--steps 5] [--threads 1]
                                     [--precision float32 bf16] [--kernels auto torch]

Two batch shapes, as the demo pipeline trains: 16 single-screen questions (about 110
positions each, one 36-token image) and one 16-step RecallCode episode in the agent's
format (about 2,300 positions, 17 images). The first step is a warm-up and is not timed.
``9b-layer`` is LongLLaVA-9B's width (4096, 32 heads, 8 KV heads) at 8 layers with a
small tower, for a GPU; on CUDA the step runs in bf16 autocast with the reference kernels.
``--precision float32 bf16`` times both side by side (bf16 autocast; on a CPU without
native bf16 arithmetic, AVX512-BF16 or AMX, it is emulated and slow).
``--kernels auto torch`` times the training kernels side by side: ``auto`` takes the C++
scan on the CPU (``model.cpu_kernels``), ``torch`` the reference (``model.ops.training_kernels``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from model import ops
from model.config import LongLLaVAConfig, VisionConfig
from model.default import DEFAULT_CONFIG
from model.longllava import LongLLaVA
from model.tokenizer import ByteTokenizer
from training.collate import Collator
from training.data import Example
from training.loss import LossModel
from training.synthetic import SIZE, episode
from envs.render import render

CONFIGS = {
    "demo": DEFAULT_CONFIG,
    "demo-state16": DEFAULT_CONFIG.model_copy(update=dict(mamba_d_state=16)),  # Jamba's, and the weights before 8
    "9b-layer": DEFAULT_CONFIG.model_copy(update=dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, num_experts=1,
        mamba_dt_rank="auto", mm_hidden_size=1024,
        vision_config=VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                                   image_size=168, projection_dim=768),
    )),
}


def question_batch() -> list[Example]:
    out = []
    for k in range(16):
        ep = episode("ClickTarget", 50_000 + k, difficulty="easy")
        screen = ep.screens[0]
        out.append(Example(f"q{k}", (("user", f"<img><image></img>\n{screen.instruction}"), ("assistant", "click(500, 500)")),
                           (render(screen, SIZE, SIZE),)))
    return out


def episode_batch() -> list[Example]:
    ep = episode("RecallCode", 60_000, difficulty="easy", memory_span=16)
    turns = []
    for t, screen in enumerate(ep.screens):
        turns += [("user", ("Reply with one action.\n" if t == 0 else "") + f"<img><image></img>\n{screen.instruction}"),
                  ("assistant", "wait()" if t < len(ep.screens) - 1 else 'type("ABCD")')]
    return [Example("episode", tuple(turns), tuple(render(s, SIZE, SIZE) for s in ep.screens))]


def measure(config: LongLLaVAConfig, device: str, samples: list[Example], steps: int, bf16: bool) -> dict:
    torch.manual_seed(0)
    model = LongLLaVA(config).to(device)
    loss_model = LossModel(model, gradient_checkpointing=device == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Collator(config, ByteTokenizer(), max_length=1 << 16)(samples)
    times = []
    for step in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss, n = loss_model(batch)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - tick)
    seconds = sorted(times)[len(times) // 2]
    return {"samples": len(samples), "positions": batch.tokens, "step_s": round(seconds, 3),
            "tokens_per_s": round(batch.tokens / seconds), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", nargs="+", choices=["float32", "bf16"], help="default: bf16 on CUDA, else float32")
    parser.add_argument("--kernels", nargs="+", choices=["auto", "torch"], default=["auto"])
    args = parser.parse_args(argv)
    precisions = args.precision or ["bf16" if args.device.startswith("cuda") else "float32"]
    torch.set_num_threads(args.threads)
    result = {"config": args.config, "device": args.device, "threads": args.threads, "torch": torch.__version__,
              "training_kernels": {k: _kernels_name(k, args.device) for k in args.kernels}}
    for name, samples in (("questions", question_batch()), ("episode", episode_batch())):
        keys = []
        for precision, kernels in itertools.product(precisions, args.kernels):
            key = "-".join([name] + [v for v, all_ in ((precision, precisions), (kernels, args.kernels)) if len(all_) > 1])
            with ops.use_kernels(kernels):
                result[key] = measure(CONFIGS[args.config], args.device, samples, args.steps, precision == "bf16")
            print(key, json.dumps(result[key]), flush=True)
            keys.append(key)
        for first, other in itertools.combinations(keys, 2):
            print(f"{first} is {result[other]['step_s'] / result[first]['step_s']:.2f}x as fast as {other}")
    print(json.dumps(result))
    return 0


def _kernels_name(choice: str, device: str) -> str:
    with ops.use_kernels(choice):
        return ops.training_kernels(device).__name__


if __name__ == "__main__":
    raise SystemExit(main())
