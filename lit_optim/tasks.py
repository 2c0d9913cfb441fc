"""Small real tasks for comparing optimizers, with data that is already on the machine.

* ``charlm``: a small GPT (built from :class:`GPTConfig`, no download) trained character-level on
  text every Python installation carries: the standard library's own source files, or any text file
  the user names.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits with a small CNN.

:func:`hf_causal_lm_task` builds the same kind of task from a Hugging Face causal-LM config (or a
local model folder) and a text file, for ``lit-optim compare --hf-model ... --dataset ...``.

Each task gives a :class:`lightning.LightningModule` (:class:`TaskModule`) whose
``configure_optimizers`` goes through :func:`lit_optim.configure_optimizers`.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .factory import configure_optimizers

__all__ = [
    "CHARLM_SIZES",
    "TASKS",
    "CausalLMLogits",
    "CharTextData",
    "DigitsCNN",
    "GPTConfig",
    "TaskModule",
    "TinyGPT",
    "TokenWindowData",
    "build_task",
    "digits_data",
    "hf_causal_lm_task",
    "load_hf_config",
    "stdlib_text",
]

TASKS = ("charlm", "digits")

#: TinyGPT sizes of the charlm task
CHARLM_SIZES = {
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=32),
    "small": dict(n_layer=2, n_head=4, n_embd=128, block_size=64),
    "base": dict(n_layer=4, n_head=4, n_embd=256, block_size=128),
}


# ----------------------------------------------------------------------------- GPT


@dataclass
class GPTConfig:
    """Size of :class:`TinyGPT`. ``attention="math"`` computes attention with explicit matmuls
    (needed for Hessian-vector products through attention: fused kernels have no double backward);
    ``"sdpa"`` uses ``F.scaled_dot_product_attention``."""

    vocab_size: int = 128
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    attention: str = "sdpa"


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.n_embd
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc_out = nn.Linear(cfg.mlp_ratio * d, d)
        self.drop = nn.Dropout(cfg.dropout)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        if self.cfg.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self._attend(self.ln1(x)))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    """A GPT-2-style decoder (pre-norm blocks, learned positions, tied embedding and output head)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {cfg.attention!r}")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def stdlib_text(max_chars: int = 1_000_000) -> str:
    """Concatenated source of the Python standard library (sorted file order), up to ``max_chars``."""
    root = sysconfig.get_paths()["stdlib"]
    parts: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                    s = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            parts.append(s)
            total += len(s)
            if total >= max_chars:
                return "".join(parts)[:max_chars]
    if not parts:
        raise RuntimeError(f"no Python source files found under {root}")
    return "".join(parts)[:max_chars]


class _Windows(Dataset):
    def __init__(self, data: torch.Tensor, block: int, starts: torch.Tensor):
        self.data, self.block, self.starts = data, block, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        chunk = self.data[s : s + self.block + 1]
        return chunk[:-1], chunk[1:]


class TokenWindowData:
    """Windows of ``block_size`` tokens from a 1-D tensor of token ids: 90/10 train/validation split
    by position; training windows start at seeded random positions."""

    def __init__(self, ids: torch.Tensor, block_size: int = 64, seed: int = 0):
        if len(ids) < 10 * (block_size + 1):
            raise ValueError(f"text is too short ({len(ids)} tokens) for block_size={block_size}")
        n = int(0.9 * len(ids))
        self.train, self.val = ids[:n], ids[n:]
        self.block_size = block_size
        self.seed = seed

    def train_dataset(self, num_samples: int) -> Dataset:
        g = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, len(self.train) - self.block_size - 1, (num_samples,), generator=g)
        return _Windows(self.train, self.block_size, starts)

    def val_dataset(self, num_samples: int = 256) -> Dataset:
        g = torch.Generator().manual_seed(self.seed + 1)
        starts = torch.randint(0, len(self.val) - self.block_size - 1, (num_samples,), generator=g)
        return _Windows(self.val, self.block_size, starts)


