"""A tiny word-level causal language model, trained at load time, in the precisions the LLM demo
compares (fp32 reference, dynamic int8, bfloat16).

The corpus is the student's seeded sentence stream (`training_corpus.py`) with one end-of-text
token after every question: a sentence that asks something ends the "answer", so the model
learns a real stop condition. At each sentence start the six sentence frames of the corpus are
about equally likely, and greedy decoding picks among near-ties there: that is where reduced
precision flips a token and the continuation goes its own way, as it does in real LLMs.

Training runs once per cache key: the first process trains (a few seconds, one thread) and saves
the weights under a file lock; every other variant loads the same file, so all start from
bit-identical weights before their precision change.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shadowdemo.training_corpus import training_sentences

VARIANTS = ("fp32", "int8", "bf16")
EOS = "<eos>"
UNK = "<unk>"
EOS_ID, UNK_ID = 0, 1
MAX_PROMPT_TOKENS = 256
# Training windows are this long, so it is the model's context: decoding feeds it the last
# CONTEXT tokens. Windows start anywhere in the stream, so a cut-off start is familiar to it.
CONTEXT = 32
_TOKEN = re.compile(r"[a-z0-9']+|[.,?!]")
_PUNCT = frozenset(".,?!")


@dataclass(frozen=True)
class TrainConfig:
    n_sentences: int = 1200
    width: int = 64
    heads: int = 2
    layers: int = 2
    steps: int = 120
    batch: int = 64
    lr: float = 0.005
    # Among the first seeds, one whose greedy answers to the demo prompts end both ways, at the
    # end token ("stop") on about a fifth and at max_tokens ("length") on the rest.
    seed: int = 6


class Vocab:
    """Lowercased words and punctuation of the corpus, plus the end-of-text and unknown tokens."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self._ids = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    @staticmethod
    def split(text: str) -> list[str]:
        return _TOKEN.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, UNK_ID) for w in self.split(text)]

    def piece(self, token_id: int) -> str:
        """The token as it appears in generated text: words carry their leading space."""
        word = self.words[token_id]
        return word if word in _PUNCT or token_id == EOS_ID else " " + word


