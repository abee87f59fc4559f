"""DoRA's cost in one adapted linear layer, peftcli's against HF peft's, beside plain LoRA.

    python benchmarks/dora_layer.py                       # MiniLM's and SmolLM2-135M's layer shapes
    python benchmarks/dora_layer.py --tokens 2048 --repeats 30

For each (in, out) shape it times a training step of the layer alone (forward, backward of a fixed
random output gradient, no optimizer) in four forms: the frozen nn.Linear, LoRA, DoRA as peftcli
computes it, and DoRA as HF peft 0.21 computes it (`peft.tuners.lora.Linear` with use_dora), with
the same weights (the outputs are checked equal first). It also counts the bytes each keeps from the
forward pass for the backward pass (torch's saved-tensor hooks): the activation memory that grows with
the batch. One JSON line per shape, then a markdown table. The median of `--repeats` steps after
`--warmup`; run it on a quiet machine.

Where the two differ: HF peft forms the (out x in) matrix W + s*B@A at every forward (through an
(in x in) identity product) to take its row norms; peftcli caches the frozen ||W||^2 per row and adds
the cross terms from W A^T (r x out) and B (A A^T), so it never forms an (out x in) temporary.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, in_features, out_features): MiniLM's attention and feed-forward layers, then SmolLM2-135M's.
SHAPES = [
    ("MiniLM attention 384->384", 384, 384),
    ("MiniLM feed-forward 384->1536", 384, 1536),
    ("MiniLM feed-forward 1536->384", 1536, 384),
    ("SmolLM2 attention 576->576", 576, 576),
    ("SmolLM2 MLP 576->1536", 576, 1536),
    ("SmolLM2 MLP 1536->576", 1536, 576),
]


def layers(in_features: int, out_features: int, rank: int) -> dict[str, nn.Module]:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as HfLoraLinear

    from peftcli.methods.lora import LoraLinear

    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features)
    base.requires_grad_(False)
    lora = LoraLinear(base, rank, 2 * rank, 0.0, False)
    ours = LoraLinear(
        nn.Linear(in_features, out_features).requires_grad_(False), rank, 2 * rank, 0.0, False, use_dora=True
    )
    ours.base_layer.load_state_dict(base.state_dict())
    ours.start_dora()  # the cached norms of the weights just loaded
    config = LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True)
    hf_base = nn.Linear(in_features, out_features).requires_grad_(False)
    hf_base.load_state_dict(base.state_dict())
    hf = HfLoraLinear(hf_base, "default", config=config, r=rank, lora_alpha=2 * rank)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same trained-looking adapter in both DoRA layers and in LoRA
        a = torch.randn(rank, in_features, generator=g) * 0.05
        b = torch.randn(out_features, rank, generator=g) * 0.05
        m = ours.weight_norm() * (1 + 0.1 * torch.randn(out_features, generator=g))
        for layer in (lora, ours):
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        ours.lora_magnitude_vector.copy_(m)
        hf.lora_A["default"].weight.copy_(a)
        hf.lora_B["default"].weight.copy_(b)
        hf.lora_magnitude_vector["default"].weight.copy_(m)
    return {"frozen linear": base, "LoRA": lora, "DoRA (peftcli)": ours, "DoRA (HF peft)": hf}


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps from this forward for the backward (each storage once), less
    the parameters and the input (held anyway). A tensor saved by a graph the forward built and threw
    away (HF peft's B@A through an identity, whose result it detaches) is freed with it: not counted."""
    saved: list[tuple[weakref.ref, int, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    held = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    gc.collect()
    alive = {ptr: size for ref, ptr, size in saved if ref() is not None and ptr not in held}
    del out
    return sum(alive.values())


def step_seconds(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, warmup: int, repeats: int) -> float:
    times = []
    for i in range(warmup + repeats):
        started = time.perf_counter()
        layer(x).backward(grad)
        times.append(time.perf_counter() - started)
        for p in layer.parameters():
            p.grad = None
        x.grad = None
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="rows of the input (batch x sequence)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for label, n_in, n_out in SHAPES:
        forms = layers(n_in, n_out, args.rank)
        x = torch.randn(args.tokens, n_in, requires_grad=True)
        grad = torch.randn(args.tokens, n_out)
        with torch.no_grad():
            ours, hf = forms["DoRA (peftcli)"](x), forms["DoRA (HF peft)"](x)
        difference = float((ours - hf).abs().max())
        assert difference < 1e-4, f"{label}: the two DoRA layers disagree by {difference}"
        row = {"shape": label, "tokens": args.tokens, "rank": args.rank, "max_output_difference": difference}
        for name, layer in forms.items():
            layer.train()
            row[f"{name} ms"] = round(1000 * step_seconds(layer, x, grad, args.warmup, args.repeats), 3)
            row[f"{name} saved MB"] = round(saved_bytes(layer, x) / 2**20, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)

    names = ["frozen linear", "LoRA", "DoRA (peftcli)", "DoRA (HF peft)"]
    print(
        f"\n{args.tokens} tokens, rank {args.rank}, {args.threads} threads, torch {torch.__version__}; "
        "ms per forward+backward (median), and MB kept for the backward\n"
    )
    print(
        "| layer | "
        + " | ".join(names)
        + " | DoRA over LoRA: peftcli / HF peft | saved MB: LoRA / DoRA peftcli / DoRA HF |"
    )
    print("|---|" + "---|" * len(names) + "---|---|")
    for r in rows:
        over = (r["DoRA (peftcli) ms"] - r["LoRA ms"], r["DoRA (HF peft) ms"] - r["LoRA ms"])
        print(
            f"| {r['shape']} | "
            + " | ".join(f"{r[f'{n} ms']:.2f}" for n in names)
            + f" | +{over[0]:.2f} / +{over[1]:.2f} ms | {r['LoRA saved MB']:.2f} / "
            f"{r['DoRA (peftcli) saved MB']:.2f} / {r['DoRA (HF peft) saved MB']:.2f} |"
        )


if __name__ == "__main__":
    main()
