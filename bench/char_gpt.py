"""A character-level GPT trained with each optimizer of the package (the paper's Nano-GPT setting).

The model follows the shape of nanoGPT's shakespeare-char configuration: token and position
embeddings, pre-LayerNorm transformer blocks (causal self-attention, then a 4x GELU MLP), a final
LayerNorm and an output layer tied to the token embedding. Dropout is not used.

The corpus is character-level text split into train / validation / test (80 / 10 / 10, in order).
The default corpus needs no download: the ``.py`` files of the Python standard library directory
(the one holding ``os.py``), sorted by name and concatenated up to ``max_chars``.

Methods (``METHODS``): SGD and clipped SGD (``ClippedSGD``, tuned on an lr x clip grid), AdamW
(``torch.optim.AdamW`` with torch's defaults, betas (0.9, 0.999), weight decay 0.01, tuned on an lr
grid), MoMo and MoMo-Adam (``pf.MoMo`` / ``pf.MoMoAdam`` at their default lr, 1 and 1e-2, lb = 0),
and the parameter-free Polyak (f* = 0), DecSPS, AdaSPS, DoG and Inexact Polyak (T = number of
steps, last iterate, as the paper does for networks). The package's optimizers are built with
``fused=None`` unless told otherwise: the Triton kernels on CUDA, the foreach path on the CPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import polyak_fused as pf

METHODS = ("sgd", "clipped_sgd", "adamw", "momo", "momo_adam", "polyak", "decsps", "adasps", "dog",
           "inexact_polyak")
LABELS = {"sgd": "SGD (tuned)", "clipped_sgd": "Clipped SGD (tuned)", "adamw": "AdamW (tuned)",
          "momo": "MoMo", "momo_adam": "MoMo-Adam", "polyak": "Polyak (f*=0)",
          "decsps": "DecSPS", "adasps": "AdaSPS", "dog": "DoG",
          "inexact_polyak": "Inexact Polyak"}
#: Methods tuned on a grid (lr; and clip for clipped SGD).
TUNED = ("sgd", "clipped_sgd", "adamw")


# ---- model ---------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = [t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
                 for t in self.qkv(x).split(width, dim=2)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT-2 / nanoGPT
        # GPT-2 initialisation: N(0, 0.02), the layers that write into the residual stream
        # scaled down by sqrt(2 * n_layer).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        length = idx.shape[1]
        if length > self.cfg.block_size:
            raise ValueError(f"sequence length {length} > block_size {self.cfg.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(length, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss


# ---- data ----------------------------------------------------------------------------------------
def stdlib_corpus(max_chars: int = 4_000_000) -> tuple[str, str]:
    """The standard library's top-level .py files, sorted by name, concatenated, cut at
    max_chars. Deterministic for a given Python version. Returns (text, description)."""
    directory = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(directory) if n.endswith(".py"))
    parts, total = [], 0
    for name in names:
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read())
        total += len(parts[-1])
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    version = ".".join(map(str, sys.version_info[:3]))
    where = os.path.join(os.path.basename(os.path.dirname(directory)), os.path.basename(directory))
    desc = (f"Python {version} standard library: the first {len(parts)} of {len(names)} .py files "
            f"of its directory (.../{where}, sorted), {len(text):,} characters")
    return text, desc


def load_text(path: str | None = None, max_chars: int = 4_000_000) -> tuple[str, str]:
    """The corpus: a text file (whole) when `path` is given, else `stdlib_corpus(max_chars)`."""
    if path is None:
        return stdlib_corpus(max_chars)
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return text, f"{os.path.basename(path)}: {len(text):,} characters"


class CharData:
    """Character ids of a text, split in order into train / val / test."""

    def __init__(self, text: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)):
        if len(text) < 100:
            raise ValueError(f"corpus too small ({len(text)} characters)")
        self.chars = sorted(set(text))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        lookup = np.zeros(int(codes.max()) + 1, dtype=np.int64)
        lookup[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = torch.from_numpy(lookup[codes])
        n_train = int(fractions[0] * len(ids))
        n_val = int(fractions[1] * len(ids))
        self.splits = {"train": ids[:n_train], "val": ids[n_train:n_train + n_val],
                       "test": ids[n_train + n_val:]}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def starts(self, split: str, count: int, block_size: int, generator: torch.Generator):
        """`count` random window starts in a split (windows of block_size + 1 characters)."""
        high = len(self.splits[split]) - block_size - 1
        if high <= 0:
            raise ValueError(f"the {split} split ({len(self.splits[split])} characters) is "
                             f"shorter than block_size + 1 = {block_size + 1}")
        return torch.randint(high, (count,), generator=generator)

    def batch(self, split: str, starts: torch.Tensor, block_size: int, device):
        data = self.splits[split]
        offsets = starts[:, None] + torch.arange(block_size + 1)
        window = data[offsets]
        x, y = window[:, :-1], window[:, 1:]
        if torch.device(device).type == "cuda":
            return (x.pin_memory().to(device, non_blocking=True),
                    y.pin_memory().to(device, non_blocking=True))
        return x.to(device), y.to(device)


# ---- training ------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 5000
    batch_size: int = 64
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    eval_every: int = 250
    eval_batches: int = 20      # batches of train and of val at each evaluation
    test_batches: int = 100     # batches of test at the end
    seed: int = 0
    device: str = "cpu"
    fused: bool | None = None   # None: Triton on CUDA, the foreach path on the CPU
    foreach: bool | None = None  # False: the eager reference
    amp: bool = True            # bfloat16 autocast on CUDA (never on the CPU)

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd)


def make_optimizer(method: str, params, *, total_steps: int, lr: float | None = None,
                   clip: float | None = None, fused: bool | None = None,
                   foreach: bool | None = None):
    """The optimizer for a method name; lr (and clip) only for the TUNED methods."""
    if method in TUNED and lr is None:
        raise ValueError(f"{method} needs lr")
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr)  # torch's defaults otherwise (weight decay 0.01)
    if method in ("sgd", "clipped_sgd"):
        max_norm = math.inf if method == "sgd" or clip is None else clip
        return pf.ClippedSGD(params, lr=lr, max_norm=max_norm, fused=fused, foreach=foreach)
    if method == "polyak":
        return pf.Polyak(params, f_star=0.0, fused=fused, foreach=foreach)
    if method == "decsps":
        return pf.DecSPS(params, fused=fused, foreach=foreach)
    if method == "adasps":
        return pf.AdaSPS(params, fused=fused, foreach=foreach)
    if method == "dog":
        return pf.DoG(params, fused=fused, foreach=foreach)
    if method == "momo":
        return pf.MoMo(params, fused=fused, foreach=foreach)
    if method == "momo_adam":
        return pf.MoMoAdam(params, fused=fused, foreach=foreach)
    if method == "inexact_polyak":
        return pf.InexactPolyak(params, total_steps=total_steps, fused=fused, foreach=foreach)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


@dataclass
class RunResult:
    method: str
    lr: float | None
    clip: float | None
    curve: list[dict] = field(default_factory=list)   # {step, train_loss, val_loss}
    test_loss: float = math.nan
    diverged: bool = False
    seconds: float = 0.0

    @property
    def val_loss(self) -> float:
        """Final validation loss; +inf when the run diverged (for tuning)."""
        if self.diverged or not self.curve:
            return math.inf
        return self.curve[-1]["val_loss"]

    def hparams(self) -> str:
        if self.method not in TUNED:
            return "-"
        if self.method in ("sgd", "adamw"):
            return f"lr={self.lr:g}"
        return f"lr={self.lr:g}, clip={self.clip:g}"


class Evaluator:
    """Fixed evaluation windows, the same for every method (drawn once from `seed`)."""

    def __init__(self, data: CharData, cfg: TrainConfig):
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.data, self.cfg = data, cfg
        self.windows = {split: data.starts(split, n * cfg.batch_size, cfg.block_size, gen)
                        .view(n, cfg.batch_size)
                        for split, n in (("train", cfg.eval_batches), ("val", cfg.eval_batches),
                                         ("test", cfg.test_batches))}

    @torch.no_grad()
    def loss(self, model: CharGPT, split: str) -> float:
        cfg = self.cfg
        total = torch.zeros((), device=cfg.device, dtype=torch.float64)
        for starts in self.windows[split]:
            x, y = self.data.batch(split, starts, cfg.block_size, cfg.device)
            with _autocast(cfg):
                total += model(x, y)[1].double()
        return (total / len(self.windows[split])).item()


#: A run stops early once its loss is non-finite or this many times its initial value.
BLOWUP_FACTOR = 4.0


def _blown_up(row: dict, first: dict) -> bool:
    losses = (row["train_loss"], row["val_loss"])
    return (not all(map(math.isfinite, losses))
            or max(losses) > BLOWUP_FACTOR * max(first["train_loss"], first["val_loss"]))


def _autocast(cfg: TrainConfig):
    device_type = torch.device(cfg.device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16,
                          enabled=cfg.amp and device_type == "cuda")


def train_run(method: str, data: CharData, cfg: TrainConfig, evaluator: Evaluator | None = None,
              lr: float | None = None, clip: float | None = None, bar=None) -> RunResult:
    """Train one model from the seed's initialisation with one method; evaluate every
    `eval_every` steps and at the end. A loss that is non-finite or above BLOWUP_FACTOR times
    its initial value stops the run; a run that stopped, or ended with a validation loss above
    its initial one, is marked diverged. Every run sees the same initial weights and the same
    sequence of training batches."""
    evaluator = evaluator or Evaluator(data, cfg)
    torch.manual_seed(cfg.seed)
    model = CharGPT(cfg.model_config(data.vocab_size)).to(cfg.device)
    opt = make_optimizer(method, model.parameters(), total_steps=cfg.steps, lr=lr, clip=clip,
                         fused=cfg.fused, foreach=cfg.foreach)
    batches = torch.Generator().manual_seed(cfg.seed + 1)
    result = RunResult(method, lr, clip)
    start = time.perf_counter()
    model.train()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": step, "train_loss": evaluator.loss(model, "train"),
                   "val_loss": evaluator.loss(model, "val")}
            result.curve.append(row)
            if _blown_up(row, result.curve[0]):
                result.diverged = True
                if bar is not None:
                    bar.update(cfg.steps - step)
                break
        if step == cfg.steps:
            break
        starts = data.starts("train", cfg.batch_size, cfg.block_size, batches)
        x, y = data.batch("train", starts, cfg.block_size, cfg.device)
        with _autocast(cfg):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if method == "adamw":
            opt.step()
        else:
            opt.step(loss=loss.detach())
        if bar is not None:
            bar.update(1)
    result.test_loss = evaluator.loss(model, "test")
    # Diverged: stopped early, or ended with a worse validation loss than at initialisation.
    result.diverged = (result.diverged or not math.isfinite(result.test_loss)
                       or result.curve[-1]["val_loss"] > result.curve[0]["val_loss"])
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class GPTExperiment:
    config: TrainConfig
    corpus: str
    vocab_size: int
    num_parameters: int
    runs: list[RunResult]
    methods: tuple[str, ...] = METHODS   # the methods asked for

    def selected(self) -> dict[str, RunResult]:
        """One run per method: for SGD and clipped SGD, the grid point with the lowest final
        validation loss (clipped SGD's grid includes clip = inf, i.e. the SGD runs)."""
        best: dict[str, RunResult] = {}
        for method in (m for m in METHODS if m in self.methods):
            pool = [r for r in self.runs if r.method == method]
            if method == "clipped_sgd":
                pool += [r for r in self.runs if r.method == "sgd"]
            if pool:
                best[method] = min(pool, key=lambda r: r.val_loss)  # first on ties
        return best


#: AdamW's lr grid when none is given (around 3e-3, the best of an earlier 2000-step run).
ADAMW_LRS = (1e-3, 3e-3, 1e-2)


def plan_jobs(methods, lrs, clips, adamw_lrs=ADAMW_LRS) -> list[tuple]:
    """The runs of an experiment, (method, lr, clip) each: SGD on every lr, clipped SGD on every
    (lr, clip) (clip = inf is plain SGD: its points reuse the SGD runs when SGD runs too), AdamW
    on every lr of `adamw_lrs`, one run of every other method."""
    jobs = []
    for method in methods:
        if method == "sgd":
            jobs += [(method, lr, None) for lr in lrs]
        elif method == "clipped_sgd":
            jobs += [(method, lr, c) for lr in lrs for c in clips
                     if math.isfinite(c) or "sgd" not in methods]
        elif method == "adamw":
            jobs += [(method, lr, None) for lr in adamw_lrs]
        else:
            jobs.append((method, None, None))
    return jobs


def time_steps(data: CharData, cfg: TrainConfig, steps: int = 8) -> dict:
    """Seconds per training step (SGD, after one untimed step) and per evaluation of this
    configuration, measured now: what the plan's time estimate is made of."""
    evaluator = Evaluator(data, cfg)
    torch.manual_seed(cfg.seed)
    model = CharGPT(cfg.model_config(data.vocab_size)).to(cfg.device)
    opt = make_optimizer("sgd", model.parameters(), total_steps=steps, lr=1e-3, fused=cfg.fused, foreach=cfg.foreach)
    batches = torch.Generator().manual_seed(cfg.seed + 1)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        x, y = data.batch("train", data.starts("train", cfg.batch_size, cfg.block_size, batches),
                          cfg.block_size, cfg.device)
        with _autocast(cfg):
            _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=loss.detach())
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.synchronize(cfg.device)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    evaluator.loss(model, "val")
    per_eval_batch = (time.perf_counter() - start) / cfg.eval_batches
    return {"step": float(np.median(times[1:])), "eval_batch": per_eval_batch}


