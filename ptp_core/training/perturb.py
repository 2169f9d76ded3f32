"""PTP regularizers: train on clean and perturbed inputs together, L = CE(clean) + lam * CE(perturbed).

L. Chen, J. Chen, Huang, Cheng 2023 (PTP, arXiv 2305.02423). The perturbation is random (`ptp-rn`) or
adversarial (`ptp-adv`) and lives in one of three spaces (`target`):
    input   the word embeddings of the text tokens (Gaussian/uniform noise; K-step PGD, or FreeLB)
    prompt  the soft prompt itself (noise; SAM's worst case in a rho-ball, Foret et al. 2021)
    text    the token ids (random masking; HotFlip substitutions, Ebrahimi et al. 2018)
Every perturbation is a new tensor or a new Batch passed to the one loss; no weight is mutated.
Scales are relative to the RMS of the embedding table, so one value works across models:
a ball of relative radius eps holds perturbations whose RMS per coordinate is at most eps * RMS(E).
A deep prompt (keys and values in every layer) has no embedding scale: its `prompt` perturbations are relative to
each layer's own keys' and values' RMS in the prompt (prompt_unit), so no layer's prefix is drowned or untouched.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from ptp_core.model.encoding import Batch
from ptp_core.model.prompt_model import PromptModel
from ptp_core.training.noise import draw
from ptp_core.training.text_perturb import REPLACEMENTS, hotflip, mask_text

TARGETS = ("input", "prompt", "text")
NOISES = ("gaussian", "uniform")
BALL_NORMS = ("l2", "linf")


@dataclass
class PerturbConfig:
    target: str = "input"
    reg_weight: float = 1.0  # lam: clean and perturbed CE weigh the same, as in PTP
    noise: str = "gaussian"
    sigma: float = 1.0  # noise RMS / embedding RMS; BERT shrugs off less (docs/results.md, Limits)
    mask_rate: float = 0.15  # BERT's masking rate; a fraction of the text tokens
    replacement: str = "mask"  # falls back to unk, then pad, for tokenizers without a mask token
    adv_steps: int = 1  # K ascent steps; K=1 keeps the cost near 2x pt
    epsilon: float = 0.003  # relative radius of the input ball; chosen on validation accuracy (experiments/ptp_study)
    adv_step_size: float = 1.0  # ascent step as a fraction of the radius; 1.0 with K=1 is FGSM from the random start
    adv_init: float = 0.5  # random start at this fraction of the radius (Madry et al. 2018 start inside the ball)
    adv_norm: str = "l2"
    adv_free: bool = False  # FreeLB (Zhu et al. 2020): average the prompt's gradients over the K ascent steps
    rho: float = 0.05  # relative radius of the prompt ball (SAM's rho, relative to the embedding RMS)
    swaps: int = 1  # HotFlip: token substitutions per input
    # Schedule of lam: 0 (train clean) for the first reg_warmup steps, then linear from 0 to lam over reg_ramp steps.
    # Adversarial training commonly delays or ramps its term so that the model first learns (docs/results.md:
    # without it PTP-ADV can hold a seed on the constant predictor, which is perfectly robust). 40/40 was chosen,
    # for PTP-RN and PTP-ADV alike, on validation accuracy (experiments/ptp_study): PT leaves its plateau near step 40.
    reg_warmup: int = 40
    reg_ramp: int = 40

    def __post_init__(self):
        for name, value, choices in (("target", self.target, TARGETS), ("noise", self.noise, NOISES),
                                     ("adv-norm", self.adv_norm, BALL_NORMS), ("replacement", self.replacement, REPLACEMENTS)):
            if value not in choices:
                raise ValueError(f"unknown --{name} {value!r}; use one of {', '.join(choices)}")
        for name in ("reg_weight", "sigma", "epsilon", "rho", "adv_step_size", "adv_init"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
        if not 0 <= self.mask_rate <= 1:
            raise ValueError(f"--mask-rate must be in [0, 1], got {self.mask_rate}")
        if self.adv_steps < 1:
            raise ValueError(f"--adv-steps must be >= 1, got {self.adv_steps}")
        if self.swaps < 0:
            raise ValueError(f"--swaps must be >= 0, got {self.swaps}")
        if self.adv_free and self.adv_steps < 2:
            # FreeLB's K = 1 would take no ascent step at all: the perturbation would be the random start only
            raise ValueError(f"--adv-free (FreeLB) needs --adv-steps >= 2, got {self.adv_steps}; FreeLB's first step "
                             "is the random start, so K = 1 never ascends (drop --adv-free for one PGD step)")
        if self.reg_warmup < 0 or self.reg_ramp < 0:
            raise ValueError(f"--reg-warmup and --reg-ramp must be >= 0 steps, got {self.reg_warmup} and {self.reg_ramp}")

    def weight_at(self, step: int) -> float:
        """lam at training step `step` (1-based): 0 through reg_warmup, then a linear ramp to reg_weight."""
        if step <= self.reg_warmup:
            return 0.0
        if self.reg_ramp == 0:
            return self.reg_weight
        return self.reg_weight * min(1.0, (step - self.reg_warmup) / self.reg_ramp)


_RMS: "weakref.WeakKeyDictionary[torch.nn.Module, float]" = weakref.WeakKeyDictionary()


def embedding_rms(model: PromptModel) -> float:
    """RMS of the backbone's input-embedding table (cached per frozen table): the unit of every scale here."""
    embeddings = model.backbone.get_input_embeddings()
    if embeddings not in _RMS:
        with torch.no_grad():
            _RMS[embeddings] = embeddings.weight.float().pow(2).mean().sqrt().item()
    return _RMS[embeddings]


