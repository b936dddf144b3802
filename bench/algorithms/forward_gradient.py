"""GrAPE: direct feedback alignment whose feedback matrices follow activity-perturbed forward gradients.

*Backpropagation-free learning through gradient aligned feedbacks* (anonymous ICLR 2023 submission,
OpenReview), §3 and Algorithm 1. Per step:

1. One forward pass that is also a forward-mode JVP (bench/feedback/forward_gradient.py): a fresh
   v_l ~ N(0, I) is added to the tangent at every feedback point, and ĝ_l[b] = d_b v_l[b], with d_b
   the directional derivative of sample b's loss, estimates ∂ℓ_b/∂h_l (Eq. 4; Ren et al. 2022).
2. Each B_l (its own matrix: GrAPE needs one per layer, not slices of DFA's unified matrix) is
   moved by vanilla SGD, η_B = 1e-3 (§4.1), to raise the cosine over the batch between the
   projected error B_l e and ĝ_l, then rescaled to its initial norm (§3.3, footnote 2: Nøkland's
   rescaling), with small noise so that it keeps moving when the cosine is 0 (Appendix, Fig. 4).
3. The weights get DFA's update with the new B: δa_l = (B_l e) ⊙ σ′(a_l), ΔW_l = δa_l h_{l−1}ᵀ
   (Eq. 2, Algorithm 1 line 22), the output layer its true gradient (line 19).

Choices, and why:

* **Eq. 6 as printed is a rescaling.** B ← B − η(1 − cos)B multiplies B by a positive scalar: its
  direction never changes, and the renormalisation of §3.3 then undoes the change in length, so
  that rule leaves B exactly where it was (plus the appendix's noise). The default
  (``b_update: gradient``) is therefore the SGD step on (1 − cos) with respect to B, the update
  Eq. 6 is described as performing ("minimize the orthogonal directions while improving the
  gradient alignment"). ``b_update: literal`` keeps the printed form; a test shows it leaves B's
  direction unchanged to 1e-6.
* **Which cosine.** Eq. 5 writes cos(ω̄_l) = g_{a,l}ᵀ B_l / (‖g_{a,l}‖‖B_l‖) between a gradient and
  a matrix whose shapes do not match. Here it is the cosine over the batch between the matrix of
  projected errors P = E B_lᵀ (rows: samples, or tokens) and the matrix of estimates Ĝ_l:
      cos = ⟨P, Ĝ⟩ / (‖P‖‖Ĝ‖) = ⟨B_l, M⟩ / (√⟨B_l, B_l C⟩ ‖Ĝ‖),   M = Ĝᵀ E,  C = Eᵀ E,
  so it depends on the batch only through M, C and ‖Ĝ‖², which are sums over samples. Under DDP
  those are summed over ranks before the step, so every rank moves B identically and 2 ranks ×
  batch b equal 1 process × batch 2b.
* **Scale of B.** The step is taken on the effective B_l (DFA's normalisation 1/√(l_i·e) applied,
  ‖B_l‖ ≈ 1), where η_B = 1e-3 is a relative change of about 1e-3 per step: the cosine's gradient
  scales as 1/‖B‖, so the same η on a raw N(0, 1) matrix would be ~l_i·e times slower.
* **Recycle** (§3.4, after Miyato et al. 2018): ``recycle: true`` replaces M, C and ‖Ĝ‖² by their
  cumulative moving average since the start of the epoch (a per-sample estimate cannot be
  averaged across batches; these batch sums can). Off by default: an average over the whole run
  would freeze B on the first epochs' gradients.
* **More JVPs** (``jvps``, Fig. 2's "iterations"): the first JVP shares the training forward; each
  further one is an extra no-grad forward-mode pass with the same dropout masks and restored norm
  statistics, and the estimates are averaged.
* **align_to: jacobian** — the later published version of the method (Caillon, Fagnou, Delattre &
  Allauzen, "Scaling Direct Feedback Learning with Jacobian Alignment Guarantees", ICLR 2026,
  OpenReview kasbbmwk3s) aligns B_l with a rank-1 forward-mode estimate of the output Jacobian,
  Ĵ_lᵀ = Σ_rows v_l ẏᵀ (E[v ẏᵀ] = J_lᵀ), with a column-wise cosine (one per output unit, averaged),
  each column renormalised to its initial norm, and "infrequent BP anchor steps on a single
  mini-batch" (``calibrate_every``: one backprop step at the start of every T-th epoch). The
  abstract confirms the rank-1 JVP estimate, the local cosine loss and the anchor steps; the
  column-wise form and per-column normalisation come from secondary summaries of that paper,
  not its full text (see configs/tables/grape-2.yaml).
* **Convolutions.** The paper's BioTorch implementation calls ``torch.nn.grad.conv2d_weight`` and
  ``conv2d_input`` explicitly. Here the injected signal reaches a conv layer through autograd's
  convolution backward, which computes exactly ``conv2d_weight`` (tested), so nothing is hand-coded.
* **Placement.** The feedback points are the zoo model's (``algorithm.granularity``: micro after
  every nonlinearity, macro after every block, as Launay et al. 2020 and GrAPE Table 3 use them).
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from bench.algorithms.base import RULES, AlgorithmModule
from bench.feedback.direct import DirectFeedback
from bench.feedback.forward_gradient import (ActivityPerturbation, all_reduce_sum_, check_forward_mode,
                                             directional_derivative, estimates_from, jvp_context, per_row_error,
                                             preserved_norm_stats)
from bench.feedback.noise import SharedNoise
from bench.models.base import point_sizes
from bench.options import AlgorithmOptions, ClassVar, ConfigError, Literal, opt
from bench.feedback.restore import replaying, rng_state


class GrAPEOptions(AlgorithmOptions):
    names: ClassVar[tuple[str, ...]] = ("grape",)

    feedback_init: Literal["gaussian", "uniform"] = opt("gaussian", "B_l entries N(0, 1) (GrAPE §4.1: normal beat Kaiming-uniform) | U(-1, 1)·√3")
    normalize: bool = opt(True, "B_l = U_l/√(l_i·e) (Launay et al. 2020 Eq. 7–8 scale); the norm then stays constant")
    b_lr: float = opt(1.0e-3, "η_B: vanilla-SGD learning rate of the feedback matrices (GrAPE §4.1)", ge=0)
    b_update: Literal["gradient", "literal"] = opt(
        "gradient", "gradient = SGD step on 1 − cos w.r.t. B | literal = Eq. 6 as printed (a pure rescaling)")
    align_to: Literal["gradient", "jacobian"] = opt(
        "gradient", "gradient = batch cosine of B_l e with ĝ_l (GrAPE 2023) | jacobian = column cosine with Ĵ_l (published version)")
    jvps: int = opt(1, "JVPs per batch, averaged (GrAPE Fig. 2 'iterations')", ge=1)
    recycle: bool = opt(False, "cumulative moving average of the alignment statistics within each epoch (GrAPE §3.4)")
    b_noise: float = opt(1.0e-4, "noise added to B_l each step, relative to its RMS entry (GrAPE Appendix, Fig. 4)", ge=0)
    calibrate_every: int = opt(0, "one backprop anchor step at the start of every T-th epoch (published version); 0 = off", ge=0)
    error_at: Literal["logits", "hidden"] = opt(
        "logits", "the error e that B_l projects: logits = ∂L/∂ŷ | hidden = ∂L/∂(input of lm_head), per token, "
                  "as DFA's error_at (Launay et al. 2020's default; grape-3)")

    def check(self, cfg) -> None:
        if self.error_at == "hidden" and self.align_to == "jacobian":
            raise ConfigError("algorithm.error_at=hidden needs algorithm.align_to=gradient (the Jacobian estimate is "
                              "taken at the logits)")
        if self.error_at == "hidden" and str(cfg.model.name) != "transformer":
            raise ConfigError(f"algorithm.error_at=hidden is not valid for model.name={cfg.model.name}; it needs a "
                              f"model whose output projection is named (transformer: lm_head)")


@RULES.register("grape")
class GrAPE(AlgorithmModule):
    PERTURBATION_SEED = 7919       # offsets of the two shared streams from the run seed
    FEEDBACK_NOISE_SEED = 104723

    def setup_rule(self) -> None:
        a: GrAPEOptions = self.opts
        name = str(self.cfg.model.name)
        if self.tap is None or not self.tap.names:
            raise ValueError(f"grape: model {name} exposes no feedback points")
        sizes = list(point_sizes(self.model, self.input_shape, a.granularity).values())
        # error_at: hidden projects e W_head, the error at the head's input (a Linear: ∂ŷ/∂h = W_head)
        self.head = getattr(self.model, "lm_head") if a.error_at == "hidden" else None
        error_size = self.head.in_features if self.head is not None else self.num_classes
        self.feedback = DirectFeedback(sizes, error_size, unified=False, normalize=a.normalize,
                                       init=a.feedback_init, seed=int(self.cfg.seed) + 1)
        for i in range(len(sizes)):  # the norms every update restores: whole matrix, or per column
            b = self.feedback_matrix(i)
            self.register_buffer(f"feedback_norm_{i}", b.norm(dim=0) if a.align_to == "jacobian" else b.norm())
        seed = int(self.cfg.seed)
        self.perturbation_noise = self.add_noise_stream("perturbation", SharedNoise(seed + self.PERTURBATION_SEED))
        self.feedback_noise = self.add_noise_stream("feedback_noise", SharedNoise(seed + self.FEEDBACK_NOISE_SEED))
        self.perturb = ActivityPerturbation(self.model, self.tap.names, self.perturbation_noise)
        check_forward_mode(self.model, self.perturb, self.input_shape, "grape", name)
        self._recycled: list[torch.Tensor] | None = None
        self._recycle_steps = 0
        self._calibrate_now = False
        self.register_buffer("_cos_sums", torch.zeros(len(sizes) + 1), persistent=False)  # per point, then count

    # ------------------------------------------------------------------ feedback matrices
    def feedback_matrix(self, i: int) -> torch.Tensor:
        """The effective B_i = scale_i · U_i (l_i × e), a copy."""
        return self.feedback.matrix_for(i)

    def _store(self, i: int, b: torch.Tensor) -> None:
        getattr(self.feedback, f"matrix_{i}").copy_(b / self.feedback.scales[i])

    def alignment_statistics(self, derivatives, errors, perturbations, tangents) -> list[torch.Tensor]:
        """The batch sums the cosine needs, before the all-reduce: for ``gradient``, per point
        M_i = Ĝ_iᵀ E and ‖Ĝ_i‖², then C = Eᵀ E; for ``jacobian``, per point T_i = V_iᵀ Ẏ (averaged
        over JVPs). Rows are samples (or tokens); E is the per-row, undivided error; ``derivatives``
        holds each JVP's per-sample directional derivative d (``gradient`` only)."""
        e_dim = errors.shape[-1]
        rows_e = errors.reshape(-1, e_dim)
        if self.opts.align_to == "gradient" and len(derivatives) == 1:
            # One JVP: Ĝ_i = diag(d) V_i is never formed. Ĝ_iᵀ E = V_iᵀ (d ⊙ E) and
            # ‖Ĝ_i‖² = Σ_b d_b² ‖v_b‖², where a sample's d scales every one of its rows (tokens).
            d = derivatives[0]
            d_rows = d.repeat_interleave(rows_e.shape[0] // d.shape[0]).to(rows_e.dtype)
            scaled = rows_e * d_rows.unsqueeze(1)
            stats = []
            for v in perturbations[0]:
                v_rows = v.reshape(rows_e.shape[0], -1)
                # ‖v_b‖² as a norm squared: one reduction pass, no v² temporary (half the time of pow+sum)
                squares = torch.linalg.vector_norm(v.reshape(d.shape[0], -1), dim=1).square()
                stats += [scaled.t().mm(v_rows).t(), torch.dot(squares, d.to(squares.dtype).pow(2)).reshape(1)]
            return stats + [rows_e.t().mm(rows_e)]
        if self.opts.align_to == "gradient":
            estimates = [sum(gs) / len(gs) for gs in zip(*(estimates_from(d, v) for d, v in zip(derivatives, perturbations)))]
            stats = []
            for g in estimates:
                g2 = g.reshape(rows_e.shape[0], -1)
                # Ĝᵀ E as (Eᵀ Ĝ)ᵀ: the error-wide operand first is the faster product (architecture M4)
                stats += [rows_e.t().mm(g2).t(), torch.dot(g2.reshape(-1), g2.reshape(-1)).reshape(1)]
            return stats + [rows_e.t().mm(rows_e)]
        k = len(tangents)
        return [sum(t.reshape(-1, e_dim).t().mm(v.reshape(rows_e.shape[0], -1)).t() for v, t in zip(vs, tangents)) / k
                for vs in zip(*perturbations)]

    @torch.no_grad()
    def update_feedback(self, stats: list[torch.Tensor]) -> list[torch.Tensor]:
        """One step of every B_i on 1 − cos (or Eq. 6 as printed), the appendix's noise, and the
        rescaling to the initial norm. Returns the cosines measured before the step."""
        a: GrAPEOptions = self.opts
        all_reduce_sum_(stats)
        if a.recycle:
            self._recycle_steps += 1
            if self._recycled is None:
                self._recycled = [s.clone() for s in stats]
            else:
                for avg, s in zip(self._recycled, stats):
                    avg.add_((s - avg) / self._recycle_steps)
            stats = self._recycled
        cosines = []
        n = len(self.feedback.sizes)
        for i in range(n):
            b = self.feedback_matrix(i)
            norm0 = getattr(self, f"feedback_norm_{i}")
            if a.align_to == "gradient":
                m, g2, c = stats[2 * i], stats[2 * i + 1][0], stats[-1]
                bc = b.mm(c)
                pp = (b * bc).sum()
                denom = (pp.clamp_min(1e-30).sqrt() * g2.clamp_min(1e-30).sqrt())
                cos = (b * m).sum() / denom
                if a.b_update == "gradient":
                    grad = -(m / denom - cos * bc / pp.clamp_min(1e-30))
                else:
                    grad = (1.0 - cos) * b
                b = b - a.b_lr * grad
                cosines.append(cos.detach())  # 0-dim tensors: no device sync on the step
            else:
                t = stats[i]
                bn, tn = b.norm(dim=0).clamp_min(1e-30), t.norm(dim=0).clamp_min(1e-30)
                cos = (b * t).sum(0) / (bn * tn)
                if a.b_update == "gradient":
                    grad = -(t / (bn * tn) - cos * b / bn ** 2) / b.shape[1]
                else:
                    grad = (1.0 - cos) * b
                b = b - a.b_lr * grad
                cosines.append(cos.mean().detach())
            if a.b_noise > 0:
                gen = self.feedback_noise.generator(b.device)
                rms = b.norm() / math.sqrt(b.numel())
                b = b + a.b_noise * rms * torch.randn(b.shape, generator=gen, device=b.device, dtype=b.dtype)
            if a.align_to == "gradient":
                b = b * (norm0 / b.norm().clamp_min(1e-30))
            else:
                b = b * (norm0 / b.norm(dim=0).clamp_min(1e-30))
            self._store(i, b)
        self._cos_sums[:n] += torch.stack(cosines).to(self._cos_sums)
        self._cos_sums[n] += 1
        return cosines

    # ------------------------------------------------------------------ the step
    def forward_gradient_pass(self, x: torch.Tensor, cut: bool):
        """One perturbed forward: (logits, ẏ, points h_l (cut only), perturbations v_l)."""
        with jvp_context(), fwAD.dual_level():
            self.perturb.start(cut=cut)
            try:
                out = self.model(x)
            finally:
                self.perturb.stop()
            logits, tangent = fwAD.unpack_dual(out)
            tangent = torch.zeros_like(logits) if tangent is None else tangent.detach()
        points, vs = self.perturb.points, self.perturb.perturbations
        self.perturb.points, self.perturb.perturbations = [], []
        return logits, tangent, points, vs

    def objective(self, x, y):
        if self._calibrate_now:  # a backprop anchor step (align_to: jacobian, calibrate_every)
            self._calibrate_now = False
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
            return loss, logits, loss
        a: GrAPEOptions = self.opts
        rng = rng_state(x.device)
        logits, tangent, points, vs = self.forward_gradient_pass(x, cut=True)
        if self.tap.capture:  # the probe reads each point's teaching signal on the tensors the surrogate uses
            self.tap.outputs = list(points)
        loss = self.loss_fn(logits, y)
        errors = per_row_error(logits, y, self.loss_fn)
        tangents, perturbations = [tangent], [vs]
        projected_errors = errors if self.head is None else errors.matmul(self.head.weight.detach())
        if a.jvps > 1:
            with torch.no_grad(), preserved_norm_stats(self.model):
                for _ in range(a.jvps - 1):
                    with replaying(rng, x.device):  # the training pass's dropout masks
                        _, t, _, v = self.forward_gradient_pass(x, cut=False)
                    tangents.append(t)
                    perturbations.append(v)
        derivatives = [directional_derivative(errors, t) for t in tangents] if a.align_to == "gradient" else []
        self.update_feedback(self.alignment_statistics(derivatives, projected_errors, perturbations, tangents))
        rows = logits.numel() // logits.shape[-1]
        # e = ∂(mean loss)/∂ŷ (or at the head input), as DFA projects it
        signal = projected_errors.reshape(-1, projected_errors.shape[-1]) / rows
        surrogate = loss
        for h, (projected, scale) in zip(points, self.feedback.project(signal)):
            surrogate = surrogate + scale * torch.dot(h.reshape(-1), projected.reshape(-1))
        return surrogate, logits, loss

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self) -> None:
        self._recycled, self._recycle_steps = None, 0
        t = self.opts.calibrate_every
        self._calibrate_now = bool(t) and self.current_epoch > 0 and self.current_epoch % t == 0

    def on_train_epoch_end(self) -> None:
        n = len(self.feedback.sizes)
        count = float(self._cos_sums[n])
        if count:
            self.log_dict({f"grape/cos/@{i}": self._cos_sums[i] / count for i in range(n)}, on_epoch=True, sync_dist=False)
        self._cos_sums.zero_()
        super().on_train_epoch_end()