def estimate_seconds(cfg: TrainConfig, n_runs: int, timing: dict) -> float:
    """A run's time from `time_steps`: its steps, its evaluations (train + val every eval_every
    steps) and its test."""
    evals = cfg.steps // cfg.eval_every + 2
    batches = 2 * cfg.eval_batches * evals + cfg.test_batches
    return n_runs * (cfg.steps * timing["step"] + batches * timing["eval_batch"])


def run_experiment(data: CharData, corpus: str, cfg: TrainConfig, lrs, clips,
                   methods=METHODS, progress: bool = True,
                   adamw_lrs=ADAMW_LRS) -> GPTExperiment:
    """Every method; the runs of `plan_jobs`."""
    jobs = plan_jobs(methods, lrs, clips, adamw_lrs)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(jobs) * cfg.steps, desc="char-GPT", unit="step", disable=not progress,
               mininterval=0.5)
    evaluator = Evaluator(data, cfg)
    runs = []
    try:
        for method, lr, clip in jobs:
            label = RunResult(method, lr, clip).hparams()
            bar.set_postfix_str(f"{method} {label}" if method in TUNED else method)
            runs.append(train_run(method, data, cfg, evaluator, lr=lr, clip=clip, bar=bar))
    finally:
        bar.close()
    torch.manual_seed(cfg.seed)
    n_params = CharGPT(cfg.model_config(data.vocab_size)).num_parameters()
    return GPTExperiment(cfg, corpus, data.vocab_size, n_params, runs, tuple(methods))


