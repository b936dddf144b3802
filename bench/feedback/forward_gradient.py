"""Activity-perturbed forward gradients (Ren, Kornblith, Liao & Hinton 2022, "Scaling forward gradient
with local losses", arXiv:2210.03310; GrAPE Eq. 4 and Algorithm 1, lines 10–13).

One forward-mode pass (``torch.autograd.forward_ad``; no forward mode is written by hand here)
carries a tangent next to every activity. The tangent starts at zero at the input; at the output
h_l of every feedback point (all but the output layer) a fresh v_l ~ N(0, I) is added to it. The
tangent that reaches the logits is ẏ = Σ_l J_l v_l (J_l = ∂ŷ/∂h_l), so per sample b the
directional derivative of the loss along the combined perturbation is

    d_b = ⟨∂ℓ_b/∂ŷ_b, ẏ_b⟩,        and    ĝ_l[b] = d_b · v_l[b]

is an unbiased estimate of ∂ℓ_b/∂h_l[b]: E[d_b v_l] = Σ_k J_k E[v_k v_lᵀ] ∂ℓ/∂ŷ = J_lᵀ ∂ℓ/∂ŷ, since
the v's are independent with identity covariance (GrAPE §3.4). Its single-draw cosine with the
true gradient is about 1/√(dimension of the perturbation), hence the averaging options below.

:class:`ActivityPerturbation` hooks the feedback points. Inside a ``fwAD.dual_level()`` it adds the
perturbation to the tangent of each point's output. With ``cut=True`` it also does what the
direct-feedback tap does (bench/feedback/points.py): it keeps the attached primal h_l for the
rule's surrogate and hands a detached primal downstream, so one forward pass serves both the
rule's local backward and the JVP (the tangent crosses the cut; gradients do not).

Known limits of PyTorch's forward-mode AD, and how they are handled:

* a custom ``autograd.Function`` needs a ``jvp`` (or, for ``torch.func``, ``setup_context`` +
  ``jvp``). Rules using this module do one dry pass at setup and refuse a model whose forward has
  an operation without a forward-mode formula, in one line (:func:`check_forward_mode`).
* fused scaled-dot-product attention (flash / memory-efficient kernels) has no forward-mode
  formula (pytorch issues 117629, 154226): :func:`jvp_context` selects the math kernel of
  ``F.scaled_dot_product_attention`` for the duration of the pass (it is composed of ordinary
  differentiable ops).
* BatchNorm updates its running statistics on every training forward. The fused pass *is* the
  training forward, so they update once per step; any extra JVP pass (``jvps > 1``, or the
  estimator-only :func:`estimate_activity_gradients`) runs inside :func:`preserved_norm_stats`,
  which restores them. In training mode BatchNorm couples the samples of a batch; the per-sample
  estimate then targets ∂ℓ_b/∂h_l[b] (the sample's own loss) and misses the cross-sample terms
  of ∂L/∂h_l[b] that flow through the batch statistics.
* dropout: an extra pass replays the step's RNG state, so it sees the training pass's masks.
* a weight that carries no tangent still costs a full product in PyTorch's formulas for Linear and
  convolution (its zero tangent is materialised, pytorch#69687): :class:`WeightTangentFree`, active
  in :func:`jvp_context`, evaluates those layers' tangent with the one product that is not zero.

Random numbers: the perturbations come from a :class:`~bench.feedback.noise.SharedNoise` stream
that every DDP rank draws identically. Each draw is made for the *global* batch (local rows ×
world size) and a rank keeps its own slice, the slice of the global batch it trains on, so 2
ranks × batch b draw exactly the perturbations 1 process × batch 2b draws (the stochastic
estimator's DDP equivalence, tested in tests/test_forward_gradient.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bench.feedback.noise import SharedNoise, rank_and_world
from bench.feedback.restore import restoring


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over DDP ranks in place (one flat all-reduce); nothing without a process group."""
    _, world = rank_and_world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


class WeightTangentFree(TorchFunctionMode):
    """Linear and convolution layers carry the tangent with one product, not two.

    PyTorch's forward-mode formula for ``addmm``/``mm``/``convolution`` is
    ``x_t W + x W_t``; a weight that carries no tangent (ours never do: only activities are
    perturbed) gets a materialised zero ``W_t``, and the second product is paid in full
    (pytorch/pytorch#69687, ZeroTensors for forward AD, still open). On the grape-1 MLP that makes
    a Linear's JVP cost three forwards instead of two. While this mode is active, ``F.linear`` and
    ``F.conv{1,2,3}d`` on an input that carries a tangent and a weight and bias that do not are
    evaluated as the two halves of the same derivative: the primal by the op itself (so autograd
    records it and its backward is the op's own), the tangent by the op on the input tangent
    without bias, the only term left when W_t = b_t = 0 (the op is linear in its input). Anything
    else (no tangent, a weight with a tangent, another op) goes through unchanged. The primal, the
    tangent and every ``.grad`` equal PyTorch's own to 1e-12 in double precision
    (tests/test_forward_gradient.py); the tangent carries no autograd history of the weights,
    which nothing here differentiates.
    """

    OPS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS and args:
            primal, tangent = fwAD.unpack_dual(args[0])
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (tangent is not None and weight is not None and fwAD.unpack_dual(weight).tangent is None
                    and (bias is None or fwAD.unpack_dual(bias).tangent is None)):
                rest = list(args[3:])
                out = func(primal, weight, bias, *rest, **{k: v for k, v in kwargs.items() if k not in ("weight", "bias")})
                with torch.no_grad():
                    out_tangent = func(tangent, weight, None, *rest,
                                       **{k: v for k, v in kwargs.items() if k not in ("weight", "bias")})
                return fwAD.make_dual(out, out_tangent)
        return func(*args, **kwargs)