def prompt_unit(model: PromptModel, prompt: Tensor) -> float | Tensor:
    """The unit of prompt perturbations: RMS(E) for a shallow prompt; for a deep prompt (P, W) the RMS of each
    layer's keys and of its values over the P virtual tokens, (W,) (constant within each of the 2L blocks)."""
    if model.prefix_shape is None:
        return embedding_rms(model)
    blocks = prompt.detach().float().reshape(prompt.shape[0], model.prompt_blocks, -1)  # (P, 2L, H*d)
    rms = blocks.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-12)  # (2L,)
    return rms.repeat_interleave(blocks.shape[2]).to(prompt.dtype)  # (W,)


def _randn(shape, generator: torch.Generator, like: Tensor) -> Tensor:
    return draw(torch.randn, shape, generator, like)


def random_noise(shape: tuple[int, ...], rms: float | Tensor, noise: str, generator: torch.Generator, like: Tensor) -> Tensor:
    """Noise of the given RMS per coordinate: Gaussian N(0, rms^2) or uniform on [-sqrt(3) rms, sqrt(3) rms]."""
    if noise == "gaussian":
        return _randn(shape, generator, like) * rms
    return (draw(torch.rand, shape, generator, like) * 2 - 1) * (math.sqrt(3) * rms)


def ball_radius(batch: Batch, epsilon: float, rms: float, dim: int, norm: str) -> Tensor:
    """Per-example radius (B, 1, 1): L2 radius eps * RMS(E) * sqrt(text tokens * D); L-inf eps * RMS(E)."""
    if norm == "linf":
        return torch.full((batch.rows, 1, 1), epsilon * rms, device=batch.input_ids.device)
    tokens = batch.text_mask.sum(1).clamp_min(1).float()  # (B,)
    return (epsilon * rms * (tokens * dim).sqrt()).view(-1, 1, 1)


def _l2(delta: Tensor) -> Tensor:
    return delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.dim() - 1))  # (B, 1, ...)


