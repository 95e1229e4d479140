"""Train the small byte-level Mixtral that moewatch ships (``moewatch/assets/router_model/``).

    python benchmarks/train_router_model.py            # ~4-6 min on 2 CPU cores
    python benchmarks/train_router_model.py --check    # only print the routing checks of the shipped model

A 4-layer, 8-expert, top-2 ``MixtralForCausalLM`` over bytes, trained on the Python standard
library's own source files (1 file in 10 held out, chosen by a hash of its name), with the
auxiliary load-balancing loss (per router), so each router is learned: balanced load across experts, but a
confident, token-dependent choice per token. The script prints and records checks of that.
Deterministic for a given Python stdlib (fixed seeds, sorted file list).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moewatch import pretrained  # noqa: E402

TOKEN_KINDS = {  # byte classes whose routing the checks compare
    "letter": set(range(ord("a"), ord("z") + 1)) | set(range(ord("A"), ord("Z") + 1)),
    "digit": set(range(ord("0"), ord("9") + 1)),
    "space": {ord(" "), ord("\n"), ord("\t")},
    "punct": set(b"()[]{}:.,=+-*/'\"#_<>!%&|@"),
}


def build_model(seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**pretrained.MODEL_CONFIG, router_aux_loss_coef=0.05)
    config._attn_implementation = "sdpa"
    try:  # one grouped matmul per layer instead of a Python loop over experts: ~2x faster on CPU
        config._experts_implementation = "grouped_mm"
    except (ValueError, KeyError):
        pass
    return MixtralForCausalLM(config)


def per_layer_aux_loss(router_logits, config) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss of each layer, averaged over layers.

    transformers' Mixtral sums the expert loads of all layers before taking the loss, so an
    expert idle in one layer and busy in another looks balanced; each router is balanced on
    its own here (2.0 = perfectly balanced for top-2).
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    losses = [load_balancing_loss_func((logits,), config.num_local_experts, config.num_experts_per_tok)
              for logits in router_logits]
    return torch.stack(losses).mean()


@torch.no_grad()
def heldout_loss(model, batches: int = 8, batch_size: int = 16) -> float:
    model.eval()
    losses = [model(input_ids=x, labels=x).loss.item()
              for x in pretrained.heldout_batches(batch_size, seed=123, count=batches)]
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def routing_checks(model, batches: int = 8, batch_size: int = 16) -> dict:
    """Is each router learned? Load balance, per-token confidence, dependence on token kind."""
    model.eval()
    num_experts = model.config.num_local_experts
    layers = model.config.num_hidden_layers
    kind_counts = {k: np.zeros((layers, num_experts)) for k in TOKEN_KINDS}
    load = np.zeros((layers, num_experts))
    top1 = np.zeros(layers)
    entropy = np.zeros(layers)
    tokens = 0
    for x in pretrained.heldout_batches(batch_size, seed=7, count=batches):
        out = model(input_ids=x, output_router_logits=True)
        flat = x.reshape(-1).numpy()
        for layer, logits in enumerate(out.router_logits):
            probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
            chosen = torch.topk(probs, model.config.num_experts_per_tok, dim=-1).indices.numpy()  # [T, k]
            onehot = np.zeros(probs.shape)
            np.put_along_axis(onehot, chosen, 1.0, axis=1)
            load[layer] += onehot.sum(0)
            top1[layer] += probs.max(-1).values.sum().item()
            entropy[layer] += torch.special.entr(probs).sum().item()
            for kind, members in TOKEN_KINDS.items():
                mask = np.isin(flat, list(members))
                kind_counts[kind][layer] += onehot[mask].sum(0)
        tokens += flat.size
    model.train()
    share = load / load.sum(1, keepdims=True)
    kind_share = {k: v / np.maximum(v.sum(1, keepdims=True), 1) for k, v in kind_counts.items()}
    # Largest total-variation distance between the expert shares of two token kinds, per layer.
    kinds = list(TOKEN_KINDS)
    tv = np.zeros(layers)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            tv = np.maximum(tv, 0.5 * np.abs(kind_share[a] - kind_share[b]).sum(1))
    load_entropy = -(share * np.log(np.maximum(share, 1e-12))).sum(1)
    return {
        "tokens": tokens,
        "load_share_max": share.max(1).round(4).tolist(),
        "load_share_min": share.min(1).round(4).tolist(),
        "load_entropy_over_log_n": (load_entropy / math.log(num_experts)).round(4).tolist(),
        "token_entropy_over_log_n": (entropy / tokens / math.log(num_experts)).round(4).tolist(),
        "top1_prob_mean": (top1 / tokens).round(4).tolist(),
        "kind_tv_max": tv.round(4).tolist(),
        "kind_share_layer0": {k: v[0].round(3).tolist() for k, v in kind_share.items()},
    }


def print_checks(checks: dict, num_experts: int) -> bool:
    """Print the checks; True when every layer's router is learned and token-dependent."""
    print(f"routing on {checks['tokens']} held-out tokens, per layer:")
    rows = zip(checks["load_share_max"], checks["load_share_min"], checks["load_entropy_over_log_n"],
               checks["token_entropy_over_log_n"], checks["top1_prob_mean"], checks["kind_tv_max"])
    print("  layer  max share  min share  load H/lnN  token H/lnN  top-1 prob  kind TV")
    ok = True
    for layer, (mx, mn, lh, th, t1, tv) in enumerate(rows):
        print(f"  {layer:5d}  {mx:9.3f}  {mn:9.3f}  {lh:10.3f}  {th:11.3f}  {t1:10.3f}  {tv:7.3f}")
        # balanced load; confident per token (well above 1/N); routing depends on token kind
        ok &= lh > 0.9 and th < 0.95 and t1 > 2.0 / num_experts and tv > 0.2
    print("  expert shares by token kind, layer 0:")
    for kind, share in checks["kind_share_layer0"].items():
        print(f"    {kind:6s} " + " ".join(f"{s:5.2f}" for s in share))
    print("router learned and token-dependent:", "yes" if ok else "NO")
    return ok