# ---- outputs -------------------------------------------------------------------------------------
def _num(v) -> str:
    return "" if v is None else f"{v:.6g}"


def write_csvs(exp: GPTExperiment, out: str) -> dict[str, str]:
    """gpt_curves.csv (every run's evaluations), gpt_grid.csv (every run's final numbers) and
    gpt_summary.csv (the selected run of each method). Returns {name: path}."""
    import csv
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"gpt_{name}.csv") for name in ("curves", "grid", "summary")}
    chosen = {id(r) for r in exp.selected().values()}
    with open(paths["curves"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "lr", "clip", "step", "train_loss", "val_loss"])
        for r in exp.runs:
            for row in r.curve:
                w.writerow([r.method, _num(r.lr), _num(r.clip), row["step"],
                            f"{row['train_loss']:.5f}", f"{row['val_loss']:.5f}"])
    with open(paths["grid"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "lr", "clip", "final_train_loss", "final_val_loss", "test_loss",
                    "diverged", "seconds", "selected"])
        for r in exp.runs:
            w.writerow([r.method, _num(r.lr), _num(r.clip), f"{r.curve[-1]['train_loss']:.5f}",
                        f"{r.curve[-1]['val_loss']:.5f}", f"{r.test_loss:.5f}", int(r.diverged),
                        f"{r.seconds:.1f}", int(id(r) in chosen)])
    with open(paths["summary"], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "hyperparameters", "final_train_loss", "final_val_loss",
                    "test_loss", "diverged", "seconds"])
        for method, r in exp.selected().items():
            w.writerow([method, r.hparams(), f"{r.curve[-1]['train_loss']:.5f}",
                        f"{r.curve[-1]['val_loss']:.5f}", f"{r.test_loss:.5f}", int(r.diverged),
                        f"{r.seconds:.1f}"])
    return paths


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _label(method: str, r: RunResult) -> str:
    text = LABELS[method]
    if method in TUNED:
        text += f" [{r.hparams()}]"
    return text + (" - diverged" if r.diverged else "")