def project(delta: Tensor, radius: Tensor, norm: str) -> Tensor:
    """Project each example's delta (B, T, D) onto its ball of the given radius (B, 1, 1)."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, radius), -radius)
    return delta * (radius / _l2(delta).clamp_min(1e-12)).clamp(max=1)


def ascent_step(delta: Tensor, gradient: Tensor, radius: Tensor, step_size: float, norm: str) -> Tensor:
    """delta + alpha * steepest-ascent direction of the norm (normalized gradient, or its sign), projected."""
    if norm == "linf":
        direction = gradient.sign()
    else:
        direction = gradient / _l2(gradient).clamp_min(1e-12)
    return project(delta + step_size * radius * direction, radius, norm)


def ascent_gradient(loss: Tensor, inputs: list[Tensor], grad_scale: float = 1.0,
                    retain_graph: bool = False) -> list[Tensor]:
    """d(loss)/d(inputs) for an ascent, taken of grad_scale * loss (an fp16 loss scaler's scale keeps it from
    underflowing) and divided back; non-finite (an fp16 overflow: the scaler skips that step) gives no ascent."""
    grads = torch.autograd.grad(loss * grad_scale, inputs, retain_graph=retain_graph)
    return [finite(g / grad_scale) for g in grads]


def finite(gradient: Tensor) -> Tensor:
    """The gradient, or zeros where any of its values is not finite (no ascent step from it)."""
    return torch.where(gradient.isfinite().all(), gradient, 0.0)


def random_start(batch: Batch, shape: tuple[int, ...], radius: Tensor, config: PerturbConfig,
                 generator: torch.Generator, like: Tensor) -> Tensor:
    """(B, T, D) start inside the ball: a random direction at adv_init * radius (L2), or uniform in the cube."""
    mask = batch.text_mask.unsqueeze(-1).to(like.dtype)  # (B, T, 1)
    if config.adv_norm == "linf":
        return (draw(torch.rand, shape, generator, like) * 2 - 1) * radius * config.adv_init * mask
    direction = _randn(shape, generator, like) * mask
    return direction / _l2(direction).clamp_min(1e-12) * radius * config.adv_init


def pgd_input(model: PromptModel, params: dict[str, Tensor], batch: Batch, config: PerturbConfig,
              generator: torch.Generator, clean_gradient: Tensor, grad_scale: float = 1.0) -> Tensor:
    """(B, T, D) K-step PGD delta in each example's ball (Madry et al. 2018), from a random start.

    The first ascent direction is the clean input gradient (a free by-product of the clean pass, which
    backpropagates to the input embeddings anyway), so K steps cost K-1 extra passes, not K.
    """
    embeds_shape = (*batch.input_ids.shape, model.embedding_dim)
    radius = ball_radius(batch, config.epsilon, embedding_rms(model), model.embedding_dim, config.adv_norm)
    delta = random_start(batch, embeds_shape, radius, config, generator, clean_gradient)
    delta = ascent_step(delta, clean_gradient, radius, config.adv_step_size, config.adv_norm)
    frozen = {k: v.detach() for k, v in params.items()}
    for _ in range(config.adv_steps - 1):
        delta.requires_grad_(True)
        loss = model.loss(frozen, batch, input_perturbation=delta).mean()
        (gradient,) = ascent_gradient(loss, [delta], grad_scale)
        delta = ascent_step(delta.detach(), gradient, radius, config.adv_step_size, config.adv_norm)
    return delta.detach()


def _freelb_ascent(model: PromptModel, params: dict[str, Tensor], batch: Batch, config: PerturbConfig,
                   generator: torch.Generator, param_gradients: bool, grad_scale: float = 1.0
                   ) -> tuple[Tensor, list[Tensor] | None, list[Tensor]]:
    """FreeLB's K ascent steps (Zhu et al. 2020): the mean CE over them and the K deltas.

    param_gradients: each step's backward also gives the params' gradients, averaged and returned, the loss
    detached (our loop: one backward a step); otherwise the loss keeps its graph for the caller's backward
    (transformers.Trainer) and each step differentiates the delta only, at grad_scale (ascent_gradient)."""
    like = model.backbone.get_input_embeddings().weight
    radius = ball_radius(batch, config.epsilon, embedding_rms(model), model.embedding_dim, config.adv_norm)
    delta = random_start(batch, (*batch.input_ids.shape, model.embedding_dim), radius, config, generator, like)
    tensors, steps = list(params.values()), config.adv_steps
    total, average, deltas = 0.0, [torch.zeros_like(p) for p in tensors], []
    for step in range(steps):
        deltas.append(delta)
        ascend = step < steps - 1  # the last delta is only evaluated
        loss = model.loss(params, batch, input_perturbation=delta.requires_grad_(ascend)).mean()
        total = total + loss / steps
        if param_gradients:
            grads = torch.autograd.grad(loss, tensors + ([delta] if ascend else []))
            average = [a + g / steps for a, g in zip(average, grads)]
            gradient = grads[-1]
        elif ascend:
            (gradient,) = ascent_gradient(loss, [delta], grad_scale, retain_graph=True)  # the graph stays for backward
        if ascend:
            delta = ascent_step(delta.detach(), gradient, radius, config.adv_step_size, config.adv_norm)
    deltas = [d.detach() for d in deltas]
    return (total.detach(), average, deltas) if param_gradients else (total, None, deltas)


def freelb_loss(model: PromptModel, params: dict[str, Tensor], batch: Batch, config: PerturbConfig,
                generator: torch.Generator, grad_scale: float = 1.0) -> tuple[Tensor, list[Tensor]]:
    """FreeLB: the mean CE over the K ascent steps as a tensor (its gradient is the average of the K gradients)
    and the K deltas."""
    loss, _, deltas = _freelb_ascent(model, params, batch, config, generator, False, grad_scale)
    return loss, deltas


def freelb_input(model: PromptModel, params: dict[str, Tensor], batch: Batch, config: PerturbConfig,
                 generator: torch.Generator) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """FreeLB: mean CE and params' gradients averaged over the K ascent steps, and the K deltas."""
    return _freelb_ascent(model, params, batch, config, generator, param_gradients=True)


