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

from bench.options import REPLACED_BACKWARD_RULES, Literal  # noqa: I001 (the LM options)

from bench.models.base import MODELS, ZooModel
from bench.models.structure import Block as ViewBlock, OpaqueBlock, Stage, Step, Structure
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
    """c_fc → act → c_proj → dropout. ``activation="relu"`` (Launay et al.'s FFN) makes ``act`` ReLU
    followed by the FFN's dropout, so the ``mlp.act`` feedback point sits after that dropout, where
    their code places it (``dfas[1]`` after ``dropout(activation(linear1(src)))``)."""

    def __init__(self, n_embd: int, dropout: float, bias: bool, hidden: int | None = None, activation: str = "gelu"):
        super().__init__()
        hidden = int(hidden) if hidden is not None else 4 * n_embd
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = nn.GELU() if activation == "gelu" else nn.Sequential(nn.ReLU(), nn.Dropout(dropout))
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(·)). No in-place ops on the stream."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, hidden: int | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PostLNBlock(nn.Module):
    """Launay et al. 2020's block (PyTorch's post-LN ``TransformerEncoderLayer`` as their code writes
    it): x = ln_1(x + attn(x)), then ln_2(x + mlp(x)). Same submodule names as :class:`Block`."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, hidden: int | None):
        super().__init__()
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, dropout, bias, hidden, activation="relu")
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)

    def forward(self, x):
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


class ScaledEmbedding(nn.Embedding):
    """Token embedding times √d_model (Vaswani et al. 2017; Launay et al.'s ``embedding(src)·√d``)."""

    def forward(self, idx):
        return super().forward(idx) * math.sqrt(self.embedding_dim)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position codes (Vaswani et al. 2017), called with the positions like ``nn.Embedding``."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        position = torch.arange(length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(length, dim)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, pos):
        return self.pe[pos]


class TransformerOptions(ModelOptions):
    names: ClassVar[tuple[str, ...]] = ("transformer",)

    n_layer: int = opt(2, "transformer blocks", ge=1)
    n_head: int = opt(4, "attention heads", ge=1)
    n_embd: int = opt(128, "model width d_model", ge=1)
    block_size: int | None = opt(None, "context length; null = the data's sequence length", ge=1)
    dropout: float = opt(0.0, "dropout", ge=0, lt=1)
    bias: bool = opt(True, "biases in Linear and LayerNorm")
    tie_weights: bool = opt(False, "share the token embedding with the output head")
    arch: Literal["nanogpt", "launay"] = opt(
        "nanogpt", "nanogpt: pre-LN blocks, GELU, learned positions, final LayerNorm | launay: Launay et al. 2020's LM "
                   "(post-LN blocks, ReLU, sinusoidal positions, embedding ×√d, no final norm, output bias)")
    ffn_dim: int | None = opt(None, "FFN hidden width; null = 4·n_embd (Launay et al.: 2048 at d_model 512)", ge=1)

    # Rules that are not defined on this model, and why (one line each, at compose time).
    refused: ClassVar[dict] = {
        "rlra": "rec-LRA's error synapses and targets are defined layer to layer on MLP/CNN/ResNet chains, not on "
                "attention and residual token streams",
        "lra_e": "LRA-E's error synapses and targets are defined layer to layer on MLP/CNN chains, not on attention",
        "dtp": "difference target propagation needs a learned inverse of every layer, and attention has none here",
        "tp": "target propagation needs a learned inverse of every layer, and attention has none here",
        "eprop": "equilibrium propagation's energy is a layered Hopfield energy of an MLP; attention is not defined in it",
        "dense_fa": "DenseFA sends fixed feedback from every later layer along one chain of layers; the transformer's "
                    "residual stream and attention branch",
    }

    def check(self, cfg) -> None:
        rule = str(cfg.algorithm.name)
        if rule in self.refused:
            raise ConfigError(f"algorithm.name={rule} cannot train model.name=transformer: {self.refused[rule]}")
        if self.tie_weights and rule in REPLACED_BACKWARD_RULES:
            raise ConfigError(f"algorithm.name={cfg.algorithm.name} cannot train model.tie_weights=true: the tied lm_head/wte "
                              f"weight would be one tensor with a feedback path (lm_head) and without one (wte)")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} is not valid; it must be divisible by model.n_head={self.n_head}")