def plot_curves(exp: GPTExperiment, path: str) -> str:
    """Train and validation loss vs step of the selected run of every method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    selected = exp.selected()
    finals = [r.curve[-1]["val_loss"] for r in selected.values() if not r.diverged]
    start = max(r.curve[0]["val_loss"] for r in selected.values())
    low = 0.95 * min(finals) if finals else 0.0
    colors = plt.cm.tab10(np.arange(len(METHODS)))
    for ax, key, title in ((axes[0], "train_loss", "train loss"),
                           (axes[1], "val_loss", "validation loss")):
        for color, (method, r) in zip(colors, selected.items()):
            steps = [row["step"] for row in r.curve]
            ax.plot(steps, [row[key] for row in r.curve], color=color, marker=".",
                    lw=2.5 if method == "inexact_polyak" else 1.4, label=_label(method, r))
        ax.set_ylim(low, 1.1 * start)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{title} (cross-entropy, nats/char)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    cfg = exp.config
    fig.suptitle(f"Char-level GPT ({cfg.n_layer} layers, d={cfg.n_embd}, block {cfg.block_size}, "
                 f"batch {cfg.batch_size}, {cfg.steps} steps, {exp.num_parameters:,} params) "
                 f"on {cfg.device}; curves that leave the top diverged", fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_test(exp: GPTExperiment, path: str) -> str:
    """Final test loss of the selected run of every method (bars; diverged ones hatched)."""
    plt = _pyplot()
    selected = exp.selected()
    start = max(r.curve[0]["val_loss"] for r in selected.values())
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(selected) + 1.4), constrained_layout=True)
    names = list(selected)[::-1]
    for i, method in enumerate(names):
        r = selected[method]
        value = r.test_loss if math.isfinite(r.test_loss) else math.inf
        shown = min(value, 1.05 * start)
        ax.barh(i, shown, color="tab:red" if r.diverged else
                ("tab:green" if method == "inexact_polyak" else "tab:blue"),
                hatch="//" if r.diverged else None, alpha=0.8)
        ax.text(shown, i, f" {value:.3f}" + (" (diverged)" if r.diverged else ""),
                va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [_label(m, selected[m]).replace(" - diverged", "")
                                      for m in names], fontsize=8)
    finite = [r.test_loss for r in selected.values() if not r.diverged]
    ax.set_xlim(0.9 * min(finite) if finite else 0, 1.25 * start)
    ax.axvline(start, color="gray", ls=":", lw=1)
    ax.set_xlabel("final test loss (nats/char); dotted: loss at initialisation")
    ax.set_title(f"Char-level GPT, {exp.config.steps} steps: test loss (tuned on validation)",
                 fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