def sam_prompt(model: PromptModel, params: dict[str, Tensor], batch: Batch, config: PerturbConfig,
               clean_gradient: Tensor, grad_scale: float = 1.0) -> Tensor:
    """(P, D) worst-case prompt offset in the rho-ball: SAM's e = rho g/|g| (Foret et al. 2021), K-step PGD.

    The ball is in units of prompt_unit: offset = unit * z with z in the ball of per-coordinate RMS rho, so z's
    gradient is unit * g (for a shallow prompt the unit is one number and this is SAM's ball of RMS rho * RMS(E))."""
    prompt = params["prompt"].detach()
    unit = prompt_unit(model, prompt)
    # L2: the ball of per-coordinate RMS rho has radius rho * sqrt(P * D); L-inf bounds each coordinate by rho
    # itself (the same convention as ball_radius for the input)
    scale = math.sqrt(prompt.numel()) if config.adv_norm == "l2" else 1.0
    radius = torch.full((1, 1, 1), config.rho * scale, device=prompt.device)
    z = ascent_step(torch.zeros_like(prompt)[None], (clean_gradient * unit)[None], radius, config.adv_step_size,
                    config.adv_norm)  # (1, P, D)
    frozen = {k: v.detach() for k, v in params.items()}
    for _ in range(config.adv_steps - 1):
        z.requires_grad_(True)
        loss = model.loss({**frozen, "prompt": prompt + unit * z[0]}, batch).mean()
        (gradient,) = ascent_gradient(loss, [z], grad_scale)
        z = ascent_step(z.detach(), gradient, radius, config.adv_step_size, config.adv_norm)
    return (unit * z[0]).detach()


def perturbed_loss(model: PromptModel, params: dict[str, Tensor], batch: Batch, method: str, config: PerturbConfig,
                   generator: torch.Generator, input_gradient: Tensor | None = None,
                   prompt_gradient: Tensor | None = None, grad_scale: float = 1.0) -> Tensor:
    """Mean CE of the perturbed pass as a tensor: the one regularizer of our loop and of ptp_core.hf's Trainer.

    The clean loss's gradients seed the adversarial ascents: `input_gradient` (R, T, D) PGD's first step and
    HotFlip, `prompt_gradient` (P, D) SAM's; the ascents differentiate the perturbation only (the input ascents at
    grad_scale, ascent_gradient). generator: a torch.Generator, or ptp_core.training.noise.ExampleNoise for input and text."""
    adversarial = method == "ptp-adv"
    if config.target == "input" and adversarial and config.adv_free:
        return freelb_loss(model, params, batch, config, generator, grad_scale)[0]
    if config.target == "input":
        shape = (*batch.input_ids.shape, model.embedding_dim)
        table = model.backbone.get_input_embeddings().weight
        perturbation = (pgd_input(model, params, batch, config, generator, input_gradient, grad_scale) if adversarial
                        else random_noise(shape, config.sigma * embedding_rms(model), config.noise, generator, table))
        return model.loss(params, batch, input_perturbation=perturbation).mean()
    if config.target == "prompt":
        prompt = params["prompt"]
        offset = (sam_prompt(model, params, batch, config, prompt_gradient, grad_scale) if adversarial else
                  random_noise(tuple(prompt.shape), config.sigma * prompt_unit(model, prompt), config.noise,
                               generator, prompt))
        return model.loss({**params, "prompt": prompt + offset}, batch).mean()
    inputs = (hotflip(model, batch, input_gradient, config.swaps) if adversarial else
              mask_text(model, batch, config.mask_rate, config.replacement, generator))
    return model.loss(params, inputs).mean()


