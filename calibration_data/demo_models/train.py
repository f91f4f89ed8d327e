"""Train the two tiny Mixture-of-Experts demo models that quantmoe's tests and docs quantize.

What it makes (each folder is a complete Hub-layout checkpoint, float16 safetensors,
with its tokenizer, a model card README.md and training_report.json):

    quantmoe/demo_models/mixtral-demo/    MixtralForCausalLM,   8 experts top-2
    quantmoe/demo_models/qwen2moe-demo/   Qwen2MoeForCausalLM, 16 experts top-4 + shared expert

Where the data comes from: ``quantmoe/data/python_docs_calib.jsonl`` only (the
Python 3.11 documentation, PSF licence; see calibration_data/README.md). The
held-out documents in ``quantmoe/data/python_docs_heldout.jsonl`` are read only to
measure the finished models. A few calibration documents are set aside as a
validation slice, which picks the epoch count and the best checkpoint, so the
held-out set never steers training.

Stages, in order:
  1. byte-level BPE tokenizer (vocab 4096) trained on the calibration documents;
  2. the token stream: documents joined with "\\n\\n" plus an end-of-text token,
     tokenized once (the held-out stream is the same join without the token);
  3. each model trained from its config with AdamW, bf16 autocast, cosine LR and a
     router load-balancing loss applied per MoE layer, once per candidate epoch
     count (8, 16, 24, ... until one overfits); the checkpoint with the lowest
     validation loss is kept, and retrained with a stronger balancing loss if an
     expert collapsed;
  4. held-out perplexity and per-expert token shares measured in float32 on the
     float16 checkpoint as saved, then the model card written.

The sizes below keep every matrix input dimension a multiple of 128, so GPTQ's
group size 128 divides each of them, and each checkpoint under 8 MB.

Usage:
    # on a GPU: about a minute per model on an H200 (the shipped models' exact
    # commands are in their cards: one model per call, written to /tmp, copied here)
    python calibration_data/demo_models/train.py
    # smoke test on CPU
    python calibration_data/demo_models/train.py --epochs 0.01 --batch-size 2 --out-dir /tmp/demo
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO_ROOT / "quantmoe" / "demo_models"  # where the shipped folders live (package data)
CALIB_JSONL = REPO_ROOT / "quantmoe" / "data" / "python_docs_calib.jsonl"
HELDOUT_JSONL = REPO_ROOT / "quantmoe" / "data" / "python_docs_heldout.jsonl"

EOS_TOKEN = "<|endoftext|>"
DOC_SEPARATOR = "\n\n"  # the same join as the perplexity protocol
MAX_CHECKPOINT_BYTES = 8_000_000


@dataclass(frozen=True)
class TrainConfig:
    """Training settings shared by both models; the defaults made the shipped models."""

    vocab_size: int = 4096
    context: int = 512  # tokens per window, training and evaluation alike
    batch_size: int = 64  # windows per step: 32k tokens, large enough to keep a GPU busy on a 4M-parameter model
    # Candidate lengths of the cosine schedule, in passes over the ~0.7M-token stream.
    # The data, not the GPU, limits these models: past some number of epochs they
    # memorise the stream, so several lengths are tried and the validation slice picks.
    # Longer ones are tried only while the previous one was still improving at its end.
    epochs: tuple[float, ...] = (8.0, 16.0, 24.0, 32.0, 48.0, 64.0)
    peak_lr: float = 3e-3  # tiny models tolerate a high rate
    min_lr_ratio: float = 0.1  # cosine ends at peak_lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only, not on norms or biases
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # Weight of the per-layer Switch-Transformer balancing loss (that paper used 0.01).
    # The configs' default 0.001 is tuned for large models; a stronger pull keeps every
    # expert of these tiny ones trained, while leaving the routing visibly uneven.
    router_aux_loss_coef: float = 0.02
    # An expert with less than this fraction of a uniform share on the validation
    # slice counts as collapsed; the chosen schedule is then rerun with the aux
    # coefficient multiplied by collapse_aux_multiplier.
    min_expert_share_ratio: float = 0.1
    collapse_aux_multiplier: float = 5.0
    val_fraction: float = 0.05  # share of calibration bytes set aside for validation
    evals_per_run: int = 20  # validation checks per schedule (best one kept)
    time_budget_s: float = 210.0  # per model; later candidates are skipped once spent
    seed: int = 0


@dataclass(frozen=True)
class DemoModel:
    """One demo architecture: how to build it and what its checkpoint must contain on disk."""

    name: str
    model_class: type
    config_class: type
    config: dict
    # Routers by exact module path ({layer} filled in), for the expert-share measurement.
    router_path: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    # Tensor names a Hub checkpoint of this architecture has ({layer}, {expert} filled in).
    expected_keys: tuple[str, ...] = field(default_factory=tuple)
    dense_layer_keys: tuple[str, ...] = field(default_factory=tuple)


def demo_models(tc: TrainConfig) -> list[DemoModel]:
    """The two shipped architectures (sizes from the project's issue 3)."""
    common = dict(
        vocab_size=tc.vocab_size,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tc.context,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=tc.router_aux_loss_coef,
        dtype="float16",  # the dtype the checkpoint is saved in
    )
    mixtral = DemoModel(
        name="mixtral-demo",
        model_class=MixtralForCausalLM,
        config_class=MixtralConfig,
        config=dict(common, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
        router_path="model.layers.{layer}.mlp.gate",
        moe_layers=(0, 1, 2, 3),
        num_experts=8,
        top_k=2,
        expected_keys=(
            "model.layers.{layer}.block_sparse_moe.gate.weight",
            "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
            "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
            "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        ),
    )
    qwen2moe = DemoModel(
        name="qwen2moe-demo",
        model_class=Qwen2MoeForCausalLM,
        config_class=Qwen2MoeConfig,
        config=dict(
            common,
            intermediate_size=512,  # the dense MLP of layer 0
            mlp_only_layers=[0],
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            norm_topk_prob=False,  # Qwen1.5-MoE's setting
            use_sliding_window=False,
        ),
        router_path="model.layers.{layer}.mlp.gate",
        moe_layers=(1, 2, 3),
        num_experts=16,
        top_k=4,
        expected_keys=(
            "model.layers.{layer}.mlp.gate.weight",
            "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
            "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
            "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
            "model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
            "model.layers.{layer}.mlp.shared_expert.up_proj.weight",
            "model.layers.{layer}.mlp.shared_expert.down_proj.weight",
            "model.layers.{layer}.mlp.shared_expert_gate.weight",
        ),
        dense_layer_keys=(
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
        ),
    )
    return [mixtral, qwen2moe]


# --- data ----------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def split_validation(docs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, validation): validation takes documents in SHA-256 order of a salted path
    until it holds `fraction` of the bytes, so the choice is fixed and independent of
    the corpus split (which hashes the bare path)."""
    order = sorted(docs, key=lambda d: hashlib.sha256(("validation:" + d["source"]).encode()).hexdigest())
    total = sum(len(d["text"].encode()) for d in docs)
    val, size = [], 0
    for doc in order:
        if size >= fraction * total:
            break
        val.append(doc)
        size += len(doc["text"].encode())
    val_names = {d["source"] for d in val}
    return [d for d in docs if d["source"] not in val_names], val


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE as in GPT-2: every byte is reachable, so no text is ever <unk>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,  # GPT-2 convention: one special token for all roles
        pad_token=EOS_TOKEN,
        model_max_length=TrainConfig.context,
    )


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> torch.Tensor:
    """The whole text tokenized once, no special tokens added: (N,) int64."""
    # verbose=False: the stream is meant to be longer than model_max_length.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows, trailing partial window dropped: (N // context, context)."""
    n = stream.numel() // context
    return stream[: n * context].view(n, context)


# --- measurement ---------------------------------------------------------------------


@torch.no_grad()
def mean_nll(model, windows_: torch.Tensor, batch: int, device: torch.device, autocast: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) over all predicted positions
    (context - 1 per window). Perplexity is exp of this."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows_.shape[0], batch):
        ids = windows_[i : i + batch].to(device)  # (B, T)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, output_router_logits=False).logits  # (B, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += ids[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def expert_shares(model, demo: DemoModel, windows_: torch.Tensor, batch: int, device: torch.device) -> dict:
    """Per MoE layer, the fraction of top-k routing assignments each expert received."""
    counts = {layer: torch.zeros(demo.num_experts, dtype=torch.long) for layer in demo.moe_layers}
    hooks = []
    for layer in demo.moe_layers:
        router = model.get_submodule(demo.router_path.format(layer=layer))

        def record(module, args, output, layer=layer):
            if isinstance(output, tuple):  # transformers 5 routers: (logits, scores, indices)
                indices = output[2]
            else:  # a plain linear router returns logits
                indices = output.topk(demo.top_k, dim=-1).indices
            counts[layer] += torch.bincount(indices.reshape(-1).cpu(), minlength=demo.num_experts)

        hooks.append(router.register_forward_hook(record))
    model.eval()
    try:
        for i in range(0, windows_.shape[0], batch):
            model(input_ids=windows_[i : i + batch].to(device), output_router_logits=False)
    finally:
        for h in hooks:
            h.remove()
    model.train()
    return {layer: (c / c.sum()).tolist() for layer, c in counts.items()}


# --- training ------------------------------------------------------------------------


def build_model(demo: DemoModel, tc: TrainConfig, tokenizer, device: torch.device):
    config = demo.config_class(
        **demo.config,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(tc.seed)
    model = demo.model_class(config).to(device=device, dtype=torch.float32)
    return model


def pick_experts_implementation(model, batch: torch.Tensor, device: torch.device) -> str:
    """transformers 5 runs experts through torch grouped_mm where it can; fall back to the
    per-expert loop if that kernel refuses this dtype or device (forward and backward)."""
    for impl in ("grouped_mm", "eager"):
        try:
            if hasattr(model, "set_experts_implementation"):
                model.set_experts_implementation(impl)
            elif impl != "eager":
                continue  # an older transformers without the switch runs its one implementation
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                model(input_ids=batch[:1])  # float32 path, used for evaluation
            return impl
        except (RuntimeError, NotImplementedError, ValueError) as err:
            print(f"  experts implementation {impl!r} failed ({str(err).splitlines()[0][:120]}); trying the next")
            model.zero_grad(set_to_none=True)
    raise RuntimeError("no experts implementation ran; see the errors above")


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warm-up, then cosine from peak_lr down to peak_lr * min_lr_ratio."""
    warmup = min(tc.warmup_steps, max(1, total // 10))  # short smoke-test runs still decay
    if step < warmup:
        return tc.peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return tc.peak_lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, computed for each MoE layer and averaged.

    router_logits: one (tokens, num_experts) tensor per MoE layer. Per layer,
    loss = num_experts * sum_e f_e * P_e, with f_e the fraction of tokens routed to e
    (top-k counts / tokens, summing to top_k) and P_e the mean router probability;
    perfectly even routing gives top_k.

    transformers' own `load_balancing_loss_func` sums f and P over all layers before
    multiplying them, so an expert that dies in one layer is hidden by the same index
    being busy in another; in the first training of mixtral-demo that left expert 5 of
    layer 2 with under 0.05% of the held-out tokens while that loss sat at its minimum,
    2.00. Balancing each layer on its own forbids that.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
        f = torch.zeros(num_experts, device=probs.device).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device)
        ) / probs.shape[0]  # (E,), sums to top_k
        losses.append(num_experts * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def train_one_schedule(model, demo, stream, val_windows, total_steps, tc, aux_coef, device, log_prefix):
    """One cosine schedule of `total_steps` from the model's current (initial) weights.
    Loss = next-token cross-entropy + aux_coef * per_layer_balance_loss.
    Returns (best validation NLL, step of best, CPU copy of best weights, log)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.peak_lr,
        betas=tc.betas,
        fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(tc.seed + 1)
    eval_every = max(1, total_steps // tc.evals_per_run)
    best = (float("inf"), -1, None)
    log = []
    running = torch.zeros((), device=device)
    running_aux = torch.zeros((), device=device)
    model.train()
    for step in range(total_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, tc)
        # Random windows of the stream; every window predicts context - 1 tokens.
        starts = torch.randint(0, stream.numel() - tc.context, (tc.batch_size,), generator=gen)
        ids = torch.stack([stream[s : s + tc.context] for s in starts.tolist()]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, output_router_logits=True)  # no labels: the loss is ours
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        aux = per_layer_balance_loss(out.router_logits, demo.num_experts, demo.top_k)
        (lm_loss + aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += lm_loss.detach()
        running_aux += aux.detach()
        if (step + 1) % eval_every == 0 or step + 1 == total_steps:
            n = (step % eval_every) + 1
            val = mean_nll(model, val_windows, 32, device, autocast=True)
            entry = {
                "step": step + 1,
                "train_loss": running.item() / n,  # cross-entropy only
                "aux_loss": running_aux.item() / n,
                "val_nll": val,
                "lr": opt.param_groups[0]["lr"],
            }
            log.append(entry)
            running.zero_()
            running_aux.zero_()
            print(
                f"  {log_prefix} step {step + 1}/{total_steps} loss {entry['train_loss']:.3f} "
                f"aux {entry['aux_loss']:.3f} val {val:.3f} (ppl {math.exp(val):.1f})"
            )
            if val < best[0]:
                best = (val, step + 1, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    return best[0], best[1], best[2], log


def check_checkpoint(demo: DemoModel, folder: Path) -> dict:
    """The saved checkpoint has the Hub tensor names and fits the size limit."""
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {str(f.get_slice(k).get_dtype()) for k in keys}
    missing = [
        pattern.format(layer=layer, expert=expert)
        for layer in demo.moe_layers
        for pattern in demo.expected_keys
        for expert in range(demo.num_experts)
        if pattern.format(layer=layer, expert=expert) not in keys
    ] + [k for k in demo.dense_layer_keys if k not in keys]
    if missing:
        raise RuntimeError(f"{weights} lacks Hub-layout tensors, e.g. {missing[:4]}; sample of what it has: {sorted(keys)[:8]}")
    size = weights.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise RuntimeError(f"{weights} is {size:,} bytes, over the {MAX_CHECKPOINT_BYTES:,}-byte limit; shrink the config")
    return {"tensors": len(keys), "bytes": size, "dtypes": sorted(dtypes)}


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def write_model_card(folder: Path, report: dict) -> None:
    r = report
    shares_rows = "\n".join(
        f"| {layer} | " + " | ".join(f"{s:.3f}" for s in shares) + f" | {min(shares):.3f} | {max(shares):.3f} |"
        for layer, shares in r["heldout"]["expert_share"].items()
    )
    n_exp = r["architecture"]["num_experts"]
    header = "| layer | " + " | ".join(f"e{e}" for e in range(n_exp)) + " | min | max |"
    rule = "|---" * (n_exp + 3) + "|"
    runs = "\n".join(
        f"| {c['epochs']:g} | {c['router_aux_loss_coef']:g} | {c['steps']} | {c['best_step']} | {c['best_val_nll']:.4f} "
        f"| {math.exp(c['best_val_nll']):.2f} | {c['seconds']:.0f} |"
        for c in r["training"]["candidates"]
    )
    cfg_json = json.dumps(r["architecture"]["config"], indent=2)
    copied = (
        f"\nThe folder it wrote was then copied to `quantmoe/demo_models/{r['name']}/`.\n"
        if "--out-dir" in r["command"]
        else ""
    )
    warning = r["training"]["collapse_warning"]
    collapse = f"\n**Warning:** {warning}; some experts are barely trained.\n" if warning else ""
    text = f"""# {r['name']}

A tiny {r['architecture']['class']} trained from scratch for quantmoe's tests and
examples: small enough to quantize on a laptop CPU in seconds, real enough that GPTQ's
effect shows in perplexity and every expert has been trained. It is not a useful
language model.

Written by `calibration_data/demo_models/train.py`; every number below is also in
`training_report.json`.

## Architecture

{r['architecture']['summary']}

- parameters: {r['architecture']['parameters']:,} (tied input/output embedding counted once)
- checkpoint: `model.safetensors`, float16, {r['checkpoint']['bytes']:,} bytes, {r['checkpoint']['tensors']} tensors,
  Hub tensor names (e.g. `{r['checkpoint']['example_key']}`)
- every matrix input dimension is a multiple of 128, so GPTQ group size 128 divides it
- tokenizer: byte-level BPE, vocabulary {r['tokenizer']['vocab_size']}, end-of-text token `{EOS_TOKEN}`,
  trained on the calibration documents only

<details><summary>config passed to {r['architecture']['config_class']}</summary>

```json
{cfg_json}
```
</details>

## Data

Calibration part of the Python 3.11 documentation (Debian `python3.11-doc`, PSF licence;
`quantmoe/data/python_docs_calib.jsonl`, see `calibration_data/README.md`):
{r['data']['train_documents']} documents ({r['data']['train_tokens']:,} tokens) for training and
{r['data']['val_documents']} documents ({r['data']['val_tokens']:,} tokens) set aside as a validation
slice that chose the schedule and checkpoint. Documents joined with "\\n\\n" + `{EOS_TOKEN}`, tokenized once.
The held-out documents (`quantmoe/data/python_docs_heldout.jsonl`) were used only for the measurements below.

## Training

| | |
|---|---|
| optimizer | AdamW, betas {tuple(r['training']['config']['betas'])}, weight decay {r['training']['config']['weight_decay']} (matrices only), grad clip {r['training']['config']['grad_clip']} |
| learning rate | peak {r['training']['config']['peak_lr']}, {r['training']['config']['warmup_steps']} warm-up steps, cosine to {r['training']['config']['min_lr_ratio']} x peak |
| precision | bf16 autocast, float32 master weights; saved as float16 |
| batch | {r['training']['config']['batch_size']} windows x {r['training']['config']['context']} tokens = {r['training']['tokens_per_step']:,} tokens per step |
| router aux loss | coefficient {r['training']['chosen']['router_aux_loss_coef']:g} on the Switch-Transformer balancing loss computed per MoE layer and averaged (`per_layer_balance_loss` in train.py; transformers' built-in one pools the layers and let an expert die) |
| experts implementation | `{r['training']['experts_implementation']}` |
| kept checkpoint | {r['training']['chosen']['epochs']:g}-epoch schedule, step {r['training']['chosen']['best_step']} of {r['training']['chosen']['steps']}: {r['training']['chosen']['tokens_seen']:,} tokens seen ({r['training']['chosen']['tokens_seen'] / r['data']['train_tokens']:.1f} epochs) |
| all schedules together | {r['training']['total_steps']} steps, {r['training']['total_tokens']:,} tokens |
| wall time | {r['training']['wall_time_s']:.0f} s for this model (all schedules, evaluation and saving) |
| device | {r['environment']['device']}, torch {r['environment']['torch']}, transformers {r['environment']['transformers']} |

Schedules tried, each from the same initial weights (validation NLL in nats per token; the
lowest is kept, unless its experts collapsed, which reruns it with a stronger aux loss):

| epochs | aux coefficient | steps | best step | val NLL | val ppl | seconds |
|---|---|---|---|---|---|---|
{runs}

## Held-out perplexity

**{r['heldout']['perplexity']:.3f}** (mean NLL {r['heldout']['mean_nll']:.4f} nats per token).

Protocol: the {r['heldout']['documents']} held-out documents' text joined with "\\n\\n", tokenized once with this
tokenizer (no special tokens added), {r['heldout']['tokens']:,} tokens split into {r['heldout']['windows']}
non-overlapping windows of {r['heldout']['context']} tokens (the trailing partial window dropped);
perplexity = exp(mean NLL over all predicted positions, {r['heldout']['context'] - 1} per window,
{r['heldout']['predicted_tokens']:,} in all). Measured in float32 on the float16 checkpoint as saved,
reloaded with `from_pretrained`, on {r['environment']['device']}.

## Expert token share on the held-out text

Fraction of top-{r['architecture']['top_k']} routing assignments each expert received (uniform would be {1 / n_exp:.3f}):

{header}
{rule}
{shares_rows}
{collapse}
## Reproduce

From the repository root (the calibration and held-out files must be present):

```
{r['command']}
```
{copied}
Data and licence: the text is the Python documentation, Copyright (c) 2001 Python Software Foundation,
under the PSF License Version 2 (`calibration_data/LICENSE-PSF.txt`). The weights are released with
quantmoe under Apache-2.0.
"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def train_demo(demo, tc, tokenizer, data, device, out_dir: Path, command: str, candidates) -> dict:
    started = time.time()
    print(f"== {demo.name}")
    model = build_model(demo, tc, tokenizer, device)
    init_state = copy.deepcopy(model.state_dict())
    probe = data["train_stream"][: 2 * tc.context].view(2, tc.context).to(device)
    impl = pick_experts_implementation(model, probe, device)
    model.load_state_dict(init_state)  # the probe's forward passes changed nothing, but be certain
    print(f"  experts implementation: {impl}")

    tokens_per_step = tc.batch_size * tc.context
    seconds_per_step = None  # measured by the first schedule, used to skip ones that would overrun
    results = []

    def run_schedule(epochs: float, aux_coef: float) -> tuple[dict, dict]:
        nonlocal seconds_per_step
        steps = max(1, round(epochs * data["train_stream"].numel() / tokens_per_step))
        model.load_state_dict(init_state)
        t0 = time.time()
        val, best_step, state, log = train_one_schedule(
            model, demo, data["train_stream"], data["val_windows"], steps, tc, aux_coef, device,
            f"[{epochs:g} ep, aux {aux_coef:g}]",
        )
        seconds_per_step = (time.time() - t0) / steps
        entry = {
            "epochs": epochs,
            "router_aux_loss_coef": aux_coef,
            "steps": steps,
            "best_step": best_step,
            "best_val_nll": val,
            "tokens_seen": best_step * tokens_per_step,
            "seconds": time.time() - t0,
            "log": log,
        }
        results.append(entry)
        return entry, state

    def fits_budget(epochs: float, budget_s: float) -> bool:
        if seconds_per_step is None:
            return True
        steps = round(epochs * data["train_stream"].numel() / tokens_per_step)
        return time.time() - started + steps * seconds_per_step <= budget_s

    best_overall = None
    for epochs in candidates:
        if results and results[-1]["best_step"] < 0.8 * results[-1]["steps"]:
            # The last schedule's validation loss bottomed out well before its end: the
            # model already memorises the stream, and a longer schedule only does so more.
            print(f"  the {results[-1]['epochs']:g}-epoch schedule overfitted; not trying {epochs:g} epochs")
            break
        if best_overall is not None and not fits_budget(epochs, tc.time_budget_s):
            print(f"  the {epochs:g}-epoch schedule would overrun the {tc.time_budget_s:.0f} s budget; skipped")
            break
        entry, state = run_schedule(epochs, tc.router_aux_loss_coef)
        if best_overall is None or entry["best_val_nll"] < best_overall[0]["best_val_nll"]:
            best_overall = (entry, state)

    # An expert that gets (almost) no tokens is untrained; the demo models exist to
    # exercise every expert, so such a run is redone with a stronger balancing loss.
    chosen, state = best_overall
    model.load_state_dict(state)
    val_shares = expert_shares(model, demo, data["val_windows"], 32, device)
    floor = tc.min_expert_share_ratio / demo.num_experts
    lowest = min(min(s) for s in val_shares.values())
    collapsed_note = None
    if lowest < floor:
        stronger = tc.router_aux_loss_coef * tc.collapse_aux_multiplier
        # The rerun may take the budget's slack (1.4x), never more: the GPU lease is short.
        if fits_budget(chosen["epochs"], 1.4 * tc.time_budget_s):
            print(f"  lowest expert share {lowest:.4f} < {floor:.4f}: retraining with router aux coefficient {stronger:g}")
            entry, state = run_schedule(chosen["epochs"], stronger)
            entry["retrained_because_min_share"] = lowest
            best_overall = (entry, state)
        else:
            collapsed_note = f"lowest expert share {lowest:.4f} < {floor:.4f}, no time left to retrain"
            print("  WARNING: " + collapsed_note)

    chosen, state = best_overall
    model.load_state_dict(state)
    # Recorded in config.json for whoever fine-tunes further (transformers applies it
    # with its all-layer formula; ours was per layer, see per_layer_balance_loss).
    model.router_aux_loss_coef = model.config.router_aux_loss_coef = chosen["router_aux_loss_coef"]
    model.to(torch.float16)
    folder = out_dir / demo.name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # safetensors is transformers 5's only format
    tokenizer.save_pretrained(folder)
    checkpoint = check_checkpoint(demo, folder)

    # Measure what ships: the float16 weights, reloaded and upcast to float32.
    reloaded = demo.model_class.from_pretrained(folder, dtype=torch.float32).to(device)
    heldout_windows = data["heldout_windows"]
    batch = 32 if device.type == "cuda" else 8
    nll = mean_nll(reloaded, heldout_windows, batch, device)
    shares = expert_shares(reloaded, demo, heldout_windows, batch, device)
    n_params = sum(p.numel() for p in reloaded.parameters())  # tied weights are one Parameter
    wall = time.time() - started

    report = {
        "name": demo.name,
        "architecture": {
            "class": demo.model_class.__name__,
            "config_class": demo.config_class.__name__,
            "summary": architecture_summary(demo),
            "config": {**demo.config, "router_aux_loss_coef": chosen["router_aux_loss_coef"]},
            "parameters": n_params,
            "num_experts": demo.num_experts,
            "top_k": demo.top_k,
            "moe_layers": list(demo.moe_layers),
        },
        "checkpoint": {**checkpoint, "example_key": demo.expected_keys[1].format(layer=demo.moe_layers[-1], expert=0)},
        "tokenizer": {"vocab_size": len(tokenizer), "eos_token": EOS_TOKEN},
        "data": {
            "train_documents": data["train_documents"],
            "train_tokens": data["train_stream"].numel(),
            "val_documents": data["val_documents"],
            "val_tokens": data["val_windows"].numel(),
        },
        "training": {
            "config": asdict(tc),
            "tokens_per_step": tokens_per_step,
            "experts_implementation": impl,
            "candidates": [{k: v for k, v in c.items()} for c in results],
            "chosen": {k: v for k, v in chosen.items() if k != "log"},
            "validation_expert_share_of_first_choice": {str(k): v for k, v in val_shares.items()},
            "collapse_warning": collapsed_note,
            "total_steps": sum(c["steps"] for c in results),
            "total_tokens": sum(c["steps"] for c in results) * tokens_per_step,
            "wall_time_s": wall,
        },
        "heldout": {
            "documents": data["heldout_documents"],
            "tokens": data["heldout_tokens"],
            "windows": heldout_windows.shape[0],
            "context": tc.context,
            "predicted_tokens": heldout_windows.shape[0] * (tc.context - 1),
            "mean_nll": nll,
            "perplexity": math.exp(nll),
            "expert_share": {str(k): v for k, v in shares.items()},
            "measured_dtype": "float32",
        },
        "environment": {
            "device": device_description(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "command": command,
    }
    (folder / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_model_card(folder, report)
    print(
        f"  {demo.name}: held-out ppl {math.exp(nll):.3f}, {checkpoint['bytes']:,} bytes, "
        f"min expert share {min(min(s) for s in shares.values()):.3f}, {wall:.0f} s"
    )
    return report


def architecture_summary(demo: DemoModel) -> str:
    c = demo.config
    attn = (
        f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} attention heads "
        f"/ {c['num_key_value_heads']} KV heads (head dim {c['hidden_size'] // c['num_attention_heads']}), "
        f"vocabulary {c['vocab_size']}, context {c['max_position_embeddings']}, tied embeddings"
    )
    if demo.model_class is MixtralForCausalLM:
        moe = (
            f"every layer a sparse MoE block: {c['num_local_experts']} experts, top-{c['num_experts_per_tok']}, "
            f"expert intermediate size {c['intermediate_size']} (SwiGLU: w1 gate, w3 up, w2 down)"
        )
    else:
        moe = (
            f"layer 0 a dense MLP (intermediate {c['intermediate_size']}); layers 1-3 sparse MoE blocks: "
            f"{c['num_experts']} experts, top-{c['num_experts_per_tok']}, expert intermediate size "
            f"{c['moe_intermediate_size']}, plus a shared expert (intermediate {c['shared_expert_intermediate_size']}) "
            f"scaled by a sigmoid `shared_expert_gate` (hidden -> 1)"
        )
    return f"{attn}; {moe}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEMO_DIR, help="where the model folders go")
    parser.add_argument("--epochs", type=str, default=None, help="comma-separated schedule lengths in epochs (default 8,16,24,32,48,64)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per step (default 64)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds per model before later schedules are skipped")
    parser.add_argument("--models", type=str, default="mixtral-demo,qwen2moe-demo", help="which demo models to train")
    args = parser.parse_args()

    overrides = {}
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.time_budget is not None:
        overrides["time_budget_s"] = args.time_budget
    if args.epochs is not None:
        overrides["epochs"] = tuple(float(e) for e in args.epochs.split(","))
    tc = TrainConfig(**overrides)
    command = "python calibration_data/demo_models/train.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # Evaluation is float32; TF32 matmuls would make it differ from a CPU re-measurement.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"device {device_description(device)}, torch {torch.__version__}, transformers {transformers.__version__}")

    t0 = time.time()
    calib = read_jsonl(CALIB_JSONL)
    heldout = read_jsonl(HELDOUT_JSONL)
    assert not {d["source"] for d in calib} & {d["source"] for d in heldout}, "calibration and held-out overlap"
    train_docs, val_docs = split_validation(calib, tc.val_fraction)
    tokenizer = train_tokenizer([d["text"] for d in calib], tc.vocab_size)
    heldout_stream = encode(tokenizer, DOC_SEPARATOR.join(d["text"] for d in heldout))
    data = {
        "train_stream": encode(tokenizer, (DOC_SEPARATOR + EOS_TOKEN).join(d["text"] for d in train_docs)),
        "val_windows": windows(encode(tokenizer, DOC_SEPARATOR.join(d["text"] for d in val_docs)), tc.context),
        "heldout_windows": windows(heldout_stream, tc.context),
        "heldout_tokens": heldout_stream.numel(),
        "heldout_documents": len(heldout),
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
    }
    print(
        f"tokenizer and streams in {time.time() - t0:.1f} s: train {data['train_stream'].numel():,} tokens "
        f"({len(train_docs)} docs), validation {data['val_windows'].numel():,}, held-out {data['heldout_tokens']:,}"
    )

    wanted = args.models.split(",")
    for demo in demo_models(tc):
        if demo.name in wanted:
            train_demo(demo, tc, tokenizer, data, device, args.out_dir, command, tc.epochs)


if __name__ == "__main__":
    main()