class _Block(torch.nn.Module):
    """Pre-norm causal self-attention and a GELU MLP, every projection an nn.Linear (so that
    dynamic int8 quantization reaches all of them)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        out: torch.Tensor = x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))
        return out


class TinyTransformer(torch.nn.Module):
    """ids [B, T <= CONTEXT] -> next-token logits [B, T, V]."""

    def __init__(self, vocab_size: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, cfg.width)
        self.pos = torch.nn.Embedding(CONTEXT, cfg.width)
        self.blocks = torch.nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.norm = torch.nn.LayerNorm(cfg.width)
        self.out = torch.nn.Linear(cfg.width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.out(self.norm(x))
        return logits


def corpus(cfg: TrainConfig) -> tuple[Vocab, list[int]]:
    sentences = training_sentences(cfg.n_sentences)
    vocab = Vocab([EOS, UNK, *sorted({w for s in sentences for w in Vocab.split(s)})])
    stream = [EOS_ID]
    for sentence in sentences:
        ids = vocab.encode(sentence)
        stream += ids
        if vocab.words[ids[-1]] == "?":
            stream.append(EOS_ID)
    return vocab, stream


def train(cfg: TrainConfig) -> tuple[Vocab, dict[str, torch.Tensor]]:
    """Random windows of the token stream, Adam, a fixed step count: the same weights each run."""
    vocab, stream = corpus(cfg)
    torch.manual_seed(cfg.seed)
    model = TinyTransformer(len(vocab), cfg)
    tokens = torch.tensor(stream)
    offsets = torch.arange(CONTEXT + 1)
    rng = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # One thread: a float sum's order depends on the thread count, and the cached weights must
    # not depend on the process that trained them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The stub may call this under inference mode; training needs autograd back on.
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(cfg.steps):
                starts = torch.randint(0, len(stream) - CONTEXT - 1, (cfg.batch, 1), generator=rng)
                windows = tokens[starts + offsets]
                opt.zero_grad()
                logits = model(windows[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, len(vocab)), windows[:, 1:].reshape(-1)
                )
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return vocab, {k: v.detach().clone() for k, v in model.state_dict().items()}


def cache_dir() -> Path:
    return Path(os.environ.get("SHADOWDEMO_CACHE") or Path(tempfile.gettempdir()) / "shadowdemo")


def cache_key(cfg: TrainConfig) -> str:
    # This file's source and the corpus are part of the key: a change to the model, training
    # code or corpus invalidates the cache instead of silently serving stale weights.
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update("\n".join(training_sentences(cfg.n_sentences)).encode())
    digest.update(repr(sorted(asdict(cfg).items())).encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def trained_weights(cfg: TrainConfig) -> tuple[Vocab, dict[str, torch.Tensor]]:
    """Train once per key, under an exclusive lock: every other process waits, then loads."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lm-{cache_key(cfg)}.pt"
    with (folder / f"lm-{cache_key(cfg)}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            vocab, weights = train(cfg)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"vocab": vocab.words, "weights": weights}, tmp)
            os.replace(tmp, path)  # readers never see a half-written file
        saved = torch.load(path, weights_only=True)
    return Vocab(list(saved["vocab"])), saved["weights"]


def _fake_quant_int8(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-tensor int8 round trip (what an int8 embedding table stores)."""
    scale = weight.abs().amax() / 127.0
    return (weight / scale).round().clamp(-127, 127) * scale


def build(
    variant: str, vocab_size: int, weights: dict[str, torch.Tensor], cfg: TrainConfig
) -> torch.nn.Module:
    if variant not in VARIANTS:
        raise ValueError(f"unknown LM variant {variant!r}; expected one of {VARIANTS}")
    model = TinyTransformer(vocab_size, cfg)
    model.load_state_dict(weights)
    model.eval()
    if variant == "bf16":
        return model.to(torch.bfloat16)
    if variant == "int8":
        # Dynamic int8: every Linear's weights per tensor, its input quantized per call. The
        # embedding tables, which quantize_dynamic leaves in fp32, take an int8 round trip too
        # (as an int8 deployment stores them): on the demo prompts that moves the share of
        # greedy answers that change from 24% to 34%.
        with torch.no_grad():
            for table in (model.emb, model.pos):
                table.weight.copy_(_fake_quant_int8(table.weight))
        quantized: torch.nn.Module = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {torch.nn.Linear}, dtype=torch.qint8
        )
        return quantized
    return model


@dataclass(frozen=True)
class Token:
    token_id: int
    piece: str
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop": the model produced the end-of-text token; "length": max_tokens reached


class LanguageModel:
    """`generate` yields one Token per generated token, then one Finish."""

    def __init__(self, variant: str = "fp32", *, cfg: TrainConfig | None = None) -> None:
        cfg = cfg or TrainConfig()
        self.variant = variant
        self.vocab, weights = trained_weights(cfg)
        self.model = build(variant, len(self.vocab), weights, cfg)

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.vocab.encode(prompt)
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"the prompt has {len(ids)} tokens, at most {MAX_PROMPT_TOKENS}")
        # The end-of-text token precedes every text in training: a prompt starts a new one.
        return [EOS_ID, *ids]

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        num_logprobs: int = 0,
    ) -> Iterator[Token | Finish]:
        """Greedy when temperature is 0, else sampled from softmax(logits / temperature) with a
        generator seeded by `seed`. Logprobs are those of the model's own (unscaled) distribution,
        in fp32 for every variant; the end-of-text token ends generation and is not yielded."""
        rng = torch.Generator().manual_seed(seed)
        ids = self.prompt_ids(prompt)
        with torch.inference_mode():
            for _ in range(max_tokens):
                # No KV cache: the whole (windowed) context each step, cheap at this size.
                logits = self.model(torch.tensor([ids[-CONTEXT:]]))[0, -1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token_id = int(torch.multinomial(probs, 1, generator=rng))
                else:
                    token_id = int(logprobs.argmax())
                if token_id == EOS_ID:
                    yield Finish("stop")
                    return
                # A stable sort, not topk: bf16 logits tie often, and among equals the lowest id
                # comes first, as argmax picks it, so a greedy token heads its own top-k row.
                top = torch.sort(logprobs, descending=True, stable=True)
                yield Token(
                    token_id=token_id,
                    piece=self.vocab.piece(token_id),
                    logprob=float(logprobs[token_id]),
                    top_ids=tuple(int(i) for i in top.indices[:num_logprobs]),
                    top_logprobs=tuple(float(v) for v in top.values[:num_logprobs]),
                )
                ids.append(token_id)
        yield Finish("length")