class CharTextData(TokenWindowData):
    """Character-level data: a vocabulary of the characters seen (others map to index 0), 90/10
    train/validation split by position, windows of ``block_size`` characters."""

    def __init__(self, text: str, block_size: int = 64, seed: int = 0):
        if len(text) < 10 * (block_size + 1):
            raise ValueError(f"text is too short ({len(text)} characters) for block_size={block_size}")
        chars = sorted(set(text))
        self.itos = ["\0"] + [c for c in chars if c != "\0"]
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        data = torch.tensor([self.stoi.get(c, 0) for c in text], dtype=torch.long)
        super().__init__(data, block_size, seed)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)


# ----------------------------------------------------------------------------- digits


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers and an MLP head for 8x8 digit images."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(4, width)
        self.fc = nn.Linear(width * 16, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.max_pool2d(F.gelu(self.norm(self.conv2(x))), 2)
        return self.head(F.gelu(self.fc(x.flatten(1))))


def digits_data(seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (1797 images, no download), scaled to [0, 1], split by a
    seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError("the digits task needs scikit-learn: pip install -e '.[data]' in the lit_optim clone (or pip install scikit-learn)") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(val_fraction * len(y))
    va, tr = perm[:n_val], perm[n_val:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])


# ----------------------------------------------------------------------------- Lightning module


class TaskModule(L.LightningModule):
    """A model + data + loss, trained with a lit_optim optimizer by name.

    ``forward`` returns logits and ``loss_fn(logits, targets)`` is cross-entropy, the protocol the
    curvature callback uses to build Gauss-Newton-Bartlett and Hutchinson estimates.
    """

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        optimizer: str = "adamw",
        lr: float | None = None,
        batch_size: int = 32,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        seed: int = 0,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.train_set, self.val_set = train_set, val_set
        self.optimizer_name = optimizer
        self.lr = lr
        self.batch_size = batch_size
        self.scheduler = scheduler
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.seed = seed
        self.optimizer_kwargs = dict(optimizer_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.log("val_loss", loss, prog_bar=True)
        if logits.dim() == 2:
            self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return configure_optimizers(
            self,
            self.optimizer_name,
            lr=self.lr,
            scheduler=self.scheduler,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            **self.optimizer_kwargs,
        )

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 64))