def train(args) -> None:
    torch.set_num_threads(args.threads)
    model = build_model(args.seed)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"MixtralForCausalLM: {params / 1e6:.2f} M parameters; "
          f"{len(pretrained.stdlib_files(False))} training files, {len(pretrained.stdlib_files(True))} held out")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    start = time.time()
    data = pretrained.training_batches(args.batch_size, seed=args.seed)
    for step in range(1, args.steps + 1):
        x = next(data)
        out = model(input_ids=x, output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        aux = per_layer_aux_loss(out.router_logits, model.config)
        loss = lm + model.config.router_aux_loss_coef * aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {lm.item():.3f}  aux {aux.item():.3f}  "
                  f"{time.time() - start:6.0f} s", flush=True)
    elapsed = time.time() - start
    loss = heldout_loss(model)
    print(f"trained {args.steps} steps in {elapsed:.0f} s; held-out loss {loss:.3f} nats/byte "
          f"({loss / math.log(2):.2f} bits/byte; uniform = 8)")
    checks = routing_checks(model)
    print_checks(checks, model.config.num_local_experts)
    info = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": pretrained.SEQ_LEN, "lr": args.lr,
            "seed": args.seed, "router_aux_loss_coef": model.config.router_aux_loss_coef,
            "train_seconds": round(elapsed), "heldout_loss_nats_per_byte": round(loss, 4),
            "python": sys.version.split()[0], "routing_checks": checks}
    pretrained.save_router_model(model, Path(args.out), info)
    print(f"saved to {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)  # OpenMP threads spin on a busy machine
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", default=str(pretrained.ASSET_DIR))
    parser.add_argument("--check", action="store_true", help="only check the shipped model")
    args = parser.parse_args()
    if args.check:
        model, _ = pretrained.load_router_model()
        ok = print_checks(routing_checks(model), model.config.num_local_experts)
        print(f"held-out loss {heldout_loss(model):.3f} nats/byte")
        sys.exit(0 if ok else 1)
    train(args)


if __name__ == "__main__":
    main()