@MODELS.register("transformer")
class TransformerLM(ZooModel):
    """nanoGPT-style decoder-only LM (grape-3); see the module docstring for options and points."""

    input_dtype = torch.long  # read by rules that build dry-run inputs (token ids, not pixels)

    def __init__(self, input_shape, num_classes, n_layer=2, n_head=4, n_embd=128, block_size=None,
                 dropout=0.0, bias=True, tie_weights=False, arch="nanogpt", ffn_dim=None):
        super().__init__()
        seq_len = int(input_shape[0])
        self.block_size = int(block_size) if block_size is not None else seq_len
        if seq_len > self.block_size:
            raise ValueError(f"input length {seq_len} exceeds model.block_size={self.block_size}")
        self.arch = arch
        if arch == "launay":
            self._init_launay(num_classes, n_layer, n_head, n_embd, dropout, bias, ffn_dim)
        else:
            self.wte = nn.Embedding(num_classes, n_embd)
            self.wpe = nn.Embedding(self.block_size, n_embd)
            self.drop = nn.Dropout(dropout)
            self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, ffn_dim) for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(n_embd, bias=bias)
            self.lm_head = nn.Linear(n_embd, num_classes, bias=False)
            # nanoGPT / GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        # The attention sub-layer's normalised output is ln_2 in the pre-LN block (the LayerNorm
        # after the attention residual sum) and ln_1 in the post-LN one (Launay's norm1).
        attn_norm = "ln_1" if arch == "launay" else "ln_2"
        micro = []
        for i in range(n_layer):
            micro += [f"blocks.{i}.{attn_norm}", f"blocks.{i}.mlp.act", f"blocks.{i}"]
        self._points = {"micro": micro, "macro": [f"blocks.{i}" for i in range(n_layer)]}

    def _init_launay(self, num_classes, n_layer, n_head, n_embd, dropout, bias, ffn_dim) -> None:
        """Launay et al.'s LM: embedding U(−0.1, 0.1) ×√d, sinusoidal positions, dropout, post-LN
        blocks with PyTorch's default init (attention in-projection Xavier-uniform, zero biases, as
        ``nn.MultiheadAttention``), no final norm, output Linear with bias, U(−0.1, 0.1)."""
        self.wte = ScaledEmbedding(num_classes, n_embd)
        self.wpe = SinusoidalPositions(self.block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PostLNBlock(n_embd, n_head, dropout, bias, ffn_dim) for _ in range(n_layer))
        self.ln_f = nn.Identity()
        self.lm_head = nn.Linear(n_embd, num_classes, bias=True)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.c_attn.weight)
            for layer in (block.attn.c_attn, block.attn.c_proj):
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        nn.init.uniform_(self.wte.weight, -0.1, 0.1)
        nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def structure(self) -> Structure:
        """pre: token + position embeddings and dropout; stage ``blocks`` (each run as its module,
        its attention and FFN layers listed); head: ln_f → lm_head."""

        def tokens(idx):
            return self.wte(idx.long() if idx.is_floating_point() else idx)

        def positions(x):
            return x + self.wpe(torch.arange(x.shape[1], device=x.device))

        blocks = []
        for i, b in enumerate(self.blocks):
            p = f"blocks.{i}"
            steps = [Step(f"{p}.ln_1", "norm", b.ln_1), Step(f"{p}.attn.c_attn", "layer", b.attn.c_attn),
                     Step(f"{p}.attn.c_proj", "layer", b.attn.c_proj),
                     Step(f"{p}.attn.resid_dropout", "dropout", b.attn.resid_dropout),
                     Step(f"{p}.ln_2", "norm", b.ln_2), Step(f"{p}.mlp.c_fc", "layer", b.mlp.c_fc),
                     Step(f"{p}.mlp.act", "act", b.mlp.act), Step(f"{p}.mlp.c_proj", "layer", b.mlp.c_proj),
                     Step(f"{p}.mlp.dropout", "dropout", b.mlp.dropout)]
            blocks.append(OpaqueBlock(p, steps, kind="transformer", module=b))
        head = ViewBlock("lm_head", [Step("ln_f", "norm", self.ln_f), Step("lm_head", "layer", self.lm_head)])
        pre = [Step("wte", "other", tokens), Step("wpe", "other", positions), Step("drop", "dropout", self.drop)]
        return Structure(pre=pre, stages=[Stage("blocks", blocks)], head=head,
                         points=dict(self._points))

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
