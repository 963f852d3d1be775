"""Model-shaped lists of parameter shapes for the step benchmark.

A layout is only a list of shapes: the benchmark allocates parameters and gradients from it. The
full-size layouts are for a GPU; `CPU_LAYOUTS` are scaled-down versions of the same shapes for a
CPU run that must finish in about two minutes on two cores.

  gpt2_124m    GPT-2 small as in the released checkpoint (nanoGPT naming): token and position
               embeddings, 12 blocks of (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
               mlp.c_proj) weights and biases, ln_f; the output head is tied to wte, so it is not
               a separate parameter. 148 tensors, 124,439,808 parameters.
  llama_1b     a Llama-style decoder: 16 layers, d=2048, full multi-head attention (q, k, v, o all
               d x d), SwiGLU MLP with hidden 5632 (w1, w3: 5632 x d; w2: d x 5632), RMSNorm
               weights (two per layer and a final one), vocabulary 32000 with an untied output
               head. 147 tensors, 953,223,168 parameters.
  tiny_2000    2000 tensors of 4096 elements (8.2M parameters): the launch-bound case.
  huge_4       4 tensors of 64M (2^26) elements (268M parameters): the bandwidth-bound case.

CPU versions: gpt2_small (GPT-2 shapes with d=128, 4 heads' worth of width, vocabulary 4096,
context 256, 12 blocks), llama_small (4 layers, d=256, hidden 704, vocabulary 4096), tiny_200
(200 x 4096), huge_2 (2 x 4M).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Layout:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str

    @property
    def n_params(self) -> int:
        return sum(prod(s) for s in self.shapes)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def gpt2_shapes(*, d: int = 768, vocab: int = 50257, n_ctx: int = 1024,
                n_layer: int = 12) -> list[tuple[int, ...]]:
    """GPT-2's parameter shapes (Linear weights stored out x in, as in nanoGPT)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]          # wte, wpe
    for _ in range(n_layer):
        shapes += [(d,), (d,),                                         # ln_1 weight, bias
                   (3 * d, d), (3 * d,),                               # attn.c_attn
                   (d, d), (d,),                                       # attn.c_proj
                   (d,), (d,),                                         # ln_2
                   (4 * d, d), (4 * d,),                               # mlp.c_fc
                   (d, 4 * d), (d,)]                                   # mlp.c_proj
    shapes += [(d,), (d,)]                                             # ln_f
    return shapes


def llama_shapes(*, d: int = 2048, n_layer: int = 16, hidden: int = 5632,
                 vocab: int = 32000) -> list[tuple[int, ...]]:
    """A Llama-style decoder's parameter shapes (no biases, RMSNorm weights, untied head)."""
    shapes: list[tuple[int, ...]] = [(vocab, d)]                       # embed_tokens
    for _ in range(n_layer):
        shapes += [(d,),                                               # input RMSNorm
                   (d, d), (d, d), (d, d), (d, d),                     # q, k, v, o
                   (d,),                                               # post-attention RMSNorm
                   (hidden, d), (hidden, d), (d, hidden)]              # w1 (gate), w3 (up), w2
    shapes += [(d,), (vocab, d)]                                       # final norm, lm_head
    return shapes


def _layout(name, shapes, description):
    return Layout(name, tuple(tuple(s) for s in shapes), description)


GPU_LAYOUTS = {
    "gpt2_124m": _layout("gpt2_124m", gpt2_shapes(), "GPT-2 small (124M), 148 tensors"),
    "llama_1b": _layout("llama_1b", llama_shapes(), "Llama-style 16 x d2048, 0.95B, 147 tensors"),
    "tiny_2000": _layout("tiny_2000", [(4096,)] * 2000, "2000 tensors x 4096"),
    "huge_4": _layout("huge_4", [(1 << 26,)] * 4, "4 tensors x 64M"),
}

CPU_LAYOUTS = {
    "gpt2_small": _layout("gpt2_small", gpt2_shapes(d=128, vocab=4096, n_ctx=256),
                          "GPT-2 shapes, d=128, vocab 4096, ctx 256, 148 tensors"),
    "llama_small": _layout("llama_small", llama_shapes(d=256, n_layer=4, hidden=704, vocab=4096),
                           "Llama shapes, 4 x d256, hidden 704, vocab 4096"),
    "tiny_200": _layout("tiny_200", [(4096,)] * 200, "200 tensors x 4096"),
    "huge_2": _layout("huge_2", [(1 << 22,)] * 2, "2 tensors x 4M"),
}

ALL_LAYOUTS = {**GPU_LAYOUTS, **CPU_LAYOUTS}

#: What a run takes when --layouts is not given.
DEFAULT_GPU = ("gpt2_124m", "llama_1b", "tiny_2000", "huge_4")
DEFAULT_CPU = ("gpt2_small", "tiny_200", "huge_2")


def get(name: str) -> Layout:
    try:
        return ALL_LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(ALL_LAYOUTS)}") from None
