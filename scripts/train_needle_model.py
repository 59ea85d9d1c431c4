"""Train kvx's small needle-retrieval model from scratch, on CPU (or a GPU when there is one).

    python scripts/train_needle_model.py --out kvx/assets/needle-llama

What it builds:
- a word-level tokenizer over the generator's vocabulary (digits are single tokens), saved as a
  ``PreTrainedTokenizerFast`` (loads with ``AutoTokenizer``);
- a Llama-architecture model with GQA (hyper-parameters below), trained on prompts from
  ``kvx.eval.haystack`` (the generator ``kvx needle`` uses), loss on the answer tokens only,
  plus a small auxiliary next-token loss elsewhere, with a length curriculum; each stage re-warms
  the learning rate (raising the length with a high learning rate makes the loss spike);
- ``save_pretrained`` in safetensors, with ``training_log.jsonl``.

Every choice is seeded: the same command gives the same model on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvx.eval.haystack import VARIANTS, build_prompt, build_tokenizer, make_needles


@dataclass
class Stage:
    steps: int
    min_len: int
    max_len: int
    batch: int
    lr: float
    number_rate: float = 0.25  # filler sentences with numbers (0: the needle is the only number)
    variant_weights: tuple[float, ...] = (0.3, 0.45, 0.1, 0.15)  # single, multikey, multivalue, absent


EASY = (0.8, 0.2, 0.0, 0.0)
STAGES = [
    # copy circuit first: the needle's value is the only number around, mostly one needle
    Stage(steps=600, min_len=80, max_len=160, batch=32, lr=2e-3, number_rate=0.0, variant_weights=EASY),
    # then the real task: numbers in the filler, distractor keys, negatives, several values
    Stage(steps=1500, min_len=96, max_len=256, batch=32, lr=2e-3),
    Stage(steps=800, min_len=256, max_len=1024, batch=8, lr=1e-3),
    Stage(steps=600, min_len=1024, max_len=2048, batch=4, lr=7e-4),
    Stage(steps=400, min_len=2048, max_len=4096, batch=2, lr=4e-4),
]
LM_WEIGHT = 0.2  # auxiliary next-token loss on the non-answer tokens (helps copy circuits form)

MODEL = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=1e6,
    max_position_embeddings=16384,
    tie_word_embeddings=True,
)


def sample_batch(tokenizer, stage: Stage, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, T], labels [B, T])``: one length per batch (no padding), labels only on the answer."""
    length = rng.randint(stage.min_len, stage.max_len)
    rows, labels = [], []
    for _ in range(stage.batch):
        variant = rng.choices(VARIANTS, weights=stage.variant_weights)[0]
        spec = make_needles(variant, rng, distractors=rng.randint(1, 3), values=rng.randint(2, 3))
        answer = tokenizer(" " + spec.answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = build_prompt(
            tokenizer, length - len(answer), rng.uniform(0, 100), spec, rng, number_rate=stage.number_rate
        )
        rows.append(prompt.ids + answer)
        labels.append([-100] * len(prompt.ids) + answer)
    return torch.tensor(rows), torch.tensor(labels)


def training_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on the answer tokens + ``LM_WEIGHT`` x mean next-token loss elsewhere."""
    logits = model(ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    is_answer = labels[:, 1:] != -100
    return per_token[is_answer].mean() + LM_WEIGHT * per_token[~is_answer].mean()


@torch.no_grad()
def answer_accuracy(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Teacher-forced accuracy of the next-token prediction on answer tokens (cheap progress signal)."""
    predicted = model(ids).logits[:, :-1].argmax(-1)
    is_answer = labels[:, 1:] != -100
    return (predicted[is_answer] == ids[:, 1:][is_answer]).float().mean().item()


@torch.no_grad()
def quick_accuracy(model, tokenizer, length: int, count: int, seed: int, device) -> float:
    """Greedy exact match on single-needle prompts at random depths."""
    from kvx.eval.haystack import score_answer

    rng = random.Random(seed)
    model.eval()
    correct = 0.0
    for _ in range(count):
        spec = make_needles("single", rng)
        prompt = build_prompt(tokenizer, length, rng.uniform(0, 100), spec, rng)
        ids = torch.tensor([prompt.ids], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        correct += score_answer(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), spec.expected)
    model.train()
    return correct / count


CARD = """---
library_name: transformers
tags: [kvx, needle-in-a-haystack, synthetic]
---
# kvx needle-llama

A {params:,}-parameter Llama-architecture model (GQA: {heads} query / {kv_heads} KV heads, head dim
{head_dim}, {layers} layers, hidden {hidden}) trained from scratch by `scripts/train_needle_model.py`
(seed {seed}) on kvx's synthetic needle-in-a-haystack task (`kvx.eval.haystack`), so that kvx can
measure what KV-cache compression does to retrieval without downloading anything. It knows
nothing else: its whole world is filler sentences, needles and questions.

## Training

- Tokenizer: word level over the generator's vocabulary ({vocab} tokens), every digit a token.
- Loss: cross-entropy on the answer tokens, plus {lm_weight} x next-token loss on the other tokens.
- AdamW (betas 0.9/0.98, weight decay 0.01), gradient clipping 1.0; per stage a linear warm-up,
  a plateau, then a cosine decay over the last 40% of the stage.
- Curriculum (lengths in tokens; variant weights single / multikey / multivalue / absent):

{stages}

- Time: {minutes:.0f} minutes on {device}.

## Scores

{scores}
"""


def write_model_card(out: Path, seed: int, scores: str) -> None:
    """README.md of the saved model: architecture, curriculum, training time, measured scores."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines() if line.strip()]
    stages = "\n".join(
        f"  {i}. {st.steps} steps, lengths {st.min_len}-{st.max_len}, batch {st.batch}, lr {st.lr}, "
        f"numbers in filler {st.number_rate}, variants {'/'.join(str(w) for w in st.variant_weights)}"
        for i, st in enumerate(STAGES)
    )
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    (out / "README.md").write_text(CARD.format(
        params=params, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, layers=config.num_hidden_layers, hidden=config.hidden_size, seed=seed,
        vocab=config.vocab_size, lm_weight=LM_WEIGHT, stages=stages, minutes=max(r.get("minutes", 0) for r in log),
        device="2 CPU cores (shared with other work while it ran)", scores=scores,
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to save the model and tokenizer in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--init-from", type=Path, help="start from this saved model instead of random weights")
    parser.add_argument("--scores", type=Path, help="with --card-only: a markdown file of measured scores")
    parser.add_argument("--card-only", action="store_true", help="only (re)write the model card of --out")
    args = parser.parse_args()
    if args.card_only:
        write_model_card(args.out, args.seed, args.scores.read_text() if args.scores else "Not measured yet.")
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **MODEL,
    )
    model = (LlamaForCausalLM.from_pretrained(args.init_from) if args.init_from else LlamaForCausalLM(config)).to(device)
    stages = STAGES
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "training_log.jsonl").open("w")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}; device {device}")
    log.write(json.dumps({"device": str(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"}) + "\n")
    start = time.time()
    for stage_idx, stage in enumerate(stages):
        steps = max(1, round(stage.steps * args.steps_scale))
        optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=0.01, betas=(0.9, 0.98))
        warmup = max(1, steps // 10)
        # warm up, hold, then cosine over the last 40% of the stage
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(1.0, (s + 1) / warmup) * (1.0 if s < 0.6 * steps else 0.5 * (1 + math.cos(math.pi * (s - 0.6 * steps) / (0.4 * steps)))),
        )
        model.train()
        for step in range(steps):
            ids, labels = sample_batch(tokenizer, stage, rng)
            loss = training_loss(model, ids.to(device), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == steps - 1:
                row = dict(stage=stage_idx, step=step, length=ids.shape[1], loss=round(loss.item(), 4),
                           answer_acc=round(answer_accuracy(model, ids.to(device), labels.to(device)), 3),
                           lr=schedule.get_last_lr()[0], minutes=round((time.time() - start) / 60, 2))
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()
        acc = {n: quick_accuracy(model, tokenizer, n, 20, 1000 + n, device) for n in (256, 1024, 2048, 4096)}
        row = dict(stage=stage_idx, done=True, stage_config=asdict(stage), quick_accuracy=acc,
                   minutes=round((time.time() - start) / 60, 2))
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        model.save_pretrained(args.out, safe_serialization=True)
        tokenizer.save_pretrained(args.out)
    log.close()
    write_model_card(args.out, args.seed, "Not measured yet: run kvx needle on it.")


if __name__ == "__main__":
    main()