def _clean_pass(model: PromptModel, params: dict[str, Tensor], batch: Batch, method: str,
                config: PerturbConfig) -> tuple[Tensor, Tensor | None]:
    """The clean mean CE and, when an ascent needs the input gradient, the zero perturbation it is taken at."""
    zero = None
    if method == "ptp-adv" and not config.adv_free and config.target in ("input", "text"):
        # a zero perturbation: the clean loss, differentiable in the input for PGD's first step and HotFlip
        zero = torch.zeros((*batch.input_ids.shape, model.embedding_dim),
                           dtype=model.backbone.get_input_embeddings().weight.dtype, device=model.device)
        zero.requires_grad_(True)
    return model.loss(params, batch, input_perturbation=zero).mean(), zero


def ptp_loss(model: PromptModel, params: dict[str, Tensor], batch: Batch, method: str, config: PerturbConfig,
             generator: torch.Generator, reg_weight: float | None = None, grad_scale: float = 1.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """L = CE(clean) + lam CE(perturbed) (PTP, Chen et al. 2023, eq. 1), batch means, as a tensor to backpropagate
    by its caller (transformers.Trainer in ptp_core.hf: its gradient accumulation and loss scaling then apply).

    When an ascent needs the clean pass's gradients (PGD, HotFlip, SAM), one backward gives them and the params'
    clean gradients g, as in ptp_gradients; the clean term then enters the loss as sum(p * g) with its value taken
    out, so the caller's backward does not traverse the clean pass again. Also returns the detached parts to log.
    reg_weight: lam (None: config's). grad_scale: the factor the caller's backward puts on the clean loss (fp16:
    the loss scaler's scale over the accumulation steps), at which the backwards here are taken too."""
    weight = config.reg_weight if reg_weight is None else reg_weight
    clean, zero = _clean_pass(model, params, batch, method, config)
    sam = method == "ptp-adv" and config.target == "prompt"
    if zero is None and not sam:  # no seed: the caller's backward differentiates both passes
        perturbed = perturbed_loss(model, params, batch, method, config, generator, grad_scale=grad_scale)
        return clean + weight * perturbed, {"clean_loss": clean.detach(), "perturbed_loss": perturbed.detach()}
    tensors = list(params.values())
    inputs = tensors + ([zero] if zero is not None else [])
    grads = [g / grad_scale for g in torch.autograd.grad(clean * grad_scale, inputs)]  # one backward of the clean pass
    input_gradient = finite(grads[-1]) if zero is not None else None
    prompt_gradient = finite(grads[list(params).index("prompt")]) if sam else None
    perturbed = perturbed_loss(model, params, batch, method, config, generator, input_gradient, prompt_gradient,
                               grad_scale)
    clean_term = sum((p * g).sum() for p, g in zip(tensors, grads))  # d/dp = g; non-finite g reaches the scaler
    loss = clean.detach() + (clean_term - clean_term.detach()) + weight * perturbed
    return loss, {"clean_loss": clean.detach(), "perturbed_loss": perturbed.detach()}


def ptp_gradients(model: PromptModel, params: dict[str, Tensor], batch: Batch, method: str,
                  config: PerturbConfig, generator: torch.Generator, reg_weight: float | None = None
                  ) -> dict[str, float]:
    """Accumulate d[CE(clean) + lam CE(perturbed)]/d(params) into params' .grad (the gradient of ptp_loss);
    return the losses to log. One backward of the clean pass gives the params' gradient and the ascent's seed.

    reg_weight: lam at this step (PerturbConfig.weight_at); None: config.reg_weight."""
    weight = config.reg_weight if reg_weight is None else reg_weight
    clean, zero = _clean_pass(model, params, batch, method, config)
    names = list(params)
    grads = torch.autograd.grad(clean, [*params.values(), *([zero] if zero is not None else [])])
    input_gradient = grads[len(names)] if zero is not None else None
    if method == "ptp-adv" and config.target == "input" and config.adv_free:  # its steps give their gradients
        perturbed, perturbed_grads, _ = freelb_input(model, params, batch, config, generator)
    else:
        perturbed = perturbed_loss(model, params, batch, method, config, generator, input_gradient,
                                   grads[names.index("prompt")])
        perturbed_grads = torch.autograd.grad(perturbed, list(params.values()))
    for p, g_clean, g_perturbed in zip(params.values(), grads, perturbed_grads):
        g = g_clean + weight * g_perturbed
        p.grad = g if p.grad is None else p.grad + g
    clean, perturbed = clean.item(), perturbed.item()
    return {"loss": clean + weight * perturbed, "clean_loss": clean, "perturbed_loss": perturbed, "reg_weight": weight}
