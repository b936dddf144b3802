"""A small decoder-only language model in the style of nanoGPT (karpathy/nanoGPT ``model.py``).

Used for grape-3 (GrAPE Table 3: DFA / GrAPE / BP on a Transformer LM, "macro" and "micro"
settings of Launay et al. 2020, "Direct feedback alignment scales to modern deep learning tasks
and architectures"). GrAPE trains Launay's WikiText-103 setup; this model is a scaled-down
GPT-2-style stack (pre-LayerNorm blocks, GELU MLP of width 4·n_embd, learned positions) whose
size is set in the config.

Input: ``(B, T)`` token ids with ``T ≤ block_size`` (``input_shape = (T,)``); output: logits
``(B, T, vocab_size)`` with ``vocab_size = num_classes``. ``input_dtype = torch.long`` tells
dry-run code which dtype to feed; float ids (e.g. the zero tensor of ``point_sizes``) are cast.

Options: ``n_layer`` (2), ``n_head`` (4), ``n_embd`` (128), ``block_size`` (default: the input
length ``input_shape[0]``), ``dropout`` (0), ``bias`` (True), ``tie_weights`` (False: unlike
nanoGPT the embedding and the output layer are not tied, because FA-style conversion copies the
output Linear into a layer with its own feedback matrix, and a direct-projection rule treats the
output layer apart from the embedding; tying would make one tensor play both roles).

Feedback points (Launay et al. 2020, placement of the DFA injections; names under ``blocks.i``):
  * micro, per block: ``ln_2`` (the attention sub-layer's output after the residual sum and the
    next LayerNorm), ``mlp.act`` (the FFN activation), then the block itself (its output);
  * macro: the block outputs ``blocks.i``.
Attention uses ``F.scaled_dot_product_attention(is_causal=True)``. Inside a block the residual
stream still connects the points, so a direct-projection rule backpropagates within a block, as
Launay et al. (Appendix D) and GrAPE note for the attention itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.base import MODELS, ZooModel
from bench.options import ClassVar, ConfigError, ModelOptions, opt


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(·)). No in-place ops on the stream."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("transformer",)

    n_layer: int = opt(2, "transformer blocks", ge=1)
    n_head: int = opt(4, "attention heads", ge=1)
    n_embd: int = opt(128, "model width d_model", ge=1)
    block_size: int | None = opt(None, "context length; null = the data's sequence length", ge=1)
    dropout: float = opt(0.0, "dropout", ge=0, lt=1)
    bias: bool = opt(True, "biases in Linear and LayerNorm")
    tie_weights: bool = opt(False, "share the token embedding with the output head")

    def check(self, cfg) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not valid; it must be divisible by model.n_head={self.n_head}")

@MODELS.register("transformer")
class TransformerLM(ZooModel):
    """nanoGPT-style decoder-only LM (grape-3); see the module docstring for options and points."""

    input_dtype = torch.long  # read by rules that build dry-run inputs (token ids, not pixels)

    def __init__(self, input_shape, num_classes, n_layer=2, n_head=4, n_embd=128, block_size=None,
                 dropout=0.0, bias=True, tie_weights=False):
        super().__init__()
        seq_len = int(input_shape[0])
        self.block_size = int(block_size) if block_size is not None else seq_len
        if seq_len > self.block_size:
            raise ValueError(f"input length {seq_len} exceeds model.block_size={self.block_size}")
        self.wte = nn.Embedding(num_classes, n_embd)
        self.wpe = nn.Embedding(self.block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, num_classes, bias=False)
        # nanoGPT / GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        micro = []
        for i in range(n_layer):
            micro += [f"blocks.{i}.ln_2", f"blocks.{i}.mlp.act", f"blocks.{i}"]
        self._points = {"micro": micro, "macro": [f"blocks.{i}" for i in range(n_layer)]}

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx):
        if idx.is_floating_point():
            idx = idx.long()
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