def build_task(
    task: str,
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    text: str | None = None,
    model_size: str = "small",
    attention: str = "sdpa",
) -> tuple[nn.Module, Dataset, Dataset, dict[str, Any]]:
    """Model, training set, validation set and a description for ``task``.

    ``model_size``: ``tiny`` (tests), ``small`` (default comparison) or ``base``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    torch.manual_seed(seed)
    if task == "digits":
        width = {"tiny": 8, "small": 32, "base": 64}[model_size]
        train, val = digits_data(seed)
        model = DigitsCNN(width)
        return model, train, val, {"task": "digits", "model": f"DigitsCNN(width={width})", "train_size": len(train)}
    sizes = CHARLM_SIZES[model_size]
    if text is None:
        text = stdlib_text(400_000 if model_size != "base" else 2_000_000)
        source = "Python standard library source"
    else:
        source = "user text"
    data = CharTextData(text, block_size=sizes["block_size"], seed=seed)
    cfg = GPTConfig(vocab_size=data.vocab_size, attention=attention, **sizes)
    model = TinyGPT(cfg)
    train = data.train_dataset(steps * batch_size)
    val = data.val_dataset(256 if model_size != "tiny" else 64)
    desc = {"task": "charlm", "model": f"TinyGPT({asdict(cfg)})", "text": source, "chars": len(text)}
    return model, train, val, desc


# ----------------------------------------------------------------------------- Hugging Face causal LM

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as ``forward(input_ids) -> logits`` (the protocol of :class:`TaskModule`
    and of the curvature callback)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx).logits

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()


def load_hf_config(config_or_path: str):
    """``AutoConfig`` from a ``config.json`` file, a local model folder, or (downloaded by transformers
    when it is not a local path) a Hub name."""
    from transformers import AutoConfig

    if os.path.isfile(config_or_path) or os.path.isdir(config_or_path):
        return AutoConfig.from_pretrained(config_or_path, local_files_only=True)
    return AutoConfig.from_pretrained(config_or_path)


def hf_has_weights(config_or_path: str) -> bool:
    return os.path.isdir(config_or_path) and any(os.path.exists(os.path.join(config_or_path, f)) for f in _WEIGHT_FILES)


def hf_tokenizer_path(config_or_path: str, tokenizer: str | None = None) -> str | None:
    """Where the tokenizer comes from: ``tokenizer`` when given, else the model folder when it holds
    tokenizer files, else None (character-level tokens from the text itself)."""
    if tokenizer:
        return tokenizer
    if os.path.isdir(config_or_path) and any(os.path.exists(os.path.join(config_or_path, f)) for f in _TOKENIZER_FILES):
        return config_or_path
    return None


def hf_max_positions(config: Any) -> int | None:
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def hf_token_ids(text: str, config: Any, config_or_path: str, tokenizer: str | None = None) -> tuple[torch.Tensor, str]:
    """Token ids of ``text`` and how they were made. With no tokenizer the text is tokenized by
    characters (the vocabulary of the characters seen, which must fit in ``config.vocab_size``)."""
    tok_path = hf_tokenizer_path(config_or_path, tokenizer)
    if tok_path is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=os.path.exists(tok_path))
        ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long), f"tokenizer {tok_path}"
    chars = sorted(set(text))
    vocab = ["\0"] + [c for c in chars if c != "\0"]
    if len(vocab) > config.vocab_size:
        raise ValueError(
            f"the text has {len(vocab)} distinct characters but the model's vocab_size is {config.vocab_size}; "
            "give a config with a larger vocab_size or a tokenizer (--tokenizer, or tokenizer files in the model folder)"
        )
    stoi = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([stoi.get(c, 0) for c in text], dtype=torch.long), f"characters ({len(vocab)} symbols)"


def hf_causal_lm_task(
    config_or_path: str,
    text: str,
    *,
    steps: int,
    batch_size: int,
    seed: int = 0,
    block_size: int | None = None,
    tokenizer: str | None = None,
    attention: str = "sdpa",
    val_samples: int = 256,
) -> tuple[nn.Module, Dataset, Dataset, dict[str, Any]]:
    """Model, training set, validation set and a description for a Hugging Face causal LM trained on
    ``text``: built from its config with a seeded random initialization (``AutoModelForCausalLM.from_config``),
    or loaded from a local folder that holds weights (fine-tuning). ``attention="math"`` asks for the
    eager attention implementation (Hessian-vector products need double backward)."""
    from transformers import AutoModelForCausalLM

    config = load_hf_config(config_or_path)
    max_pos = hf_max_positions(config)
    block = block_size or min(128, max_pos or 128)
    if max_pos is not None and block > max_pos:
        raise ValueError(f"block_size {block} exceeds the model's {max_pos} positions")
    ids, how = hf_token_ids(text, config, config_or_path, tokenizer)
    data = TokenWindowData(ids, block_size=block, seed=seed)
    kw = {"attn_implementation": "eager"} if attention == "math" else {}
    torch.manual_seed(seed)
    if hf_has_weights(config_or_path):
        model = AutoModelForCausalLM.from_pretrained(config_or_path, local_files_only=True, **kw)
        init = "pretrained weights"
    else:
        model = AutoModelForCausalLM.from_config(config, **kw)
        init = "random init from the config"
    wrapped = CausalLMLogits(model)
    desc = {
        "task": "hf",
        "model": f"{type(model).__name__} ({init}) from {config_or_path}",
        "tokens": how,
        "block_size": block,
        "train_tokens": len(data.train),
    }
    return wrapped, data.train_dataset(steps * batch_size), data.val_dataset(val_samples), desc
