"""A tiny Llama-architecture chat model, written with `transformers`, for a real vLLM to serve.

What vLLM on the CPU needs from it (DESIGN.md, "vLLM on the CPU"): a local directory holding
`config.json` + `model.safetensors` from `LlamaForCausalLM.save_pretrained`, and a fast tokenizer
with a `chat_template` so `/v1/chat/completions` works. The CPU attention refuses head_dim 16, so
the 128-wide model has two heads of 64.

It is trained briefly (about 15 s on one core) on the demo corpus, so that greedy output reads
like the corpus's sentences and its top tokens are often, but not always, clear winners: served in
bfloat16 it then picks another token than in float32 on some prompts (3 of 16 measured), not on
all, which is what a precision-changed candidate looks like. Everything is seeded and training
runs on one thread (a float sum's order depends on the thread count), so the same directory bytes
come out each time; the directory's name is a content key over this code, the corpus and the
library versions, so later runs reuse it.

Run as `PYTHONPATH=deploy/lib python -m shadowdemo.tiny_llama CACHE_DIR`: prints the model
directory. A subprocess of its own keeps torch's thread setting and memory out of the caller.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from shadowdemo.training_corpus import training_sentences

SEED = 20261201
VOCAB_SIZE = 1024
HIDDEN = 128
HEADS = 2  # head_dim 64: the smallest the CPU attention accepts here
LAYERS = 2
INTERMEDIATE = 256
MAX_POSITIONS = 512  # above vLLM's --max-model-len 256, which must not exceed it
TRAIN_STEPS = 240
BATCH = 16
WINDOW = 64
LEARNING_RATE = 3e-3

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES)]
# Each message on a line of its own after its role tag; the prompt ends at the assistant tag,
# which is where training taught the model to answer with one sentence and then </s>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>"
    "{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_DONE = ".complete"
_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")


def content_key() -> str:
    """Hash of what decides the directory's bytes: this file, the corpus module, the libraries."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve()
    for source in (here, here.with_name("training_corpus.py")):
        digest.update(source.read_bytes())
    for name in _LIBRARIES:
        digest.update(f"{name}=={importlib.metadata.version(name)}\n".encode())
    return digest.hexdigest()[:16]


def documents(seed: int = SEED) -> list[str]:
    """Training text: runs of corpus sentences (for /v1/completions) and one-turn chats whose
    answer is a sentence on the same topic (for /v1/chat/completions), each ending in </s>."""
    rng = random.Random(seed)
    sentences = training_sentences(n=2400, seed=seed)
    docs = []
    for i in range(0, len(sentences) - 8, 8):
        chunk = sentences[i : i + 8]
        docs.append(BOS + " ".join(chunk[:4]) + EOS)
        # Same topic: the corpus cycles through its topics, so sentences 8 apart share one.
        question, answer = chunk[4], sentences[i + 12]
        if rng.random() < 0.3:
            docs.append(f"{BOS}<|system|>Answer in one sentence.\n<|user|>{question}\n")
        else:
            docs.append(f"{BOS}<|user|>{question}\n")
        docs[-1] += f"<|assistant|>{answer}{EOS}"
    rng.shuffle(docs)
    return docs


def _train_tokenizer(docs: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    # A plain prompt gets <s> in front, as the model saw in training; chat prompts carry it in
    # the template and vLLM tokenizes them without special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=256
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _train_model(tokenizer: Any, docs: list[str]) -> tuple[Any, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # The documents carry their own <s> and </s>: no post-processor tokens on top.
    ids = [t for doc in docs for t in tokenizer(doc, add_special_tokens=False)["input_ids"]]
    stream = torch.tensor(ids, dtype=torch.long)
    windows = stream[: len(stream) // WINDOW * WINDOW].view(-1, WINDOW)
    order = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    model.train()
    for _ in range(TRAIN_STEPS):
        batch = windows[torch.randint(len(windows), (BATCH,), generator=order)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, float(loss.detach())


def write(target: Path) -> float:
    """Train and save into `target` (created); the final training loss."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per save on stderr says nothing here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        docs = documents()
        tokenizer = _train_tokenizer(docs)
        model, loss = _train_model(tokenizer, docs)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return loss


def ensure(cache_dir: Path) -> Path:
    """The model directory under `cache_dir` for this content key, written first if missing."""
    final = Path(cache_dir).resolve() / f"tiny-llama-{content_key()}"
    if (final / _DONE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Written beside its final place and renamed in one step: a run killed half-way, or another
    # run writing at the same time, never leaves a directory that looks complete and is not.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=final.parent))
    try:
        loss = write(staging)
        (staging / _DONE).write_text(json.dumps({"final_loss": round(loss, 4)}) + "\n")
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / _DONE).exists():
                raise  # not a concurrent writer that won: a real failure
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m shadowdemo.tiny_llama CACHE_DIR", file=sys.stderr)
        return 2
    print(ensure(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