@contextmanager
def jvp_context():
    """What a forward-mode pass runs under: the math kernel of scaled-dot-product attention (the
    fused CPU/CUDA kernels have no forward-mode formula), and :class:`WeightTangentFree`."""
    with WeightTangentFree():
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - older torch
            yield
            return
        with sdpa_kernel(SDPBackend.MATH):
            yield


def preserved_norm_stats(model: nn.Module):
    """Restore every norm layer's running statistics on exit (an extra forward must not move them)."""
    return restoring(b for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) for b in m.buffers())


class ActivityPerturbation:
    """Forward hooks on ``names`` that perturb each point's tangent (module docstring).

    Active only between :meth:`start` and :meth:`stop`; otherwise the hooks return ``None`` and
    the model runs unchanged (evaluation, the alignment probe's backprop pass).
    """

    def __init__(self, model: nn.Module, names: list[str], noise: SharedNoise):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"feedback point {missing[0]!r} is not a submodule of {type(model).__name__}")
        self.names = list(names)
        self.noise = noise
        self.active = False
        self.cut = False
        self.points: list[torch.Tensor] = []          # attached primals h_l (cut mode)
        self.perturbations: list[torch.Tensor] = []   # v_l, one per point, in forward order
        self._handles = [modules[n].register_forward_hook(self._hook) for n in self.names]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def start(self, cut: bool) -> None:
        self.points, self.perturbations = [], []
        self.cut, self.active = bool(cut), True

    def stop(self) -> None:
        self.active = False

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        """N(0, I) shaped like ``like`` (rows = local batch), sliced out of a global-batch draw."""
        return self.noise.randn_rows(like)

    def _hook(self, module, inputs, output):
        if not self.active:
            return None
        primal, tangent = fwAD.unpack_dual(output)
        v = self.draw(primal)
        self.perturbations.append(v)
        if self.cut:
            self.points.append(primal)
            primal = primal.detach()
            tangent = None if tangent is None else tangent.detach()
        return fwAD.make_dual(primal, v if tangent is None else tangent + v)


def per_row_error(logits: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
    """∂(Σ_rows ℓ)/∂ŷ: the error of each row (sample or token) of a mean loss, undivided by the
    batch, so that sums of per-row terms add up the same way over DDP ranks."""
    rows = logits.numel() // logits.shape[-1]
    with torch.enable_grad():
        z = logits.detach().requires_grad_(True)
        (e,) = torch.autograd.grad(loss_fn(z, y) * rows, z)
    return e


def directional_derivative(error: torch.Tensor, logits_tangent: torch.Tensor) -> torch.Tensor:
    """d_b = ⟨∂ℓ_b/∂ŷ_b, ẏ_b⟩ per sample (summed over every non-batch dimension: tokens too)."""
    return (error * logits_tangent).reshape(error.shape[0], -1).sum(1)


def estimates_from(d: torch.Tensor, perturbations: list[torch.Tensor]) -> list[torch.Tensor]:
    """ĝ_l = d_b · v_l[b] for every point."""
    return [v * d.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for v in perturbations]


def estimate_activity_gradients(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, loss_fn,
                                noise: SharedNoise, jvps: int = 1) -> list[torch.Tensor]:
    """Forward-gradient estimates of ∂ℓ_b/∂h_l[b] (the per-row loss, not divided by the batch) at
    every point, averaged over ``jvps`` independent JVPs; no backward pass and no weight graph.
    The model's norm statistics are left as they were; each pass replays the same RNG state."""
    perturb = ActivityPerturbation(model, names, noise)
    rng = torch.get_rng_state()
    total: list[torch.Tensor] | None = None
    try:
        with torch.no_grad(), preserved_norm_stats(model), jvp_context():
            for _ in range(jvps):
                torch.set_rng_state(rng)
                with fwAD.dual_level():
                    perturb.start(cut=False)
                    out = model(x)
                    perturb.stop()
                    logits, tangent = fwAD.unpack_dual(out)
                    tangent = torch.zeros_like(logits) if tangent is None else tangent
                e = per_row_error(logits, y, loss_fn)
                est = estimates_from(directional_derivative(e, tangent), perturb.perturbations)
                total = est if total is None else [a + b for a, b in zip(total, est)]
    finally:
        perturb.remove()
    return [t / jvps for t in total]


def check_forward_mode(model: nn.Module, perturb: ActivityPerturbation, input_shape: tuple[int, ...], rule: str,
                       model_name: str) -> None:
    """One dry perturbed JVP on two zero inputs, as training runs it; a model with an operation
    lacking a forward-mode formula (a custom autograd.Function without ``jvp``) is refused with one
    line. Norm statistics, the RNG and the perturbation stream are left as they were."""
    dtype = getattr(model, "input_dtype", torch.float32)
    x = torch.zeros((2, *input_shape), dtype=dtype, device=next(model.parameters()).device)
    rng, state = torch.get_rng_state(), perturb.noise.state()
    try:
        with torch.no_grad(), preserved_norm_stats(model), jvp_context(), fwAD.dual_level():
            perturb.start(cut=False)
            model(x)
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{rule}: model {model_name} has an operation without a forward-mode derivative, "
                         f"so its forward gradient cannot be computed ({first})") from None
    finally:
        perturb.stop()
        perturb.points, perturb.perturbations = [], []
        torch.set_rng_state(rng)
        perturb.noise.load(state)

